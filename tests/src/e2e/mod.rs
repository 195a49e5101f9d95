//! Shared setup for the end-to-end tests (`e2e_*.rs`): a topology, a private
//! bpffs, an agent config and the agent process, plus the agent's one-shot
//! subcommands. The e2e tests use it as `portcullis_e2e::e2e`.
//!
//! The agent binary is `target/<profile>/portcullis`, built by
//! `cargo build --release` (a plain `cargo test --release` of the whole
//! workspace builds it too, because the agent crate has integration tests).
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use portcullis_testkit::{
    self, AgentProcess, BpffsMount, EchoServer, TempDir, Topology, echo_roundtrip,
};

/// The protected service of every test config.
pub const SERVICE: &str = "llm";
pub const PROTECTED_PORT: u16 = 8000;
/// A port no service covers: must pass untouched.
pub const OPEN_PORT: u16 = 8080;
pub const KNOCK_PORT: u16 = 62201;
pub const IDENTITY: &str = "alice";

/// How long a connect may go unanswered before it counts as dropped. A
/// dropped SYN is only retransmitted after 1 s, so this is "no answer".
pub const DROPPED: Duration = Duration::from_secs(1);
/// Generous bound for connects and echoes that must succeed.
pub const OK_TIMEOUT: Duration = Duration::from_secs(3);
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The node binary `portcullis` next to the test executable's directory
/// (`target/release/deps/e2e_x-HASH` → `target/release/portcullis`).
pub fn agent_binary() -> PathBuf {
    workspace_binary("portcullis")
}

/// A binary of another workspace crate (`portcullis`,
/// `portcullis-collector`), built into the same `target/<profile>`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Next to a binary (`portcullis-bench`), or beside `deps/` for a test.
    let here = exe.with_file_name(name);
    let bin = if here.is_file() {
        here
    } else {
        exe.parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps")
            .join(name)
    };
    assert!(
        bin.is_file(),
        "binary {} is missing: run `cargo build --release` first \
         (or `cargo test --release` for the whole workspace)",
        bin.display()
    );
    warn_if_stale(&bin);
    bin
}

/// `cargo test -p portcullis-e2e` does not rebuild the other crates' binaries:
/// say so when a source file is newer than it, so a stale binary does not
/// pass (or fail) the tests unnoticed.
fn warn_if_stale(bin: &Path) {
    fn newest(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                newest(&p, best);
            } else if let Ok(t) = e.metadata().and_then(|m| m.modified())
                && best.as_ref().is_none_or(|(b, _)| t > *b)
            {
                *best = Some((t, p));
            }
        }
    }
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut best = None;
    for dir in [
        "agent/src",
        "ebpf/src",
        "common/src",
        "collector/src",
        "knock/src",
        "trail/src",
    ] {
        newest(&root.join(dir), &mut best);
    }
    if let Some((t, p)) = best
        && t > built
    {
        eprintln!(
            "warning: {} is older than {}; run `cargo build --release` to test the current sources",
            bin.display(),
            p.display()
        );
    }
}

/// Agent tests in one test binary run one at a time: their timing
/// assertions (expiry, revocation, rates) must not compete for the two
/// CPUs with another agent starting up.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Settings that differ between tests; everything else is fixed.
#[derive(Clone, Debug)]
pub struct Settings {
    pub xdp_mode: &'static str,
    pub egress: bool,
    pub knock_per_source: (u32, u32),
    pub knock_global: (u32, u32),
    /// `[limits]` conn_per_sec, conn_burst.
    pub conn_limits: (u32, u32),
    /// `[identities.<name>]` bodies, e.g. ("alice", "conn_per_sec = 10").
    pub identities: Vec<(String, String)>,
    /// Static admissions: identity, source, ttl_secs (service `llm`).
    pub admissions: Vec<(String, IpAddr, u64)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            xdp_mode: "auto",
            egress: true,
            knock_per_source: (5, 10),
            knock_global: (2000, 200),
            conn_limits: (50, 20),
            identities: Vec::new(),
            admissions: Vec::new(),
        }
    }
}

