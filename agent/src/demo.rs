//! `portcullis demo`: the whole story in two network namespaces on the
//! embedded defaults, checking each claim as it goes. Nothing touches the
//! host's interfaces; every namespace, mount and process is removed on exit,
//! also on failure.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::netns::{
    AgentProcess, BpffsMount, TempDir, Topology, connect_from, echo_roundtrip, run_in,
    tcp_echo_server, try_connect,
};

const MODEL_PORT: u16 = 8000;
const OPEN_PORT: u16 = 8080;
/// A dropped SYN is retransmitted after a second: half a second without an
/// answer means the port is dark.
const DARK: Duration = Duration::from_millis(500);
const READY: Duration = Duration::from_secs(20);

/// The demo's agent config: the example's defaults with the demo's veth and
/// a private bpffs.
fn config(topo: &Topology, bpffs: &BpffsMount) -> String {
    format!(
        r#"# portcullis demo configuration (generated)
[kernel]
interfaces = ["{iface}"]
pin_dir = "{pin}"
bpffs = "{fs}"

[[services]]
name = "llm"
protocol = "tcp"
port = {MODEL_PORT}
"#,
        iface = topo.server_if,
        pin = bpffs.pin_dir().display(),
        fs = bpffs.path().display(),
    )
}

struct Demo {
    exe: PathBuf,
    cfg: PathBuf,
    topo: Topology,
    failures: u32,
}

impl Demo {
    fn step(&mut self, claim: &str, ok: bool) {
        println!("  [{}] {claim}", if ok { " ok " } else { "FAIL" });
        if !ok {
            self.failures += 1;
        }
    }

    fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let cfg = self.cfg.to_string_lossy().into_owned();
        let mut full = vec!["agent"];
        full.extend_from_slice(&args[..1]);
        full.extend_from_slice(&["--config", &cfg]);
        full.extend_from_slice(&args[1..]);
        let out = run_in(&self.topo.server, &self.exe, &full)?;
        if !out.status.success() {
            bail!(
                "portcullis {}: {}",
                full.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn reachable(&self, port: u16) -> bool {
        let addr = SocketAddr::new(self.topo.server_v4.into(), port);
        answered(try_connect(&self.topo.client, addr, DARK))
    }

    /// From the client namespace's second, never admitted, address.
    fn reachable_from_other(&self, port: u16) -> bool {
        let addr = SocketAddr::new(self.topo.server_v4.into(), port);
        let src = self.topo.client_v4_alt.into();
        answered(connect_from(&self.topo.client, src, addr, DARK))
    }
}

fn answered(conn: std::io::Result<std::net::TcpStream>) -> bool {
    match conn {
        Ok(mut s) => echo_roundtrip(&mut s, b"ping", DARK).is_ok(),
        Err(_) => false,
    }
}

pub fn run() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF: run it as root");
    }
    let exe = std::env::current_exe().context("locating the portcullis binary")?;
    println!("portcullis demo: a client and a model server in two network namespaces\n");
    let topo = Topology::new("demo").context("creating the demo namespaces")?;
    let bpffs = BpffsMount::new().context("mounting a private bpffs")?;
    let dir = TempDir::new("demo").context("creating a temp dir")?;
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, config(&topo, &bpffs))?;
    println!(
        "client {} --veth--> server {} (XDP on {}); model port {MODEL_PORT} protected, {OPEN_PORT} not",
        topo.client_v4, topo.server_v4, topo.server_if
    );
    let servers = [MODEL_PORT, OPEN_PORT]
        .map(|p| tcp_echo_server(&topo.server, SocketAddr::new(topo.server_v4.into(), p)));
    for s in &servers {
        if let Err(e) = s {
            bail!("starting an echo server: {e}");
        }
    }
    let mut demo = Demo {
        exe,
        cfg,
        topo,
        failures: 0,
    };
    let result = story(&mut demo);
    drop(servers);
    let _ = demo.ctl(&["detach"]);
    result?;
    println!();
    if demo.failures > 0 {
        bail!("{} demo step(s) failed", demo.failures);
    }
    println!("demo complete: every step behaved as claimed; namespaces and pins removed");
    Ok(())
}

fn story(d: &mut Demo) -> anyhow::Result<()> {
    let client = d.topo.client_v4.to_string();
    println!("\n1. the agent loads the XDP/TC programs and pins them");
    let mut agent = start_agent(d)?;
    let origin = agent.wait_ready(READY).context("waiting for the agent")?;
    d.step(
        &format!("agent enforcing (origin: {origin})"),
        origin == "fresh",
    );
    d.step(
        &format!("port {OPEN_PORT} (unprotected) answers"),
        d.reachable(OPEN_PORT),
    );
    d.step(
        &format!("port {MODEL_PORT} looks closed: the SYN is dropped, no RST"),
        !d.reachable(MODEL_PORT),
    );

    println!("\n2. alice is admitted from {client} for 60 s");
    d.ctl(&[
        "admit",
        "--identity",
        "alice",
        "--source",
        &client,
        "--service",
        "llm",
        "--ttl-secs",
        "60",
    ])?;
    d.step(
        &format!("port {MODEL_PORT} answers alice"),
        d.reachable(MODEL_PORT),
    );

    println!("\n3. the agent is killed with SIGKILL: the kernel keeps enforcing");
    agent.kill9()?;
    d.step(
        "admitted client still served while the agent is dead",
        d.reachable(MODEL_PORT),
    );
    d.step(
        &format!(
            "another client ({}) still dropped while the agent is dead",
            d.topo.client_v4_alt
        ),
        !d.reachable_from_other(MODEL_PORT),
    );
    let mut agent = start_agent(d)?;
    let origin = agent
        .wait_ready(READY)
        .context("waiting for the restarted agent")?;
    d.step(
        &format!("restarted agent adopts the pinned state (origin: {origin})"),
        origin == "adopted",
    );

    println!("\n4. alice is revoked while connected");
    let addr = SocketAddr::new(d.topo.server_v4.into(), MODEL_PORT);
    let mut conn = try_connect(&d.topo.client, addr, DARK)?;
    d.step(
        "established connection works",
        echo_roundtrip(&mut conn, b"one", DARK).is_ok(),
    );
    d.ctl(&["revoke", "--identity", "alice"])?;
    let cut = Instant::now();
    let deadline = cut + Duration::from_secs(2);
    let mut cut_after = None;
    while Instant::now() < deadline {
        if echo_roundtrip(&mut conn, b"more", Duration::from_millis(100)).is_err() {
            cut_after = Some(cut.elapsed());
            break;
        }
    }
    let when = match cut_after {
        Some(t) => format!("{} ms", t.as_millis()),
        None => "never (within 2 s)".into(),
    };
    d.step(
        &format!("established connection cut {when} after revocation (bound: 1 s)"),
        cut_after.is_some_and(|t| t <= Duration::from_secs(1)),
    );
    d.step(
        &format!("port {MODEL_PORT} dark again"),
        !d.reachable(MODEL_PORT),
    );

    println!("\n5. what the kernel counted (portcullis agent status)");
    for line in d.ctl(&["status"])?.lines() {
        if !line.ends_with(" 0") {
            println!("     {line}");
        }
    }
    agent.terminate(Duration::from_secs(5))?;
    Ok(())
}

fn start_agent(d: &Demo) -> anyhow::Result<AgentProcess> {
    AgentProcess::spawn(&d.exe, &d.topo.server, Path::new(&d.cfg), &[])
        .context("starting the agent")
}
