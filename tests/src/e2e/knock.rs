//! Setup for the knock tests: an agent with a `[tokens]` section whose JWKS
//! is a development issuer's (`portcullis_agent::devtoken`), tokens minted
//! into a temporary directory, the real `portcullis knock` CLI run in the
//! client namespace, and raw knock datagrams sent from sockets created in
//! the client namespace.

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

use crate::{
    devtoken,
    devtoken::{KeygenOutput, MintClaims},
};
use portcullis_agent::{
    config::Config,
    loader::{Kernel, maps::bytes_addr},
};
use portcullis_common::CFG_FLOW_SCOPED;
use portcullis_knock::{KnockOptions, KnockReplyInfo, build_knock, decode_reply};
use portcullis_testkit::TempDir;
use portcullis_trail::node_key::NodeKey;

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
    /// Extra lines of the `[control]` table (roles).
    pub control: String,
    /// Tables appended to the config (`[[budgets]]`, `[cost_control]`).
    pub extra: String,
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
            control: String::new(),
            extra: String::new(),
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

    /// A token for another subject of the tenant.
    pub fn mint_for(&self, subject: &str, scopes: &[&str], ttl: Duration) -> String {
        let claims = MintClaims {
            subject: subject.into(),
            ..self.claims(scopes, ttl)
        };
        devtoken::mint(&self.issuer.key_path, claims).expect("mint")
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
        portcullis_testkit::run_in(&self.env.topo.client, &self.env.binary, &args)
            .expect("run knock")
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
        portcullis_testkit::poll_until(timeout, || self.log().contains(needle).then_some(()))
            .is_some()
    }

    /// Polls the agent's log until a `knocks_refused` report names
    /// `reason` exactly (the agent reports refusals once per stats
    /// interval).
    pub fn wait_refused(&self, reason: &str, timeout: Duration) -> bool {
        let field = format!("reason=\"{reason}\"");
        portcullis_testkit::poll_until(timeout, || {
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
        portcullis_testkit::connect_bound(&self.env.topo.client, src, dst, timeout)
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

[control]
socket = "{state}/control.sock"
{control}

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
        control = s.control,
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
    t.push_str(&s.extra);
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
