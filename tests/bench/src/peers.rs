//! `portcullis-bench peers [--secs N] [--windows N]`: what a SYN flood from
//! many spoofed sources costs the node under portcullis and under the
//! filters it is compared with, in one run with the same traffic.
//!
//! Each configuration gets a fresh client and node namespace joined by a
//! veth (the e2e harness). The node's receive work runs in its veth's
//! threaded NAPI kthread, pinned to CPU 1; the generator, an AF_PACKET
//! sender of pre-built SYNs from 65,536 sources (172.16.0.0/16) to the
//! protected port, runs on CPU 0; RPS steers the node's backlog (the path
//! without XDP) to CPU 1 as well. Node CPU per packet is CPU 1's busy time
//! (`/proc/stat`) over the packets the veth delivered to the node, median
//! of the windows. Configurations,
//! each as its documentation recommends for dropping a port's traffic
//! from unknown sources:
//!
//! - no filter: the kernel's own stack (no listener: it answers RST);
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
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{Xdp, XdpMode};
use portcullis_agent::loader::Unattached;
use portcullis_common::programs;
use portcullis_e2e::e2e::{Env, PROTECTED_PORT, Settings};
use portcullis_testkit::{Netns, poll_until};

use crate::{
    flood::{SOURCES, flood, frames, pin},
    support::number,
};

pub const USAGE: &str = "usage: portcullis-bench peers [--secs N] [--windows N]
  --secs N     seconds per measurement window (default 5)
  --windows N  windows per configuration, median reported (default 3)";

/// Spoofed sources: 172.16.0.0/16.
const GENERATOR_CPU: usize = 0;
const NODE_CPU: usize = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Config {
    Stack,
    Iptables,
    Nftables,
    XdpFilter,
    XdpDrop,
    Portcullis,
}

impl Config {
    const ALL: [Config; 6] = [
        Config::Stack,
        Config::Iptables,
        Config::Nftables,
        Config::XdpFilter,
        Config::XdpDrop,
        Config::Portcullis,
    ];

    fn name(self) -> &'static str {
        match self {
            Config::Stack => "no filter (kernel stack)",
            Config::Iptables => "iptables raw + ipset",
            Config::Nftables => "nftables netdev ingress + set",
            Config::XdpFilter => "xdp-filter (xdp-tools), native",
            Config::XdpDrop => "trivial XDP_DROP",
            Config::Portcullis => "portcullis (port-wide service, no admissions)",
        }
    }

    /// As run, for the report.
    fn how(self) -> &'static str {
        match self {
            Config::Stack => "nothing loaded; no listener on the port",
            Config::Iptables => {
                "ipset create allow hash:ip; iptables -t raw -A PREROUTING -p tcp --dport 8000 -m set ! --match-set allow src -j DROP"
            }
            Config::Nftables => {
                "table netdev f { set allow { type ipv4_addr; }; chain in { type filter hook ingress device IF priority -500; tcp dport 8000 ip saddr != @allow drop; } }"
            }
            Config::XdpFilter => "xdp-filter load IF -m native; xdp-filter port 8000 -m dst",
            Config::XdpDrop => "portcullis_baseline_drop (returns XDP_DROP), XDP native",
            Config::Portcullis => "portcullis agent, [[services]] llm tcp 8000, xdp_mode auto",
        }
    }
}

struct Args {
    secs: u64,
    windows: usize,
}

pub fn main(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut a = Args {
        secs: 5,
        windows: 3,
    };
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--secs" => a.secs = number("--secs", args.next(), 1..=60)?,
            "--windows" => a.windows = number("--windows", args.next(), 1..=15)? as usize,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        bail!("peers needs two CPUs: one for the generator, one for the node");
    }
    let mut rows = Vec::new();
    for cfg in Config::ALL {
        eprintln!("peers: {} ...", cfg.name());
        match measure(cfg, &a) {
            Ok(r) => rows.push((cfg, Ok(r))),
            Err(e) => rows.push((cfg, Err(format!("{e:#}")))),
        }
    }
    report(&rows, &a);
    Ok(())
}

/// One configuration's result: medians over the windows.
struct Figures {
    offered_pps: f64,
    delivered_pps: f64,
    ns_per_packet: f64,
    /// The node CPU's busy share: near 100% means it, not the generator,
    /// set the rate.
    node_busy: f64,
}

