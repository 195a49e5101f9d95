//! Shared setup for the end-to-end tests (`e2e_*.rs`): a topology, a private
//! bpffs, an agent config and the agent process, plus the agent's one-shot
//! subcommands. Every e2e test file includes it with `mod e2e_support;`.
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

use portcullis_agent::netns::{
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

/// The agent binary next to the test executable's directory
/// (`target/release/deps/e2e_x-HASH` → `target/release/portcullis`).
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join("portcullis");
    assert!(
        bin.is_file(),
        "agent binary {} is missing: run `cargo build --release` first \
         (or `cargo test --release` for the whole workspace)",
        bin.display()
    );
    warn_if_stale(&bin);
    bin
}

/// `cargo test -p portcullis-tests` does not rebuild the agent binary:
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
    for dir in ["agent/src", "ebpf/src", "common/src"] {
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
        netns::run_in(&self.topo.server, &self.binary, &all).expect("run portcullis")
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

    /// Counters from `agent status`: `reason_name count` lines.
    pub fn status(&self) -> BTreeMap<String, u64> {
        parse_status(&self.cli_ok("status", &[]))
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
            let seg = portcullis_agent::audit::spool::read_segment_file(&p).expect("read segment");
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
        netns::tcp_echo_server(&self.topo.server, addr).expect("echo server")
    }

    pub fn server(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.server_addr(v6), port)
    }

    /// Connects from the client's main address.
    pub fn connect(&self, v6: bool, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        netns::try_connect(&self.topo.client, self.server(v6, port), timeout)
    }

    /// Connects from the client's second (never admitted) address.
    pub fn connect_alt(&self, v6: bool, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        let src = self.topo.client_alt_addr(v6);
        netns::connect_from(&self.topo.client, src, self.server(v6, port), timeout)
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

pub fn config_text(topo: &Topology, bpffs: &BpffsMount, state: &Path, s: &Settings) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        r#"[agent]
node_id = "e2e-{index}"
node_key = "{state}/node.key"

[audit]
spool_dir = "{state}/spool"

[accounting]
ledger = "{state}/ledger.json"

[kernel]
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
        index = topo.index,
        state = state.display(),
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
        netns::poll_until(timeout, || {
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

/// Setup for the knock tests: an agent with a `[tokens]` section whose JWKS
/// is a development issuer's (`portcullis_agent::devtoken`), tokens minted
/// into a temporary directory, the real `portcullis knock` CLI run in the
/// client namespace, and raw knock datagrams sent from sockets created in
/// the client namespace.
pub mod knock {
    use std::{
        fmt::Write as _,
        io, mem,
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
        os::fd::AsRawFd,
        path::PathBuf,
        process::Output,
        sync::atomic::{AtomicU32, Ordering},
        time::{Duration, Instant, SystemTime},
    };

    use portcullis_agent::{
        admission::knock::{KnockOptions, KnockReplyInfo, build_knock, decode_reply},
        config::Config,
        devtoken::{self, KeygenOutput, MintClaims},
        kernel::{Kernel, maps::bytes_addr},
        netns::{self, TempDir},
        nodekey::NodeKey,
    };
    use portcullis_common::CFG_FLOW_SCOPED;

    use super::{Env, KNOCK_PORT, Settings};

    pub const ISSUER: &str = "https://idp.e2e.test";
    pub const AUDIENCE: &str = "portcullis-e2e";
    pub const SUBJECT: &str = "alice";
    pub const TENANT: &str = "acme";

    /// One protected TCP service of a knock test.
    #[derive(Clone, Debug)]
    pub struct KnockService {
        pub name: &'static str,
        pub port: u16,
        /// `invoke`, `read`, `retrain` or `export_weights`.
        pub action: &'static str,
    }

    #[derive(Clone, Debug)]
    pub struct KnockSettings {
        pub services: Vec<KnockService>,
        /// `[knock] max_ttl_secs`: below the tokens' lifetime, so an
        /// admission's expiry comes from the knock's time, not the token's.
        pub max_ttl_secs: u64,
        /// `[tokens] leeway_secs`: 0 so that expiry tests need not wait.
        pub leeway_secs: u64,
        pub knock_per_source: (u32, u32),
        pub stats_interval_ms: u64,
        /// `[policy] dir`, if any.
        pub policy_dir: Option<PathBuf>,
        /// Extra lines of the `[audit]` table (they may end with an
        /// `[audit.collector]` table).
        pub audit: String,
        /// `[knock]` global_per_sec, global_burst.
        pub knock_global: (u32, u32),
        /// Extra lines of every `[[services]]` table.
        pub service_extra: String,
    }

    impl Default for KnockSettings {
        fn default() -> Self {
            KnockSettings {
                services: vec![KnockService {
                    name: super::SERVICE,
                    port: super::PROTECTED_PORT,
                    action: "invoke",
                }],
                max_ttl_secs: 600,
                leeway_secs: 0,
                knock_per_source: (5, 10),
                stats_interval_ms: 1000,
                policy_dir: None,
                audit: String::new(),
                knock_global: (2000, 200),
                service_extra: String::new(),
            }
        }
    }

    /// An [`Env`] whose agent admits by knock. Drops the agent, bpffs and
    /// topology first, then the token directory.
    pub struct KnockEnv {
        pub env: Env,
        pub issuer: KeygenOutput,
        /// The node's public key (32 raw bytes), for `--node-key-pub`.
        pub node_pub_file: PathBuf,
        pub node_public_key: [u8; 32],
        pub node_key_file: PathBuf,
        tokens: TempDir,
    }

    static FILES: AtomicU32 = AtomicU32::new(0);

    impl KnockEnv {
        /// Topology, bpffs, development issuer, config and a started agent
        /// (asserted `fresh`).
        pub fn start(name: &str, s: &KnockSettings) -> KnockEnv {
            let mut env = Env::new(name, &Settings::default());
            let tokens = TempDir::new("tokens").expect("token dir");
            let issuer = devtoken::keygen(&tokens.path().join("issuer")).expect("keygen");
            let node_key_file = env
                .config
                .parent()
                .expect("config lives in a directory")
                .join("node.key");
            let text = config_text(&env, &issuer, &node_key_file, s);
            std::fs::write(&env.config, text).expect("write config");
            assert_eq!(env.start_agent(), "fresh");
            let node = NodeKey::load(&node_key_file).expect("the agent created its node key");
            let node_public_key = node.public_key();
            let node_pub_file = tokens.path().join("node.pub");
            std::fs::write(&node_pub_file, node_public_key).expect("write node.pub");
            KnockEnv {
                env,
                issuer,
                node_pub_file,
                node_public_key,
                node_key_file,
                tokens,
            }
        }

        pub fn claims(&self, scopes: &[&str], ttl: Duration) -> MintClaims {
            MintClaims {
                issuer: ISSUER.into(),
                audience: AUDIENCE.into(),
                subject: SUBJECT.into(),
                tenant: Some(TENANT.into()),
                client_id: None,
                roles: vec!["analyst".into()],
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ttl,
                cnf_jkt: None,
            }
        }

        /// A token from this node's trusted (development) issuer.
        pub fn mint(&self, scopes: &[&str], ttl: Duration) -> String {
            devtoken::mint(&self.issuer.key_path, self.claims(scopes, ttl)).expect("mint")
        }

        /// A well-formed token from an issuer key the node does not trust.
        pub fn mint_foreign(&self, scopes: &[&str], ttl: Duration) -> String {
            let dir = self
                .tokens
                .path()
                .join(format!("foreign-{}", FILES.fetch_add(1, Ordering::Relaxed)));
            let other = devtoken::keygen(&dir).expect("keygen");
            devtoken::mint(&other.key_path, self.claims(scopes, ttl)).expect("mint")
        }

        /// Writes `token` to a new file for `--token-file`.
        pub fn token_file(&self, token: &str) -> PathBuf {
            let p = self
                .tokens
                .path()
                .join(format!("token-{}", FILES.fetch_add(1, Ordering::Relaxed)));
            std::fs::write(&p, format!("{token}\n")).expect("write token");
            p
        }

        pub fn knock_addr(&self, v6: bool) -> SocketAddr {
            SocketAddr::new(self.env.topo.server_addr(v6), KNOCK_PORT)
        }

        /// `portcullis knock` in the client namespace, verifying the reply
        /// with the node's public key.
        pub fn knock_cli(
            &self,
            v6: bool,
            token: &str,
            service: &str,
            timeout: Duration,
            retries: u32,
            extra: &[&str],
        ) -> Output {
            let file = self.token_file(token);
            let timeout_ms = timeout.as_millis().to_string();
            let retries = retries.to_string();
            let host = self.knock_addr(v6).to_string();
            let mut args = vec![
                "knock",
                "--token-file",
                file.to_str().expect("utf-8"),
                "--service",
                service,
                "--node-key-pub",
                self.node_pub_file.to_str().expect("utf-8"),
                "--timeout-ms",
                &timeout_ms,
                "--retries",
                &retries,
            ];
            args.extend_from_slice(extra);
            args.push(&host);
            netns::run_in(&self.env.topo.client, &self.env.binary, &args).expect("run knock")
        }

        /// A knock that must be admitted; returns its stdout.
        pub fn knock_ok(&self, v6: bool, token: &str, service: &str, extra: &[&str]) -> String {
            let out = self.knock_cli(v6, token, service, Duration::from_secs(2), 2, extra);
            let (stdout, stderr) = texts(&out);
            assert!(
                out.status.success(),
                "knock {service} (v6={v6}) failed ({}):\nstdout: {stdout}\nstderr: {stderr}\nagent log:\n{}",
                out.status,
                self.log()
            );
            assert!(
                stdout.starts_with(&format!("admitted to {service} until ")),
                "knock prints the admission: {stdout:?}"
            );
            assert!(
                !stderr.contains("not checked"),
                "the reply's signature was verified: {stderr}"
            );
            stdout
        }

        /// A knock that must be refused (silence): exit status 1 and the
        /// client's timeout message. One attempt of 700 ms.
        pub fn knock_refused(&self, v6: bool, token: &str, service: &str, what: &str) {
            let out = self.knock_cli(v6, token, service, Duration::from_millis(700), 0, &[]);
            let (stdout, stderr) = texts(&out);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{what}: knock must fail with status 1:\nstdout: {stdout}\nstderr: {stderr}"
            );
            assert!(
                stderr.contains("no reply from") && stderr.contains("refused"),
                "{what}: the timeout message: {stderr}"
            );
            assert!(stdout.is_empty(), "{what}: nothing on stdout: {stdout}");
        }

        pub fn log(&self) -> String {
            self.env.agent.as_ref().map(|a| a.log()).unwrap_or_default()
        }

        /// Polls the agent's log until it contains `needle` (bounded).
        pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
            netns::poll_until(timeout, || self.log().contains(needle).then_some(())).is_some()
        }

        /// Polls the agent's log until a `knocks_refused` report names
        /// `reason` exactly (the agent reports refusals once per stats
        /// interval).
        pub fn wait_refused(&self, reason: &str, timeout: Duration) -> bool {
            let field = format!("reason=\"{reason}\"");
            netns::poll_until(timeout, || {
                strip_ansi(&self.log())
                    .lines()
                    .any(|l| l.contains("knocks_refused") && l.contains(&field))
                    .then_some(())
            })
            .is_some()
        }

        pub fn service_id(&self, name: &str) -> u32 {
            Config::load(&self.env.config)
                .expect("config")
                .service(name)
                .unwrap_or_else(|| panic!("no service {name}"))
                .id
        }

        /// The kernel's admissions, read from the pinned maps.
        pub fn admissions(&self) -> Vec<Adm> {
            let maps = Kernel::open_pinned_maps(&self.env.bpffs.pin_dir()).expect("pinned maps");
            maps.admissions()
                .into_iter()
                .map(|(k, v)| Adm {
                    source: bytes_addr(k.addr),
                    service: k.service,
                    source_port: k.src_port,
                    identity: v.identity,
                    expires_ns: v.expires_ns,
                })
                .collect()
        }

        /// The admission of `source` to `service` for `port` (0: any port).
        pub fn admission(&self, source: IpAddr, service: &str, port: u16) -> Option<Adm> {
            let id = self.service_id(service);
            self.admissions()
                .into_iter()
                .find(|a| a.source == source && a.service == id && a.source_port == port)
        }

        /// Whether the kernel currently looks for flow-scoped admissions.
        pub fn flow_scoped_flag(&self) -> bool {
            let maps = Kernel::open_pinned_maps(&self.env.bpffs.pin_dir()).expect("pinned maps");
            let cfg = maps.config.get(&0, 0).expect("kernel config");
            cfg.flags & CFG_FLOW_SCOPED != 0
        }

        /// A UDP socket in the client namespace bound to `src` (port chosen
        /// by the kernel), or to the unspecified address of the family.
        pub fn client_udp(&self, v6: bool, src: Option<IpAddr>) -> UdpSocket {
            let ip = src.unwrap_or(if v6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            });
            self.env
                .topo
                .client
                .run(move || UdpSocket::bind(SocketAddr::new(ip, 0)))
                .expect("enter client ns")
                .expect("bind UDP")
        }

        /// A knock datagram (no proof of possession) with a fresh random
        /// nonce and the current time; returns it and its nonce.
        pub fn datagram(
            &self,
            v6: bool,
            token: &str,
            service: &str,
            source_port: u16,
        ) -> (Vec<u8>, [u8; 16]) {
            let mut opts = KnockOptions::new(self.knock_addr(v6), token, service);
            opts.source_port = source_port;
            let nonce = random_nonce();
            let d = build_knock(&opts, nonce, SystemTime::now()).expect("build knock");
            (d, nonce)
        }

        /// Waits up to `timeout` for a reply to `nonce` on `sock` whose
        /// signature verifies with the node key; other datagrams are
        /// ignored. `None` when nothing acceptable arrived.
        pub fn await_reply(
            &self,
            sock: &UdpSocket,
            nonce: &[u8; 16],
            timeout: Duration,
        ) -> Option<KnockReplyInfo> {
            let deadline = Instant::now() + timeout;
            let mut buf = [0u8; 2048];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                sock.set_read_timeout(Some(left)).expect("read timeout");
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => {
                        if let Ok(info) = decode_reply(&buf[..n], Some(&self.node_public_key))
                            && info.nonce == *nonce
                        {
                            return Some(info);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        return None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // ICMP errors surface as ECONNREFUSED on later calls.
                    Err(_) => {}
                }
            }
        }

        /// A TCP connect from the client's main address and source port
        /// `port` (SO_REUSEADDR), giving up after `timeout`.
        pub fn connect_from_port(
            &self,
            v6: bool,
            port: u16,
            service_port: u16,
            timeout: Duration,
        ) -> io::Result<TcpStream> {
            let src = SocketAddr::new(self.env.topo.client_addr(v6), port);
            let dst = self.env.server(v6, service_port);
            netns::connect_bound(&self.env.topo.client, src, dst, timeout)
        }
    }

    /// One kernel admission.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Adm {
        pub source: IpAddr,
        pub service: u32,
        pub source_port: u16,
        pub identity: u32,
        pub expires_ns: u64,
    }

    /// The text without terminal colour sequences (`ESC [ ... m`).
    pub fn strip_ansi(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    fn texts(out: &Output) -> (String, String) {
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn config_text(
        env: &Env,
        issuer: &KeygenOutput,
        node_key: &std::path::Path,
        s: &KnockSettings,
    ) -> String {
        let mut t = String::new();
        let _ = write!(
            t,
            r#"[agent]
node_id = "e2e-knock-{index}"
node_key = "{node_key}"
stats_interval_ms = {stats}

[audit]
spool_dir = "{state}/spool"
{audit}

[accounting]
ledger = "{state}/ledger.json"

[kernel]
interfaces = ["{iface}"]
pin_dir = "{pin_dir}"
bpffs = "{bpffs}"

[knock]
port = {KNOCK_PORT}
per_source_per_sec = {ksr}
per_source_burst = {ksb}
global_per_sec = {kgr}
global_burst = {kgb}
max_ttl_secs = {max_ttl}
reply = true

[tokens]
jwks_file = "{jwks}"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
leeway_secs = {leeway}
revocations_file = "{state}/revocations"

[limits]
conn_per_sec = 50
conn_burst = 20
"#,
            index = env.topo.index,
            node_key = node_key.display(),
            state = env.state_dir().display(),
            audit = s.audit,
            stats = s.stats_interval_ms,
            iface = env.topo.server_if,
            pin_dir = env.bpffs.pin_dir().display(),
            bpffs = env.bpffs.path().display(),
            ksr = s.knock_per_source.0,
            ksb = s.knock_per_source.1,
            kgr = s.knock_global.0,
            kgb = s.knock_global.1,
            max_ttl = s.max_ttl_secs,
            jwks = issuer.jwks_path.display(),
            leeway = s.leeway_secs,
        );
        for svc in &s.services {
            let _ = write!(
                t,
                "\n[[services]]\nname = \"{}\"\nprotocol = \"tcp\"\nport = {}\naction = \"{}\"\n{}\n",
                svc.name, svc.port, svc.action, s.service_extra
            );
        }
        if let Some(dir) = &s.policy_dir {
            let _ = write!(t, "\n[policy]\ndir = \"{}\"\n", dir.display());
        }
        t
    }

    /// 16 random bytes from the kernel.
    pub fn random_nonce() -> [u8; 16] {
        let mut n = [0u8; 16];
        // SAFETY: writes at most 16 bytes into a 16-byte buffer.
        let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
        assert_eq!(got, 16, "getrandom");
        n
    }

    /// Closes with a RST (SO_LINGER 0): no TIME_WAIT, so the same source
    /// port can connect to the same destination again at once.
    pub fn close_with_rst(stream: TcpStream) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and option buffer.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        drop(stream);
    }
}
