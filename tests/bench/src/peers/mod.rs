//! `portcullis-bench peers`: what a SYN flood from many spoofed sources
//! costs the node under portcullis and under the filters it is compared
//! with, and what is left for an admitted client, in one run with the same
//! traffic.
//!
//! Each configuration gets a fresh client and node namespace joined by a
//! veth (the e2e harness). The node's receive work runs in its veth's
//! threaded NAPI kthread, pinned to CPU 1; the generator, an AF_PACKET
//! sender of pre-built SYNs from 65,536 sources (172.16.0.0/16) to the
//! protected port, runs on CPU 0; RPS steers the node's backlog (the path
//! without XDP) to CPU 1 as well. Node CPU per packet is CPU 1's busy time
//! (`/proc/stat`) over the packets the veth delivered to the node, median
//! of the windows. Then the admitted client (`goodput.rs`) without and
//! under a flood of the same rate in every configuration. Configurations
//! (`configs.rs`), each as its documentation recommends for dropping a
//! port's traffic from unknown sources:
//!
//! - no filter: the kernel's own stack (a listener on the port: SYN
//!   cookies under the flood);
//! - iptables: `raw` PREROUTING, drop unless the source is in an ipset;
//! - nftables: a `netdev` ingress chain on the device, drop unless the
//!   source is in a set;
//! - xdp-filter (xdp-tools): native mode, destination port 8000 denied;
//! - trivial XDP_DROP: `portcullis_baseline_drop` attached natively;
//! - portcullis: the agent, port-wide service, no admissions.
//!
//! Traffic never leaves the namespaces; every loop is bounded in seconds;
//! namespaces, programs and rules go with the harness's guards.

use std::{
    net::SocketAddr,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use portcullis_e2e::e2e::{Env, PROTECTED_PORT, SERVICE, Settings};
use portcullis_testkit::{Netns, poll_until};

mod capture;
mod chart;
mod configs;
mod knock;
mod scale;

use configs::{Config, install, keys};

use crate::{
    flood::{Flood, SOURCES, frames},
    goodput::{self, Goodput, OFFERED_MBIT, Sink},
    support::number,
};

pub const USAGE: &str = "usage: portcullis-bench peers [flood] [knock] [OPTIONS]
  flood          the SYN flood and the admitted client's goodput under it
  knock          knock to open against fwknop's SPA
  scale          connect latency with 10, 10k and 1M live admissions
                 (all three when none is named)
  --trials N     knock-to-open trials per client (default 200, at most 250)
  --chart FILE   also draw the figures as an SVG chart into FILE
  --secs N       seconds per measurement window (default 5)
  --windows N    windows per configuration, median reported (default 3)
  --goodput-kpps N  the flood's rate while the admitted client is measured,
                 the same for every configuration (default 800)
  --only CONFIG  run only this configuration (repeatable): stack, iptables,
                 nftables, xdp-filter, xdp-drop, portcullis";

const GENERATOR_CPU: usize = 0;
const NODE_CPU: usize = 1;

/// The report's parts, in order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Flood,
    Knock,
    Scale,
}

struct Args {
    parts: Vec<Part>,
    secs: u64,
    windows: usize,
    only: Vec<Config>,
    goodput_kpps: u64,
    trials: usize,
    chart: Option<std::path::PathBuf>,
}