fn measure(cfg: Config, a: &Args) -> Result<Figures> {
    let mut env = Env::new("peers", &Settings::default());
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

    let server_mac = mac(&env.topo.server, &node_if)?;
    let client_mac = mac(&env.topo.client, &env.topo.client_if)?;
    let frames = Arc::new(frames(server_mac, client_mac, env.topo.server_v4));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let total = Duration::from_secs(a.secs * a.windows as u64 + 2);
    let generator = {
        let (frames, stop, sent) = (frames.clone(), stop.clone(), sent.clone());
        let client_if = env.topo.client_if.clone();
        let client = env.topo.client.path();
        std::thread::spawn(move || -> Result<()> {
            portcullis_testkit::enter_path(&client)?;
            pin(GENERATOR_CPU)?;
            flood(&client_if, &frames, &stop, &sent, total)
        })
    };
    // A second of warm-up, then the windows.
    std::thread::sleep(Duration::from_secs(1));
    let mut offered = Vec::new();
    let mut delivered = Vec::new();
    let mut per_packet = Vec::new();
    let mut busy = Vec::new();
    for _ in 0..a.windows {
        let (s0, t0, r0) = (
            sent.load(Ordering::Relaxed),
            tx_packets(&env.topo.client, &env.topo.client_if)?,
            cpu_busy_ns(NODE_CPU)?,
        );
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(a.secs));
        let secs = start.elapsed().as_secs_f64();
        let (s1, t1, r1) = (
            sent.load(Ordering::Relaxed),
            tx_packets(&env.topo.client, &env.topo.client_if)?,
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
    stop.store(true, Ordering::Relaxed);
    generator
        .join()
        .map_err(|_| anyhow::anyhow!("the generator panicked"))??;
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
    })
}

/// What a configuration loaded; removed on drop (the namespace's deletion
/// removes rules and sets; XDP programs go with the veth).
struct Installed {
    xdp_filter_if: Option<(String, String)>,
    xdp_drop: Option<Unattached>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some((ns, ifname)) = &self.xdp_filter_if {
            let _ = Command::new("nsenter")
                .args([
                    &format!("--net=/run/netns/{ns}"),
                    "xdp-filter",
                    "unload",
                    ifname,
                ])
                .output();
        }
    }
}

fn install(cfg: Config, env: &mut Env, ns: &str, ifname: &str) -> Result<Installed> {
    let mut out = Installed {
        xdp_filter_if: None,
        xdp_drop: None,
    };
    let client = env.topo.client_v4.to_string();
    let in_ns = |args: &[&str]| -> Result<()> {
        run(Command::new("ip").args(["netns", "exec", ns]).args(args))
    };
    match cfg {
        Config::Stack => {}
        Config::Iptables => {
            in_ns(&["ipset", "create", "allow", "hash:ip"])?;
            in_ns(&["ipset", "add", "allow", &client])?;
            in_ns(&[
                "iptables",
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "8000",
                "-m",
                "set",
                "!",
                "--match-set",
                "allow",
                "src",
                "-j",
                "DROP",
            ])?;
        }
        Config::Nftables => {
            let rules = format!(
                "table netdev pcl {{\n  set allow {{\n    type ipv4_addr\n    elements = {{ {client} }}\n  }}\n  chain ingress {{\n    type filter hook ingress device {ifname} priority -500; policy accept;\n    tcp dport {PROTECTED_PORT} ip saddr != @allow drop\n  }}\n}}\n"
            );
            let file = std::env::temp_dir().join(format!("pcl-peers-{}.nft", std::process::id()));
            std::fs::write(&file, rules)?;
            let r = in_ns(&["nft", "-f", &file.to_string_lossy()]);
            let _ = std::fs::remove_file(&file);
            r?;
        }
        Config::XdpFilter => {
            // nsenter keeps the host's mounts (xdp-filter pins in bpffs).
            let nsx = |args: &[&str]| -> Result<()> {
                run(Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(args))
            };
            nsx(&["xdp-filter", "load", ifname, "-m", "native"])?;
            out.xdp_filter_if = Some((ns.to_string(), ifname.to_string()));
            nsx(&[
                "xdp-filter",
                "port",
                &PROTECTED_PORT.to_string(),
                "-m",
                "dst",
            ])?;
        }
        Config::XdpDrop => {
            // The object's own baseline program, attached natively from a
            // thread inside the node's namespace; detached when the object
            // is dropped with the guard.
            let mut k = Unattached::load().context("load the eBPF object")?;
            let prog: &mut Xdp = k
                .ebpf
                .program_mut(programs::BASELINE_DROP)
                .context("baseline program")?
                .try_into()?;
            let ifname = ifname.to_string();
            env.topo
                .server
                .run(|| prog.attach(&ifname, XdpMode::Driver))??;
            out.xdp_drop = Some(k);
        }
        Config::Portcullis => {
            env.start_agent();
        }
    }
    Ok(out)
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
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j")?;
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .context("tx packets")
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
    println!("configurations as run:");
    for cfg in Config::ALL {
        println!("- {}: `{}`", cfg.name(), cfg.how());
    }
}
