//! `portcullis-demo`: the whole story in two network namespaces on the
//! embedded defaults, checking each claim as it goes. Nothing touches the
//! host's interfaces; every namespace, mount and process is removed on exit,
//! also on failure.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use portcullis_testkit::{
    AgentProcess, BpffsMount, TempDir, Topology, connect_from, echo_roundtrip, poll_until, run_in,
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
fn config(topo: &Topology, bpffs: &BpffsMount, dir: &Path) -> String {
    let state = crate::e2e::state_sections(None, dir);
    format!(
        r#"# portcullis demo configuration (generated)
{state}[kernel]
interfaces = ["{iface}"]
pin_dir = "{pin}"
bpffs = "{fs}"

[tokens]
jwks_file = "{dir}/issuer/jwks.json"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
revocations_file = "{dir}/revocations"

[[services]]
name = "llm"
protocol = "tcp"
port = {MODEL_PORT}
"#,
        dir = dir.display(),
        iface = topo.server_if,
        pin = bpffs.pin_dir().display(),
        fs = bpffs.path().display(),
    )
}

const ISSUER: &str = "https://demo-issuer.invalid";
const AUDIENCE: &str = "portcullis-demo";

/// A development token for `subject` with one scope, written to a file.
fn mint(dir: &Path, subject: &str, scope: &str) -> anyhow::Result<PathBuf> {
    let token = crate::devtoken::mint(
        &dir.join("issuer/issuer.key"),
        crate::devtoken::MintClaims {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            subject: subject.into(),
            tenant: Some("acme".into()),
            client_id: None,
            roles: vec![],
            scopes: vec![scope.into()],
            ttl: Duration::from_secs(120),
            cnf_jkt: None,
        },
    )?;
    let path = dir.join(format!("{subject}.jwt"));
    std::fs::write(&path, token)?;
    Ok(path)
}

struct Demo {
    exe: PathBuf,
    cfg: PathBuf,
    topo: Topology,
    dir: PathBuf,
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

    /// `portcullis knock` from the client namespace; true when admitted.
    fn knock(&self, token: &Path) -> anyhow::Result<bool> {
        let server = self.topo.server_v4.to_string();
        let token = token.to_string_lossy().into_owned();
        let args = ["knock", "--token-file", &token, "--service", "llm"];
        let quick = ["--timeout-ms", "500", "--retries", "0", &server];
        let out = run_in(
            &self.topo.client,
            &self.exe,
            &[&args[..], &quick[..]].concat(),
        )?;
        Ok(out.status.success())
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

/// Runs the demo with the node binary `agent_bin` (default: `portcullis`
/// next to the running program).
pub fn run(agent_bin: Option<PathBuf>) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF: run it as root");
    }
    let exe = match agent_bin {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this program")?
            .with_file_name("portcullis"),
    };
    if !exe.is_file() {
        bail!(
            "the node binary {} is missing: build it (`cargo build --release -p portcullis-agent`) or give --agent-bin PATH",
            exe.display()
        );
    }
    println!("portcullis demo: a client and a model server in two network namespaces\n");
    let topo = Topology::new("demo").context("creating the demo namespaces")?;
    let bpffs = BpffsMount::new().context("mounting a private bpffs")?;
    let dir = TempDir::new("demo").context("creating a temp dir")?;
    let cfg = dir.path().join("agent.toml");
    crate::devtoken::keygen(&dir.path().join("issuer")).context("creating a development issuer")?;
    std::fs::write(&cfg, config(&topo, &bpffs, dir.path()))?;
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
        dir: dir.path().to_path_buf(),
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

    println!("\n2. clients knock with tokens from a (development) issuer");
    let mallory = mint(&d.dir, "mallory", "model:other:invoke")?;
    d.step(
        "mallory's token does not grant llm: the knock gets no answer",
        !d.knock(&mallory)?,
    );
    d.step(
        &format!("port {MODEL_PORT} still closed to {client}"),
        !d.reachable(MODEL_PORT),
    );
    let alice = mint(&d.dir, "alice", "model:llm:invoke")?;
    d.step(
        "alice's token (model:llm:invoke) is admitted by one knock",
        d.knock(&alice)?,
    );
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