pub fn main(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut a = Args {
        parts: Vec::new(),
        trials: 200,
        chart: None,
        secs: 5,
        windows: 3,
        only: Vec::new(),
        goodput_kpps: 800,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--secs" => a.secs = number("--secs", args.next(), 1..=60)?,
            "--windows" => a.windows = number("--windows", args.next(), 1..=15)? as usize,
            "--goodput-kpps" => a.goodput_kpps = number("--goodput-kpps", args.next(), 1..=20_000)?,
            "--trials" => a.trials = number("--trials", args.next(), 10..=250)? as usize,
            "--chart" => a.chart = Some(args.next().context("--chart needs a file")?.into()),
            "flood" => a.parts.push(Part::Flood),
            "knock" => a.parts.push(Part::Knock),
            "scale" => a.parts.push(Part::Scale),
            "--only" => {
                let key = args.next().context("--only needs a configuration")?;
                let cfg = Config::ALL
                    .into_iter()
                    .find(|c| c.key() == key)
                    .with_context(|| format!("--only {key:?}: not one of {}", keys()))?;
                a.only.push(cfg);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    if a.parts.is_empty() {
        a.parts = vec![Part::Flood, Part::Knock, Part::Scale];
    }
    let mut panels = Vec::new();
    if a.parts.contains(&Part::Flood) {
        let rows = flood_part(&a)?;
        let bars = rows
            .iter()
            .filter_map(|(c, r)| {
                r.as_ref().ok().map(|f| chart::Bar {
                    label: c.name().to_string(),
                    value: f.ns_per_packet,
                    upper: None,
                })
            })
            .collect();
        panels.push((
            "Node CPU per dropped SYN under the flood (lower is better)".to_string(),
            "ns per packet",
            bars,
        ));
    }
    if a.parts.contains(&Part::Knock) {
        eprintln!("peers: knock to open, {} trials each ...", a.trials);
        let r = knock::run(a.trials)?;
        knock::print(&r);
        panels.push((
            "Knock to open: p50 (dark), p99 (light)".to_string(),
            "ms from the start of asking to the first connect",
            knock::bars(&r),
        ));
    }
    if a.parts.contains(&Part::Scale) {
        eprintln!("peers: connect latency at scale ...");
        scale::print(&scale::run()?);
    }
    if let Some(file) = &a.chart {
        chart::draw(file, &panels)?;
        eprintln!("peers: chart written to {}", file.display());
    }
    Ok(())
}

type Rows = Vec<(Config, Result<Figures, String>)>;

fn flood_part(a: &Args) -> Result<Rows> {
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        bail!("peers needs two CPUs: one for the generator, one for the node");
    }
    let mut rows = Vec::new();
    for cfg in Config::ALL {
        if !a.only.is_empty() && !a.only.contains(&cfg) {
            continue;
        }
        eprintln!("peers: {} ...", cfg.name());
        match measure(cfg, a) {
            Ok(r) => rows.push((cfg, Ok(r))),
            Err(e) => rows.push((cfg, Err(format!("{e:#}")))),
        }
    }
    report(&rows, a);
    Ok(rows)
}

/// One configuration's result: medians over the windows.
struct Figures {
    offered_pps: f64,
    delivered_pps: f64,
    ns_per_packet: f64,
    /// The node CPU's busy share: near 100% means it, not the generator,
    /// set the rate.
    node_busy: f64,
    /// The admitted client without and with the flood; `None` where the
    /// configuration drops the client too.
    goodput: Option<UnderFlood>,
}

struct UnderFlood {
    calm: Goodput,
    flood: Goodput,
    /// The flood's rate while the client was measured.
    offered_pps: f64,
    /// The share of the node's packets the veth dropped before any filter
    /// ran (its receive ring full: the node's CPU saturated).
    ring_drops: f64,
}

fn measure(cfg: Config, a: &Args) -> Result<Figures> {
    let settings = Settings {
        // The connect probes must not meet portcullis's own rate limit.
        conn_limits: (100_000, 100_000),
        ..Settings::default()
    };
    let mut env = Env::new("peers", &settings);
    let client_v4 = env.topo.client_v4;
    env.edit_config(|t| {
        format!(
            "{t}\n[[admissions]]\nidentity = \"bench\"\nsource = \"{client_v4}\"\nservice = \"{SERVICE}\"\nttl_secs = 3600\n"
        )
    });
    let node_if = env.topo.server_if.clone();
    let node_ns = env.topo.server.name().to_string();
    // Threaded NAPI (veth runs NAPI with GRO on) makes the node's receive
    // work a kthread of its own, pinned away from the generator.
    env.topo
        .server
        .exec("ethtool")
        .args(["-K", &node_if, "gro", "on"])
        .output()
        .context("ethtool")?;
    env.topo
        .server
        .exec("sh")
        .args(["-c", &format!("echo 1 > /sys/class/net/{node_if}/threaded")])
        .output()
        .context("threaded napi")?;
    let napi = poll_until(Duration::from_secs(5), || napi_thread(&node_if))
        .with_context(|| format!("no NAPI thread for {node_if}"))?;
    run(Command::new("taskset").args(["-p", "-c", &NODE_CPU.to_string(), &napi.to_string()]))?;
    // A NIC's NAPI runs in softirq context, which no process preempts; a
    // threaded NAPI kthread is an ordinary thread unless it is given a
    // real-time priority, and the node's own processes (the sink, an
    // agent) would otherwise stall it long enough to overflow the veth's
    // ring.
    run(Command::new("chrt").args(["-f", "-p", "50", &napi.to_string()]))?;
    // Without XDP a veth hands packets to the stack through the backlog:
    // RPS steers that to the node's CPU too.
    env.topo
        .server
        .exec("sh")
        .args([
            "-c",
            &format!(
                "echo {:x} > /sys/class/net/{node_if}/queues/rx-0/rps_cpus",
                1u32 << NODE_CPU
            ),
        ])
        .output()
        .context("rps")?;
    let _filter = install(cfg, &mut env, &node_ns, &node_if)?;
    let sink = Sink::start(
        &env.topo.server,
        SocketAddr::new(env.topo.server_v4.into(), PROTECTED_PORT),
        NODE_CPU,
    )?;
    let admits_client = cfg.admits_client();
    let calm = match admits_client {
        true => Some(goodput::measure(
            &env.topo.client,
            &sink,
            a.secs,
            GENERATOR_CPU,
        )?),
        false => None,
    };

    let server_mac = mac(&env.topo.server, &node_if)?;
    let client_mac = mac(&env.topo.client, &env.topo.client_if)?;
    let frames = Arc::new(frames(server_mac, client_mac, env.topo.server_v4));
    let (client, client_if) = (&env.topo.client, env.topo.client_if.as_str());
    let flood = Flood::start(
        client,
        client_if,
        frames.clone(),
        GENERATOR_CPU,
        Duration::from_secs(a.secs * a.windows as u64 + 2),
        None,
    );
    // A second of warm-up, then the windows.
    std::thread::sleep(Duration::from_secs(1));
    let mut offered = Vec::new();
    let mut delivered = Vec::new();
    let mut per_packet = Vec::new();
    let mut busy = Vec::new();
    for _ in 0..a.windows {
        let (s0, t0, r0) = (
            flood.sent(),
            tx_packets(client, client_if)?,
            cpu_busy_ns(NODE_CPU)?,
        );
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(a.secs));
        let secs = start.elapsed().as_secs_f64();
        let (s1, t1, r1) = (
            flood.sent(),
            tx_packets(client, client_if)?,
            cpu_busy_ns(NODE_CPU)?,
        );
        let got = t1.saturating_sub(t0);
        if got == 0 {
            bail!("no packet reached the node in a window");
        }
        offered.push((s1 - s0) as f64 / secs);
        delivered.push(got as f64 / secs);
        per_packet.push(r1.saturating_sub(r0) as f64 / got as f64);
        busy.push(r1.saturating_sub(r0) as f64 / (secs * 1e9));
    }
    flood.finish()?;

    // The admitted client under a flood offered at the same rate in every
    // configuration (the generator's top speed differs with the node's
    // configuration), after the CPU windows: its own packets would count
    // in them.
    let under = match calm {
        Some(calm) => {
            let flood = Flood::start(
                client,
                client_if,
                frames,
                GENERATOR_CPU,
                Duration::from_secs(a.secs + 4),
                Some(a.goodput_kpps * 1000),
            );
            std::thread::sleep(Duration::from_secs(1));
            let (s0, d0) = (flood.sent(), tx_dropped(client, client_if)?);
            let start = Instant::now();
            let g = goodput::measure(client, &sink, a.secs, GENERATOR_CPU)?;
            let secs = start.elapsed().as_secs_f64();
            let (s1, d1) = (flood.sent(), tx_dropped(client, client_if)?);
            flood.finish()?;
            Some(UnderFlood {
                calm,
                flood: g,
                offered_pps: (s1 - s0) as f64 / secs,
                ring_drops: d1.saturating_sub(d0) as f64 / (s1 - s0).max(1) as f64,
            })
        }
        None => None,
    };
    if cfg == Config::Portcullis {
        let st = env.status();
        if st.get("no_admission").copied().unwrap_or(0) == 0 {
            bail!("portcullis counted no no_admission drops: {st:?}");
        }
    }
    Ok(Figures {
        offered_pps: median(offered),
        delivered_pps: median(delivered),
        ns_per_packet: median(per_packet),
        node_busy: median(busy),
        goodput: under,
    })
}