impl Settings {
    pub fn admit(mut self, source: IpAddr, ttl_secs: u64) -> Self {
        self.admissions.push((IDENTITY.into(), source, ttl_secs));
        self
    }

    pub fn identity(mut self, name: &str, body: &str) -> Self {
        self.identities.push((name.into(), body.into()));
        self
    }
}

/// One test's world: topology, bpffs, config file and (maybe) the agent.
/// Fields drop in order: agent killed, then bpffs unmounted (pins gone),
/// then veth and namespaces deleted, then the config directory removed.
pub struct Env {
    pub agent: Option<AgentProcess>,
    pub bpffs: BpffsMount,
    pub topo: Topology,
    pub config: PathBuf,
    pub binary: PathBuf,
    dir: TempDir,
}

impl Env {
    /// Topology, bpffs and config; no agent yet.
    pub fn new(name: &str, settings: &Settings) -> Env {
        let binary = agent_binary();
        let topo = Topology::new(name).expect("topology");
        let bpffs = BpffsMount::new().expect("bpffs mount");
        let dir = TempDir::new("e2e").expect("temp dir");
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, config_text(&topo, &bpffs, dir.path(), settings))
            .expect("write config");
        Env {
            agent: None,
            bpffs,
            topo,
            config,
            binary,
            dir,
        }
    }

    /// `new` plus a started agent; asserts it comes up `fresh`.
    pub fn with_agent(name: &str, settings: &Settings) -> Env {
        let mut env = Env::new(name, settings);
        let origin = env.start_agent();
        assert_eq!(origin, "fresh", "first start loads the programs fresh");
        env
    }

    /// Starts the agent in the server namespace; returns its origin word.
    pub fn start_agent(&mut self) -> String {
        assert!(self.agent.is_none(), "agent already running");
        let mut agent = AgentProcess::spawn(&self.binary, &self.topo.server, &self.config, &[])
            .expect("spawn agent");
        let origin = agent
            .wait_ready(READY_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        self.agent = Some(agent);
        origin
    }

    pub fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("agent running")
    }

    /// This test's own directory: config, node key, audit spool, ledger.
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `portcullis agent SUB --config F ARGS...` in the server namespace.
    pub fn cli(&self, sub: &str, args: &[&str]) -> Output {
        let config = self.config.to_str().expect("utf-8 path");
        let mut all = vec!["agent", sub, "--config", config];
        all.extend_from_slice(args);
        portcullis_testkit::run_in(&self.topo.server, &self.binary, &all).expect("run portcullis")
    }

    /// Like `cli` but asserts success; returns stdout.
    pub fn cli_ok(&self, sub: &str, args: &[&str]) -> String {
        let out = self.cli(sub, args);
        assert!(
            out.status.success(),
            "`portcullis agent {sub} {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Counters from `agent status --json`, named as the text form names
    /// them (`reason_name`, `shadow_reason`, `identities`, `admissions`,
    /// `flows`, `audit_spool_bytes`, `audit_last_seq`).
    pub fn status(&self) -> BTreeMap<String, u64> {
        status_from_json(&self.cli_ok("status", &["--json"]))
    }

    /// Every event in the agent's audit spool, decoded, in seq order.
    pub fn spool_events(&self) -> Vec<portcullis_proto::v1::Event> {
        use prost::Message as _;
        let dir = self.state_dir().join("spool");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        paths.retain(|p| p.extension().is_some_and(|x| x == "pcs"));
        paths.sort();
        let mut out = Vec::new();
        for p in paths {
            let seg = portcullis_trail::frame::read_segment_file(&p).expect("read segment");
            for f in seg.frames {
                out.push(portcullis_proto::v1::Event::decode(f.as_slice()).expect("decode event"));
            }
        }
        out.sort_by_key(|e| e.seq);
        out
    }

    /// Rewrites the config file (the agent reads it at its next start).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        std::fs::write(&self.config, edit(text)).expect("write config");
    }

    pub fn echo_server(&self, v6: bool, port: u16) -> EchoServer {
        let addr = SocketAddr::new(self.topo.server_addr(v6), port);
        portcullis_testkit::tcp_echo_server(&self.topo.server, addr).expect("echo server")
    }

    pub fn server(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.server_addr(v6), port)
    }

    /// Connects from the client's main address.
    pub fn connect(&self, v6: bool, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        portcullis_testkit::try_connect(&self.topo.client, self.server(v6, port), timeout)
    }

    /// Connects from the client's second (never admitted) address.
    pub fn connect_alt(&self, v6: bool, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        let src = self.topo.client_alt_addr(v6);
        portcullis_testkit::connect_from(&self.topo.client, src, self.server(v6, port), timeout)
    }

    /// Asserts that a connect from the main address gets through and echoes.
    pub fn assert_echo(&self, v6: bool, port: u16, what: &str) {
        let mut s = self
            .connect(v6, port, OK_TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: connect to {} failed: {e}", self.server(v6, port)));
        echo_roundtrip(&mut s, b"ping", OK_TIMEOUT).unwrap_or_else(|e| panic!("{what}: echo: {e}"));
    }

    /// Asserts that a connect gets no answer at all (dropped, not refused).
    pub fn assert_dropped(&self, v6: bool, port: u16, alt: bool, what: &str) {
        let r = if alt {
            self.connect_alt(v6, port, DROPPED)
        } else {
            self.connect(v6, port, DROPPED)
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{what}: expected a silent drop (timeout), got error: {e}"),
            Ok(_) => panic!(
                "{what}: connect to {} unexpectedly succeeded",
                self.server(v6, port)
            ),
        }
    }
}