    println!("\n4. alice (every token of hers) is revoked while connected");
    let addr = SocketAddr::new(d.topo.server_v4.into(), MODEL_PORT);
    let mut conn = try_connect(&d.topo.client, addr, DARK)?;
    d.step(
        "established connection works",
        echo_roundtrip(&mut conn, b"one", DARK).is_ok(),
    );
    d.ctl(&["revoke", "--subject", "alice"])?;
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
    // The revocation reaches the running agent's token checks through the
    // revocations file, which it re-reads every second.
    let applied = poll_until(Duration::from_secs(3), || {
        agent.log().contains("revocations applied").then_some(())
    });
    d.step(
        "the agent applied the revocation (re-read within 1 s)",
        applied.is_some(),
    );
    d.step("alice's knock is now refused", !d.knock(&alice)?);

    println!("\n5. what the kernel counted (portcullis agent status)");
    for line in d.ctl(&["status"])?.lines() {
        if !line.ends_with(" 0") {
            println!("     {line}");
        }
    }
    agent.terminate(Duration::from_secs(5))?;

    println!(
        "\n6. the audit trail: hash-chained, signed, verified offline (portcullis audit verify)"
    );
    audit_trail(d)?;
    Ok(())
}

/// Verifies the agent's spool the way `portcullis audit verify` does and
/// checks it holds what the story did.
fn audit_trail(d: &mut Demo) -> anyhow::Result<()> {
    use portcullis_collector::evidence;
    use portcullis_proto::v1::{Event, event::Body};
    use portcullis_trail::frame::read_segment_file;
    use prost::Message as _;

    let spool_dir = d.dir.join("spool");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&spool_dir)
        .with_context(|| format!("reading {}", spool_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pcs"))
        .collect();
    files.sort();
    // The node's key from its key file, not from the trail: the checkpoints
    // then prove who wrote it.
    let cfg = portcullis_agent::config::Config::load(Path::new(&d.cfg))?;
    let key = portcullis_trail::node_key::NodeKey::load(&cfg.agent.node_key)?.public_key();
    let mut opts = evidence::VerifyOptions::new(files.clone());
    opts.pinned.insert(cfg.agent.node_id.clone(), key);
    let report = evidence::verify_files(&opts)?;
    let (mut granted, mut denied, mut revoked, mut lifecycle) = (0, 0, 0, 0);
    for f in &files {
        for bytes in read_segment_file(f)?.frames {
            match Event::decode(bytes.as_slice()).ok().and_then(|e| e.body) {
                Some(Body::AdmissionGranted(_)) => granted += 1,
                Some(Body::AdmissionDenied(_)) => denied += 1,
                Some(Body::Revocation(_)) => revoked += 1,
                Some(Body::Lifecycle(_)) => lifecycle += 1,
                _ => {}
            }
        }
    }
    let events: u64 = report.nodes.iter().map(|n| n.events).sum();
    println!(
        "     {events} events: {granted} admission granted (alice), {denied} denied (mallory), \
         {revoked} revocation, {lifecycle} starts/stops"
    );
    d.step(
        "every event chains to the one before and the checkpoints verify",
        report.is_clean() && events > 0,
    );
    d.step(
        "alice's admission, mallory's refusal, the revocation and the restart are on record",
        granted >= 1 && denied >= 1 && revoked >= 1 && lifecycle >= 3,
    );
    Ok(())
}

fn start_agent(d: &Demo) -> anyhow::Result<AgentProcess> {
    AgentProcess::spawn(&d.exe, &d.topo.server, Path::new(&d.cfg), &[])
        .context("starting the agent")
}
