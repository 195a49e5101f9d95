//! Connect latency at scale, `portcullis-bench peers scale`: the ingress
//! program attached natively to a node veth of its own for each fill of
//! the admission table (10, 10,000 and 1,000,000 live admissions, the same
//! objects as `bench xdp`'s scale table, `tests/bench/src/xdp_scale.rs`),
//! the client's address admitted, and real TCP connects from the client's
//! namespace to an echo server on the protected port: each connect is a
//! new flow (admission lookup, flow insert) and its handshake's ACK takes
//! the established path. The fills take turns, a round of connects each,
//! so that the machine's drift hits them alike.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{Xdp, XdpMode};
use portcullis_agent::loader::{Unattached, clock::monotonic_ns};
use portcullis_common::programs;
use portcullis_testkit::{EchoServer, Topology, connect_from, tcp_echo_server};

use crate::{
    support::Row,
    xdp::{PORT, SERVICE},
    xdp_scale::{FILLS, TARGET, object},
};

const ROUNDS: usize = 20;
const PER_ROUND: usize = 50;

/// One fill's connects.
pub struct Level {
    pub admissions: u32,
    pub connect: Row,
}

struct Node {
    fill: u32,
    // Dropped in order: the server, then the program (detached with its
    // object), then the topology.
    _echo: EchoServer,
    _object: Unattached,
    topo: Topology,
    server: SocketAddr,
    lat: Vec<Duration>,
}

pub fn run() -> Result<Vec<Level>> {
    let mut nodes = Vec::new();
    for fill in FILLS {
        let mut k = object(fill)?;
        let topo = Topology::new("bsc")?;
        // The admission the client's connects use (the object's own client
        // is a TEST_RUN address); one more than the fill.
        let hour = monotonic_ns() + 3600 * 1_000_000_000;
        let slot = k
            .maps
            .live_identities()?
            .first()
            .map(|(s, _, _)| *s)
            .context("the scale object has no identity")?;
        k.maps
            .admit(slot, IpAddr::V4(topo.client_v4), SERVICE, 0, hour)?;
        let prog: &mut Xdp = k
            .ebpf
            .program_mut(programs::INGRESS)
            .context("ingress program")?
            .try_into()?;
        let ifname = topo.server_if.clone();
        topo.server
            .run(|| prog.attach(&ifname, XdpMode::Driver))??;
        let server = SocketAddr::new(topo.server_v4.into(), PORT);
        let echo = tcp_echo_server(&topo.server, server)?;
        // The program enforces: the client's second, unadmitted address
        // is dropped, the admitted one gets through.
        let alt = topo.client_alt_addr(false);
        if connect_from(&topo.client, alt, server, Duration::from_millis(300)).is_ok() {
            bail!("scale: a connect from the unadmitted {alt} got through at fill {fill}");
        }
        connect_from(
            &topo.client,
            IpAddr::V4(topo.client_v4),
            server,
            Duration::from_secs(2),
        )
        .with_context(|| format!("scale: the admitted client could not connect at fill {fill}"))?;
        nodes.push(Node {
            fill,
            _echo: echo,
            _object: k,
            topo,
            server,
            lat: Vec::new(),
        });
    }
    for _ in 0..ROUNDS {
        for n in nodes.iter_mut() {
            let to = n.server;
            let got = n.topo.client.run(|| -> Result<Vec<Duration>> {
                (0..PER_ROUND)
                    .map(|_| {
                        let t = Instant::now();
                        TcpStream::connect_timeout(&to, Duration::from_secs(2))
                            .with_context(|| format!("connect to {to}"))?;
                        Ok(t.elapsed())
                    })
                    .collect()
            })??;
            n.lat.extend(got);
        }
    }
    Ok(nodes
        .into_iter()
        .map(|n| Level {
            admissions: n.fill,
            connect: Row::new(n.lat, Duration::from_secs(1)),
        })
        .collect())
}

pub fn print(levels: &[Level]) {
    let Some(first) = levels.first() else {
        return;
    };
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!();
    println!(
        "Connect latency at scale: the ingress program on a node veth, {} connects per fill in {ROUNDS} interleaved rounds",
        ROUNDS * PER_ROUND
    );
    println!();
    println!("| live admissions | connect p50 µs | ratio | connect p99 µs | ratio |");
    println!("|---:|---:|---:|---:|---:|");
    for l in levels {
        println!(
            "| {} | {:.0} | {:.2}x | {:.0} | {:.2}x |",
            l.admissions,
            us(l.connect.pct(0.5)),
            l.connect.pct(0.5).as_secs_f64() / first.connect.pct(0.5).as_secs_f64(),
            us(l.connect.pct(0.99)),
            l.connect.pct(0.99).as_secs_f64() / first.connect.pct(0.99).as_secs_f64(),
        );
    }
    if let Some(last) = levels.last() {
        let r = last.connect.pct(0.5).as_secs_f64() / first.connect.pct(0.5).as_secs_f64();
        println!();
        println!(
            "- {} admissions: connect p50 {r:.2}x the 10-admission node ({}; target at most {TARGET:.2}x)",
            last.admissions,
            if r <= TARGET { "PASS" } else { "MISS" }
        );
    }
}