/// `agent status --json` as `parse_status` reads the text form.
pub fn status_from_json(text: &str) -> BTreeMap<String, u64> {
    let v: serde_json::Value = serde_json::from_str(text).expect("agent status --json");
    let mut m = BTreeMap::new();
    for (k, n) in v["drops"].as_object().expect("drops") {
        m.insert(k.clone(), n.as_u64().expect("count"));
    }
    for (k, n) in v["shadow_drops"].as_object().expect("shadow_drops") {
        let n = n.as_u64().expect("count");
        if n > 0 {
            m.insert(format!("shadow_{k}"), n);
        }
    }
    for k in ["identities", "admissions"] {
        m.insert(k.to_string(), v[k].as_array().expect(k).len() as u64);
    }
    for k in ["flows", "audit_spool_bytes", "audit_last_seq"] {
        m.insert(k.to_string(), v[k].as_u64().expect(k));
    }
    m
}

pub fn parse_status(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (name, count) = (it.next()?, it.next()?);
            if it.next().is_some() {
                return None;
            }
            Some((name.to_owned(), count.parse().ok()?))
        })
        .collect()
}

/// The `[agent]`, `[audit]`, `[accounting]` and `[control]` sections that
/// put the node key, the spool, the ledger and the control socket under
/// `dir` (`node_id` absent: the hostname), so agents never share a path.
pub fn state_sections(node_id: Option<&str>, dir: &Path) -> String {
    let id = node_id.map_or_else(String::new, |n| format!("node_id = \"{n}\"\n"));
    format!(
        "[agent]\n{id}node_key = \"{dir}/node.key\"\n\n[audit]\nspool_dir = \"{dir}/spool\"\n\n[accounting]\nledger = \"{dir}/ledger.json\"\n\n[control]\nsocket = \"{dir}/control.sock\"\n\n",
        dir = dir.display()
    )
}

