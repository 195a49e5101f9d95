//! The clamped paths of `bench xdp` (docs/cost-control.md): an identity a
//! budget throttles (its byte rates checked on every packet of a live
//! flow) and one the extraction guard caps (TC egress checks every
//! response), each conforming and over its rate, against the same
//! XDP_DROP baseline as the other paths. The identities are written as
//! the agent writes them: its limits through `enforce::clamp::clamped`
//! and `Limits::kernel_identity`.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use portcullis_agent::{
    config::{CostControlSection, Limits},
    enforce::clamp::{Clamp, clamped},
    loader::{Unattached, clock::monotonic_ns},
};
use portcullis_common::{Reason, programs};
use portcullis_testkit::packet::Packet;

use crate::xdp::{CLIENT, PORT, SERVER, SERVICE, prepare};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX; // -1
const TC_ACT_SHOT: u32 = 2;
const SAMPLES: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The limits of an identity in each measured state: `base` as
/// configured, then as the budget loop clamps it.
fn limits(base: Limits, clamp: &Clamp) -> Limits {
    clamped(base, clamp, &CostControlSection::default())
}

struct Row {
    name: &'static str,
    tc: bool,
    limits: Limits,
    frame: Vec<u8>,
    verdict: u32,
    /// The drop counter that must move (over-rate rows).
    counter: Option<Reason>,
}

/// Measures the rows; returns (name, ns/packet) with the baseline first.
pub fn run(repeat: u32) -> Result<Vec<(String, f64)>> {
    let mut k = Unattached::load().context("load the eBPF object (needs root)")?;
    let slot = prepare(&mut k.maps, false)?;
    let hour = monotonic_ns() + 3600 * 1_000_000_000;
    k.maps.admit(slot, IpAddr::from(CLIENT), SERVICE, 0, hour)?;
    let syn = Packet::tcp4(CLIENT, SERVER, 40000, PORT).syn().build();
    let r = k.xdp(programs::INGRESS).test_run(TestRunOptions {
        data_in: Some(&syn),
        ..Default::default()
    })?;
    if r.return_value != XDP_PASS {
        bail!("setup: the admitted SYN did not pass");
    }
    let ack = Packet::tcp4(CLIENT, SERVER, 40000, PORT)
        .ack()
        .payload(&[0x5a; 64])
        .build();
    let response = Packet::tcp4(SERVER, CLIENT, PORT, 40000)
        .ack()
        .payload(&[0x77; 64])
        .build();
    // The programs read the coarse clock (a jiffy), and a test run sends
    // tens of thousands of frames within one: the conforming rows need a
    // rate far above the run's and a burst of many jiffies, so every
    // frame takes the rate check and passes it. The over-rate rows use
    // the throttle's floor and the guard's default cap.
    let fast = Limits {
        conn_per_sec: 1_000_000,
        bytes_per_sec: 100_000_000_000,
        bytes_burst: 1 << 40,
        egress_bytes_per_sec: 0,
        egress_bytes_burst: 1 << 40,
        ..Limits::default()
    };
    let unlimited = Limits {
        bytes_per_sec: 0,
        ..fast
    };
    // Unlimited with the default bursts: over the floor within a run.
    let default_bursts = Limits {
        bytes_burst: Limits::default().bytes_burst,
        egress_bytes_burst: Limits::default().egress_bytes_burst,
        ..unlimited
    };
    let throttle = Clamp {
        throttle_percent: Some(10),
        ..Clamp::default()
    };
    let cap = |bps| Clamp {
        egress_cap: Some(bps),
        ..Clamp::default()
    };
    let rows = [
        Row {
            name: "established flow, no byte limit (as in the table above)",
            tc: false,
            limits: unlimited,
            frame: ack.clone(),
            verdict: XDP_PASS,
            counter: None,
        },
        Row {
            name: "established flow, throttled identity, under its rate",
            tc: false,
            limits: limits(fast, &throttle),
            frame: ack.clone(),
            verdict: XDP_PASS,
            counter: None,
        },
        Row {
            name: "established flow, throttled identity, over its rate: drop",
            tc: false,
            limits: limits(default_bursts, &throttle),
            frame: ack.clone(),
            verdict: XDP_DROP,
            counter: Some(Reason::ByteRate),
        },
        Row {
            name: "TC egress, response, no cap",
            tc: true,
            limits: unlimited,
            frame: response.clone(),
            verdict: TC_ACT_UNSPEC,
            counter: None,
        },
        Row {
            name: "TC egress, response, egress-capped identity, under its cap",
            tc: true,
            limits: limits(unlimited, &cap(100_000_000_000)),
            frame: response.clone(),
            verdict: TC_ACT_UNSPEC,
            counter: None,
        },
        Row {
            name: "TC egress, response, egress-capped identity, over its cap: shot",
            tc: true,
            limits: limits(default_bursts, &cap(1 << 20)),
            frame: response.clone(),
            verdict: TC_ACT_SHOT,
            counter: Some(Reason::EgressCap),
        },
    ];
    let mut out = Vec::new();
    let baseline = k.xdp(programs::BASELINE_DROP);
    let mut base = Vec::new();
    for _ in 0..SAMPLES {
        let r = baseline.test_run(TestRunOptions {
            data_in: Some(&ack),
            repeat,
            ..Default::default()
        })?;
        base.push(r.duration.as_nanos() as f64);
    }
    out.push((
        "baseline (`portcullis_baseline_drop`)".to_string(),
        median(base),
    ));
    for row in &rows {
        // Written as the agent writes a clamp: the identity's limits
        // replaced in place, its token-bucket state kept.
        let ident = row.limits.kernel_identity(1);
        k.maps.upsert_identity(ident, "bench")?;
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let before = k.maps.reason_counts()?;
            let opts = TestRunOptions {
                data_in: Some(&row.frame),
                repeat,
                ..Default::default()
            };
            let r = if row.tc {
                k.tc(programs::EGRESS).test_run(opts)?
            } else {
                k.xdp(programs::INGRESS).test_run(opts)?
            };
            if r.return_value != row.verdict {
                bail!(
                    "{}: verdict {} instead of {}",
                    row.name,
                    r.return_value,
                    row.verdict
                );
            }
            if let Some(reason) = row.counter {
                let after = k.maps.reason_counts()?;
                let moved = after[reason as usize] - before[reason as usize];
                // All but the first burst's worth (the default 1 MiB
                // burst, a few thousand frames) and what the rate refills
                // while the run lasts are over it: at least nine in ten.
                if moved * 10 < u64::from(repeat) * 9 {
                    bail!(
                        "{}: {} counted {moved} of {repeat} runs",
                        row.name,
                        reason.name()
                    );
                }
            }
            samples.push(r.duration.as_nanos() as f64);
        }
        out.push((row.name.to_string(), median(samples)));
    }
    Ok(out)
}

pub fn print(rows: &[(String, f64)], repeat: u32) {
    let base = rows[0].1;
    println!(
        "clamped identities (budget throttle, extraction guard's egress cap), repeat {repeat}, median of {SAMPLES}"
    );
    println!();
    println!("| path | ns/packet | ratio vs baseline |");
    println!("|---|---:|---:|");
    for (name, ns) in rows {
        println!("| {name} | {ns:.0} | {:.2}x |", ns / base);
    }
    println!();
    println!(
        "- TC rows run the egress program on an skb (BPF_PROG_TEST_RUN builds one per call): their"
    );
    println!(
        "  own first row is the fair reference for the cap's added cost; the XDP baseline is kept"
    );
    println!("  so every row shares one scale.");
}
