//! The `scale` part of `portcullis-bench xdp`: whether the number of live
//! admissions slows the paths every packet takes. Three objects, each
//! sized for 1,048,576 admissions (`kernel.max_admissions`' maximum), are
//! filled to 10, 10,000 and 1,000,000 admissions (distinct sources, one
//! identity); the no-admission SYN drop and the established flow are
//! measured with BPF_PROG_TEST_RUN as in the main table, the three objects
//! in turn within each round so that the machine's drift hits them alike,
//! and each fill's median is given as a ratio to the 10-admission one
//! (target: at most 1.10x at 1M).

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use portcullis_agent::loader::{AttachMode, Options, Unattached, clock::monotonic_ns};
use portcullis_common::programs;
use portcullis_testkit::packet::Packet;

use crate::xdp::{CLIENT, PORT, SERVER, SERVICE, STRANGER};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
pub const FILLS: [u32; 3] = [10, 10_000, 1_000_000];
/// At most this slowdown at 1M admissions against 10.
pub const TARGET: f64 = 1.10;

/// One fill level: admissions, then ns/packet of the drop and the
/// established path.
pub struct Level {
    pub admissions: u32,
    pub drop_ns: f64,
    pub established_ns: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `i`-th filler source: 11.x.y.z, never the client or the stranger.
fn filler(i: u32) -> IpAddr {
    IpAddr::from([11, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

/// Rounds of measurement; each measures every object once per path.
const ROUNDS: usize = 7;

/// An object sized for 1M admissions, with the service, one identity, an
/// established flow from the client, and `fill` admissions in all.
pub fn object(fill: u32) -> Result<Unattached> {
    let opts = Options {
        pin_dir: PathBuf::new(),
        bpffs: PathBuf::new(),
        interfaces: Vec::new(),
        mode: AttachMode::Auto,
        egress: false,
        max_flows: 65_536,
        max_admissions: 1 << 20,
        max_knock_sources: 16_384,
        ephemeral_pins: true,
    };
    let mut k =
        Unattached::load_sized(&opts).context("load the eBPF object sized for 1M admissions")?;
    let slot = crate::xdp::prepare(&mut k.maps, false)?;
    let hour = monotonic_ns() + 3600 * 1_000_000_000;
    k.maps.admit(slot, IpAddr::from(CLIENT), SERVICE, 0, hour)?;
    eprintln!("scale: filling an object to {fill} admissions ...");
    for i in 1..fill {
        k.maps.admit(slot, filler(i), SERVICE, 0, hour)?;
    }
    let live = k.maps.admissions().len() as u32;
    if live != fill {
        bail!("scale: {live} admissions live, expected {fill}");
    }
    let syn = Packet::tcp4(CLIENT, SERVER, 40000, PORT).syn().build();
    if run_one(&k, &syn, 1)?.0 != XDP_PASS {
        bail!("setup: the admitted SYN did not pass");
    }
    Ok(k)
}

fn run_one(k: &Unattached, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let ingress: &Xdp = k
        .ebpf
        .program(programs::INGRESS)
        .context("ingress program")?
        .try_into()?;
    let r = ingress.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

pub fn run(repeat: u32) -> Result<Vec<Level>> {
    let objects: Vec<(u32, Unattached)> = FILLS
        .iter()
        .map(|&f| object(f).map(|k| (f, k)))
        .collect::<Result<_>>()?;
    let ack = Packet::tcp4(CLIENT, SERVER, 40000, PORT)
        .ack()
        .payload(&[0x5a; 64])
        .build();
    let stranger = Packet::tcp4(STRANGER, SERVER, 40000, PORT).syn().build();
    let mut drops = vec![Vec::new(); objects.len()];
    let mut established = vec![Vec::new(); objects.len()];
    for _ in 0..ROUNDS {
        for (i, (_, k)) in objects.iter().enumerate() {
            for (frame, verdict, out) in [
                (&stranger, XDP_DROP, &mut drops[i]),
                (&ack, XDP_PASS, &mut established[i]),
            ] {
                let (v, ns) = run_one(k, frame, repeat)?;
                if v != verdict {
                    bail!("scale: verdict {v} instead of {verdict}");
                }
                out.push(ns);
            }
        }
    }
    Ok(objects
        .iter()
        .zip(drops.into_iter().zip(established))
        .map(|((fill, _), (d, e))| Level {
            admissions: *fill,
            drop_ns: median(d),
            established_ns: median(e),
        })
        .collect())
}

/// The scale table, in markdown, with each level's ratio to the first.
pub fn print(levels: &[Level]) {
    let Some(first) = levels.first() else {
        return;
    };
    println!("| live admissions | no admission, drop ns | ratio | established flow ns | ratio |");
    println!("|---:|---:|---:|---:|---:|");
    for l in levels {
        println!(
            "| {} | {:.0} | {:.2}x | {:.0} | {:.2}x |",
            l.admissions,
            l.drop_ns,
            l.drop_ns / first.drop_ns,
            l.established_ns,
            l.established_ns / first.established_ns
        );
    }
    if let Some(last) = levels.last() {
        let (d, e) = (
            last.drop_ns / first.drop_ns,
            last.established_ns / first.established_ns,
        );
        let verdict = |r: f64| if r <= TARGET { "PASS" } else { "MISS" };
        println!();
        println!(
            "- {} admissions slow the drop path {d:.2}x ({}) and the established path {e:.2}x ({}); target at most {TARGET:.2}x",
            last.admissions,
            verdict(d),
            verdict(e)
        );
    }
}