/// The pid of `napi/<ifname>-N`, the veth's threaded NAPI kthread.
fn napi_thread(ifname: &str) -> Option<u32> {
    let prefix = format!("napi/{ifname}-");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        comm.trim().starts_with(&prefix).then_some(pid)
    })
}

/// The CPU's busy time so far, in ns: every `/proc/stat` column but idle
/// and iowait (in USER_HZ ticks).
fn cpu_busy_ns(cpu: usize) -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .with_context(|| format!("cpu{cpu} in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(busy * 1_000_000_000 / hz)
}

/// Packets the client's veth handed to the node (`ip -s -j link`).
fn tx_packets(ns: &Netns, ifname: &str) -> Result<u64> {
    tx_stat(ns, ifname, "packets")
}

/// Packets the client's veth could not hand over: the node's receive ring
/// was full.
fn tx_dropped(ns: &Netns, ifname: &str) -> Result<u64> {
    tx_stat(ns, ifname, "dropped")
}

fn tx_stat(ns: &Netns, ifname: &str, what: &str) -> Result<u64> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j")?;
    v[0]["stats64"]["tx"][what]
        .as_u64()
        .with_context(|| format!("tx {what}"))
}

fn mac(ns: &Netns, ifname: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j")?;
    let text = v[0]["address"].as_str().context("no MAC")?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(rows: &[(Config, Result<Figures, String>)], a: &Args) {
    let base = rows.iter().find_map(|(c, r)| match (c, r) {
        (Config::XdpDrop, Ok(f)) => Some(f.ns_per_packet),
        _ => None,
    });
    println!();
    println!(
        "SYN flood from {SOURCES} spoofed sources to the protected port; node receive work on CPU {NODE_CPU} (threaded NAPI), generator on CPU {GENERATOR_CPU}; median of {} windows of {} s",
        a.windows, a.secs
    );
    println!();
    println!(
        "| configuration | offered kpps | reached the node kpps | node CPU busy | node CPU ns per packet | vs trivial XDP_DROP |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (cfg, r) in rows {
        match r {
            Ok(f) => println!(
                "| {} | {:.0} | {:.0} | {:.0}% | {:.0} | {} |",
                cfg.name(),
                f.offered_pps / 1e3,
                f.delivered_pps / 1e3,
                f.node_busy * 100.0,
                f.ns_per_packet,
                base.map_or("-".to_string(), |b| format!("{:.2}x", f.ns_per_packet / b))
            ),
            Err(e) => println!("| {} | - | - | - | - | could not run: {e} |", cfg.name()),
        }
    }
    println!();
    println!(
        "The admitted client (its own address, admitted where the configuration can admit): a TCP upload offered at {OFFERED_MBIT} Mbit/s for {} s with a connect probe every 100 ms, first without the flood, then under a flood offered at {} kpps in every configuration",
        a.secs, a.goodput_kpps
    );
    println!();
    println!(
        "| configuration | goodput Mbit/s, no flood | under flood | ratio | connect p50 / p99 ms, no flood | under flood | probes failed | flood kpps | lost at the node's ring |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (cfg, r) in rows {
        match r {
            Ok(Figures {
                goodput: Some(u), ..
            }) => println!(
                "| {} | {:.0} | {:.0} | {:.0}% | {:.2} / {:.2} | {:.2} / {:.2} | {} of {} | {:.0} | {:.2}% |",
                cfg.name(),
                u.calm.mbit_s,
                u.flood.mbit_s,
                100.0 * u.flood.mbit_s / u.calm.mbit_s.max(f64::MIN_POSITIVE),
                ms(u.calm.connect_p50),
                ms(u.calm.connect_p99),
                ms(u.flood.connect_p50),
                ms(u.flood.connect_p99),
                u.flood.connect_failed,
                u.flood.probes,
                u.offered_pps / 1e3,
                u.ring_drops * 100.0
            ),
            Ok(_) => println!(
                "| {} | - | - | - | - | - | - | - | drops the admitted client too: no per-source allow for a port |",
                cfg.name()
            ),
            Err(_) => println!(
                "| {} | - | - | - | - | - | - | - | could not run |",
                cfg.name()
            ),
        }
    }
    println!();
    println!("configurations as run:");
    for cfg in Config::ALL {
        println!("- {}: `{}`", cfg.name(), cfg.how());
    }
}