pub fn config_text(topo: &Topology, bpffs: &BpffsMount, state: &Path, s: &Settings) -> String {
    let mut t = state_sections(Some(&format!("e2e-{}", topo.index)), state);
    let _ = write!(
        t,
        r#"[kernel]
interfaces = ["{iface}"]
xdp_mode = "{mode}"
egress = {egress}
pin_dir = "{pin_dir}"
bpffs = "{bpffs}"

[knock]
port = {knock}
per_source_per_sec = {ksr}
per_source_burst = {ksb}
global_per_sec = {kgr}
global_burst = {kgb}

[limits]
conn_per_sec = {cr}
conn_burst = {cb}
bytes_per_sec = 0
bytes_burst = 1048576

[[services]]
name = "{SERVICE}"
protocol = "tcp"
port = {PROTECTED_PORT}
"#,
        iface = topo.server_if,
        mode = s.xdp_mode,
        egress = s.egress,
        pin_dir = bpffs.pin_dir().display(),
        bpffs = bpffs.path().display(),
        knock = KNOCK_PORT,
        ksr = s.knock_per_source.0,
        ksb = s.knock_per_source.1,
        kgr = s.knock_global.0,
        kgb = s.knock_global.1,
        cr = s.conn_limits.0,
        cb = s.conn_limits.1,
    );
    for (name, body) in &s.identities {
        let _ = write!(t, "\n[identities.{name}]\n{body}\n");
    }
    for (identity, source, ttl) in &s.admissions {
        let _ = write!(
            t,
            "\n[[admissions]]\nidentity = \"{identity}\"\nsource = \"{source}\"\nservice = \"{SERVICE}\"\nttl_secs = {ttl}\n"
        );
    }
    t
}

/// Echoes on `stream` every `pace` on its own thread until the first
/// failure or `deadline`; the shared counter shows progress.
pub struct EchoLoop {
    pub ok: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<EchoOutcome>>,
}

#[derive(Debug)]
pub struct EchoOutcome {
    pub ok: u32,
    /// Start of the first iteration whose echo failed, and the error.
    pub failed_at: Option<(Instant, String)>,
    pub longest_gap: Duration,
}

pub const ECHO_PACE: Duration = Duration::from_millis(5);
/// An echo on a veth returns in well under a millisecond; no answer in
/// this long means the data was dropped.
pub const ECHO_TIMEOUT: Duration = Duration::from_millis(200);

impl EchoLoop {
    pub fn start(mut stream: TcpStream, deadline: Instant) -> EchoLoop {
        let ok = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (ok, stop) = (ok.clone(), stop.clone());
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut out = EchoOutcome {
                    ok: 0,
                    failed_at: None,
                    longest_gap: Duration::ZERO,
                };
                let mut last_ok = Instant::now();
                let mut i: u64 = 0;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let payload = i.to_be_bytes();
                    i += 1;
                    match echo_roundtrip(&mut stream, &payload, ECHO_TIMEOUT) {
                        Ok(()) => {
                            out.ok += 1;
                            ok.store(out.ok, Ordering::Relaxed);
                            out.longest_gap = out.longest_gap.max(started.duration_since(last_ok));
                            last_ok = started;
                        }
                        Err(e) => {
                            out.failed_at = Some((started, e.to_string()));
                            break;
                        }
                    }
                    // Pacing, not waiting for a condition: one echo per tick.
                    let next = started + ECHO_PACE;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                out
            })
        };
        EchoLoop {
            ok,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until at least `n` echoes succeeded.
    pub fn wait_for(&self, n: u32, timeout: Duration) -> bool {
        portcullis_testkit::poll_until(timeout, || {
            (self.ok.load(Ordering::Relaxed) >= n).then_some(())
        })
        .is_some()
    }

    /// Stops the loop after its current iteration and returns the outcome.
    pub fn stop(self) -> EchoOutcome {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for the loop to end by itself (failure or deadline).
    pub fn join(mut self) -> EchoOutcome {
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("echo loop panicked")
    }
}

impl Drop for EchoLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- knock admission (e2e_knock.rs) -----------------------------------------

pub mod collector;
pub mod control;
pub mod knock;
pub mod metrics;
