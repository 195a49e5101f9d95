//! Knock to open, `portcullis-bench peers knock`: from the moment a client
//! starts asking to the first TCP connect that succeeds, each trial from a
//! source of its own (and for portcullis a new identity), for
//!
//! - portcullis with the client library (`portcullis_knock::KnockClient`,
//!   the reply verified with the node's key) in the benchmark's process;
//! - portcullis with the CLI (`portcullis knock`), a process per trial;
//! - fwknop's single packet authorization (Debian's fwknop-server with its
//!   iptables backend in UDP server mode, fwknop-client with Rijndael and
//!   HMAC keys), in a fresh pair of namespaces without the agent.
//!
//! The library's knock returns once the node's signed reply is in, which
//! the agent sends only after the grant's audit record is fsynced and the
//! admission is in the kernel (`agent/src/daemon/knock_service.rs`): its
//! time is the node's knock-in → admission-written time plus one veth round
//! trip. A connect is tried every millisecond (1 ms connect timeout) until
//! one succeeds, bounded at 2 s; fwknop gives no answer, so the connect
//! loop is how its client learns the port is open.
//!
//! Sources: 100.64.K.x (K = 0 library, 1 CLI, 2 fwknop), added to the
//! client's veth and routed on-link by the node; before each trial (not
//! timed) the client's route to the node is given that source.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use portcullis_e2e::e2e::{
    Env, PROTECTED_PORT, SERVICE, Settings,
    knock::{KnockEnv, KnockSettings},
};
use portcullis_knock::client::{KnockClient, KnockOptions};
use portcullis_testkit::{TempDir, Topology, poll_until};

use super::capture::NodeSide;
use crate::support::Row;

/// Knock port of both products (fwknop's default is 62201 too).
pub const KNOCK_PORT: u16 = 62201;
const CONNECT_TRY: Duration = Duration::from_millis(1);
const CONNECT_BOUND: Duration = Duration::from_secs(2);

/// One product's trials.
pub struct KnockRows {
    /// Start of asking to the first successful connect.
    pub to_open: Row,
    /// The knock alone (library: send to verified reply; CLI: the process).
    pub knock: Row,
}

pub struct KnockReport {
    pub trials: usize,
    pub library: KnockRows,
    /// The library's knocks on the node: knock in to reply out.
    pub node_side: Row,
    pub cli: KnockRows,
    /// `portcullis --version` spawned and reaped: the CLI's process start.
    pub process_start: Row,
    pub fwknop: Result<KnockRows, String>,
}

pub fn run(trials: usize) -> Result<KnockReport> {
    let (library, node_side, cli, process_start) = portcullis(trials)?;
    let fwknop = fwknop(trials).map_err(|e| format!("{e:#}"));
    Ok(KnockReport {
        trials,
        library,
        node_side,
        cli,
        process_start,
        fwknop,
    })
}

fn portcullis(trials: usize) -> Result<(KnockRows, Row, KnockRows, Row)> {
    let k = KnockEnv::start(
        "bko",
        &KnockSettings {
            knock_per_source: (100_000, 100_000),
            knock_global: (100_000, 100_000),
            ..KnockSettings::default()
        },
    );
    let topo = &k.env.topo;
    let _echo = k.env.echo_server(false, PROTECTED_PORT);
    let sources = Sources::add(topo, trials, &[0, 1])?;
    let server = SocketAddr::new(topo.server_v4.into(), PROTECTED_PORT);
    // Tokens are minted before the clock starts: an identity provider's
    // work, not the knock's. Every trial is a subject the node never saw.
    let token = |mode: &str, i: usize| {
        let mut c = k.claims(&["model:llm:invoke"], Duration::from_secs(3600));
        c.subject = format!("open-{mode}-{i}");
        portcullis_e2e::devtoken::mint(&k.issuer.key_path, c).context("mint")
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut library = Trials::default();
    let node = NodeSide::start(topo)?;
    for i in 0..trials {
        let mut opts = KnockOptions::new(k.knock_addr(false), token("lib", i)?, SERVICE);
        opts.node_public_key = Some(k.node_public_key);
        opts.retries = 0;
        let client = KnockClient::new(opts);
        sources.use_source(0, i)?;
        let (knock, open) = topo.client.run(|| -> Result<(Duration, Duration)> {
            let t = Instant::now();
            rt.block_on(client.knock()).context("library knock")?;
            let knocked = t.elapsed();
            connect_when_open(server)?;
            Ok((knocked, t.elapsed()))
        })??;
        library.push(knock, open);
    }
    let node_side = node.finish()?;
    if node_side.len() != trials {
        bail!(
            "the node's capture paired {} of {trials} knocks with their replies",
            node_side.len()
        );
    }
    let node_side = Row::new(node_side, Duration::from_secs(1));

    let mut cli = Trials::default();
    let node_pub = k.node_pub_file.to_string_lossy().into_owned();
    let host = k.knock_addr(false).to_string();
    for i in 0..trials {
        let file = k.token_file(&token("cli", i)?);
        sources.use_source(1, i)?;
        let mut cmd = Command::new(&k.env.binary);
        cmd.arg("knock")
            .arg("--token-file")
            .arg(&file)
            .args(["--service", SERVICE, "--node-key-pub", &node_pub])
            .args(["--retries", "0", &host]);
        let (knock, open) = topo
            .client
            .run(|| timed_to_open(&mut cmd, server, "portcullis knock"))??;
        cli.push(knock, open);
    }

    let mut start = Vec::with_capacity(trials);
    for _ in 0..trials {
        let mut cmd = Command::new(&k.env.binary);
        cmd.arg("--version");
        let t = Instant::now();
        quiet(&mut cmd, "portcullis --version")?;
        start.push(t.elapsed());
    }
    Ok((
        library.rows(),
        node_side,
        cli.rows(),
        Row::new(start, Duration::from_secs(1)),
    ))
}

fn fwknop(trials: usize) -> Result<KnockRows> {
    let env = Env::new("bkf", &Settings::default());
    let topo = &env.topo;
    let dir = TempDir::new("fwknop")?;
    let d = |name: &str| dir.path().join(name);
    // Keys as `fwknop --key-gen` makes them (Rijndael and HMAC-SHA256).
    let out = quiet(
        Command::new("fwknop")
            .args(["--key-gen", "--rc-file"])
            .arg(d("keygen.rc")),
        "fwknop --key-gen",
    )?;
    let key = field(&out, "KEY_BASE64:")?;
    let hmac = field(&out, "HMAC_KEY_BASE64:")?;
    // fwknopd.conf(5): UDP server mode instead of pcap, the iptables
    // backend's own FWKNOP_INPUT chain; access.conf(5): any source, the
    // protected port, the keys.
    write_private(
        &d("fwknopd.conf"),
        &format!(
            "ENABLE_UDP_SERVER Y;\nUDPSERV_PORT {KNOCK_PORT};\nPCAP_INTF {};\nFLUSH_IPT_AT_INIT Y;\nFLUSH_IPT_AT_EXIT Y;\n",
            topo.server_if
        ),
    )?;
    write_private(
        &d("access.conf"),
        &format!(
            "SOURCE ANY\nOPEN_PORTS tcp/{PROTECTED_PORT}\nFW_ACCESS_TIMEOUT 600\nKEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac}\n"
        ),
    )?;
    std::fs::create_dir_all(d("run"))?;
    // The port is closed to everyone fwknopd has not opened it for.
    let drop_rule = [
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "8000", "-j", "DROP",
    ];
    quiet(
        Command::new("ip")
            .args(["netns", "exec", topo.server.name()])
            .args(drop_rule),
        "iptables",
    )?;
    let _echo = env.echo_server(false, PROTECTED_PORT);
    let _daemon = Daemon(
        topo.server
            .exec("fwknopd")
            .args(["-f", "-U", "-c"])
            .arg(d("fwknopd.conf"))
            .arg("-a")
            .arg(d("access.conf"))
            .arg("-d")
            .arg(d("run/digest.cache"))
            .arg("-p")
            .arg(d("run/fwknopd.pid"))
            .arg("-r")
            .arg(d("run"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn fwknopd")?,
    );
    let server_ns = topo.server.name().to_string();
    poll_until(Duration::from_secs(10), || {
        let out = Command::new("ip")
            .args(["netns", "exec", &server_ns, "ss", "-Hlun"])
            .arg(format!("sport = :{KNOCK_PORT}"))
            .output()
            .ok()?;
        (!out.stdout.is_empty()).then_some(())
    })
    .context("fwknopd did not listen on its UDP port within 10 s")?;

    let sources = Sources::add(topo, trials, &[2])?;
    let server = SocketAddr::new(topo.server_v4.into(), PROTECTED_PORT);
    let dest = topo.server_v4.to_string();
    let mut rows = Trials::default();
    for i in 0..trials {
        sources.use_source(2, i)?;
        let mut cmd = Command::new("fwknop");
        cmd.args(["-A", &format!("tcp/{PROTECTED_PORT}"), "-s", "-D", &dest])
            .args(["--server-proto", "udp", "--server-port"])
            .arg(KNOCK_PORT.to_string())
            .args(["--use-hmac", "--key-base64-rijndael", &key])
            .args(["--key-base64-hmac", &hmac, "--no-save-args", "--rc-file"])
            .arg(d("client.rc"));
        let (knock, open) = topo
            .client
            .run(|| timed_to_open(&mut cmd, server, "fwknop"))??;
        rows.push(knock, open);
    }
    Ok(rows.rows())
}

/// Runs `cmd` to completion, then connects until open: (the command's
/// time, the time to open), both from the spawn.
fn timed_to_open(
    cmd: &mut Command,
    server: SocketAddr,
    what: &str,
) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    quiet(cmd, what)?;
    let knocked = t.elapsed();
    connect_when_open(server)?;
    Ok((knocked, t.elapsed()))
}

/// Connects to `server` every [`CONNECT_TRY`] until one succeeds; an error
/// after [`CONNECT_BOUND`].
fn connect_when_open(server: SocketAddr) -> Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&server, CONNECT_TRY).is_ok() {
            return Ok(());
        }
        if start.elapsed() > CONNECT_BOUND {
            bail!("{server} did not open within {CONNECT_BOUND:?} of the knock");
        }
    }
}

/// Runs `cmd` and returns its stdout; an error with its output if it fails.
fn quiet(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(text: &str, name: &str) -> Result<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {name} in fwknop --key-gen's output"))
}

/// fwknopd refuses configuration files others can read.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// fwknopd, killed (and reaped) on drop; its rules go with the namespace.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Trials {
    knock: Vec<Duration>,
    open: Vec<Duration>,
    wall: Duration,
}

impl Trials {
    fn push(&mut self, knock: Duration, open: Duration) {
        self.knock.push(knock);
        self.open.push(open);
        self.wall += open;
    }

    fn rows(self) -> KnockRows {
        KnockRows {
            to_open: Row::new(self.open, self.wall),
            knock: Row::new(self.knock, self.wall),
        }
    }
}

/// The trials' source addresses on the client's veth, 100.64.K.x.
struct Sources {
    client_if: String,
    server: Ipv4Addr,
    ns: String,
}

impl Sources {
    /// Adds the sources of modes `modes` (100.64.K.x for each K).
    fn add(topo: &Topology, trials: usize, modes: &[u8]) -> Result<Sources> {
        if trials > 250 {
            bail!("at most 250 trials (one /24 of sources per mode)");
        }
        let s = Sources {
            client_if: topo.client_if.clone(),
            server: topo.server_v4,
            ns: topo.client.name().to_string(),
        };
        // The node's neighbour entries are set, as for clients behind a
        // router (whose address the node has long resolved): a trial times
        // the knock, not ARP.
        let mac = client_mac(topo)?;
        let (mut adds, mut neighs) = (String::new(), String::new());
        for &k in modes {
            for i in 0..trials {
                let a = s.addr(k, i);
                adds.push_str(&format!("addr add {a}/32 dev {}\n", s.client_if));
                neighs.push_str(&format!(
                    "neigh replace {a} lladdr {mac} dev {} nud permanent\n",
                    topo.server_if
                ));
            }
        }
        topo.server
            .ip(&["route", "add", "100.64.0.0/16", "dev", &topo.server_if])?;
        batch(topo.client.name(), &adds)?;
        batch(topo.server.name(), &neighs)?;
        Ok(s)
    }

    fn addr(&self, k: u8, i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(100, 64, k, 1 + i as u8))
    }

    /// The client's next packets to the node leave from source `i` of
    /// mode `k`.
    fn use_source(&self, k: u8, i: usize) -> Result<()> {
        quiet(
            Command::new("ip").args([
                "-n",
                &self.ns,
                "route",
                "replace",
                &format!("{}/32", self.server),
                "dev",
                &self.client_if,
                "src",
                &self.addr(k, i).to_string(),
            ]),
            "ip route replace",
        )?;
        Ok(())
    }
}

/// Runs `ip -batch` commands in namespace `ns`.
fn batch(ns: &str, commands: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("ip -batch")?;
    child
        .stdin
        .take()
        .context("ip -batch stdin")?
        .write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("ip -batch: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn client_mac(topo: &Topology) -> Result<String> {
    let out = topo
        .client
        .ip(&["-j", "link", "show", "dev", &topo.client_if])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j")?;
    Ok(v[0]["address"].as_str().context("no MAC")?.to_string())
}

/// The to-open p50 and p99 of each client, for the chart.
pub fn bars(r: &KnockReport) -> Vec<super::chart::Bar> {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let bar = |label: &str, k: &KnockRows| super::chart::Bar {
        label: label.to_string(),
        value: ms(k.to_open.pct(0.5)),
        upper: Some(ms(k.to_open.pct(0.99))),
    };
    let mut v = vec![
        bar("portcullis, client library", &r.library),
        bar("portcullis knock (CLI)", &r.cli),
    ];
    if let Ok(f) = &r.fwknop {
        v.push(bar("fwknop SPA (UDP server, iptables)", f));
    }
    v
}

/// The knock table, for the peers report.
pub fn print(r: &KnockReport) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "Knock to open: {} trials each, every trial from a source of its own (portcullis: and a new identity); from the start of asking to the first successful TCP connect (tried every {} ms)",
        r.trials,
        CONNECT_TRY.as_millis()
    );
    println!();
    println!("| client | knock p50 ms | knock p99 ms | to open p50 ms | to open p99 ms |");
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, k: &KnockRows| {
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} |",
            ms(k.knock.pct(0.5)),
            ms(k.knock.pct(0.99)),
            ms(k.to_open.pct(0.5)),
            ms(k.to_open.pct(0.99))
        )
    };
    row(
        "portcullis, client library (knock: send to verified reply)",
        &r.library,
    );
    row("portcullis knock, CLI (knock: the process)", &r.cli);
    println!(
        "| the CLI's process start alone (`portcullis --version`) | {:.3} | {:.3} | - | - |",
        ms(r.process_start.pct(0.5)),
        ms(r.process_start.pct(0.99))
    );
    match &r.fwknop {
        Ok(f) => {
            row("fwknop SPA, UDP server mode (knock: the client process)", f);
            let lib = &r.library.to_open;
            println!();
            println!(
                "fwknop / portcullis library, to open: p50 {:.1}x, p99 {:.1}x (target at least 10x)",
                f.to_open.pct(0.5).as_secs_f64() / lib.pct(0.5).as_secs_f64(),
                f.to_open.pct(0.99).as_secs_f64() / lib.pct(0.99).as_secs_f64()
            );
        }
        Err(e) => println!("| fwknop | could not run: {e} | | | |"),
    }
    let node = r.node_side.pct(0.99);
    println!(
        "portcullis on the node, knock in → signed reply out (the admission written and its audit record fsynced before the reply): p50 {:.3} ms, p99 {:.3} ms; target p99 at most 1 ms: {}",
        ms(r.node_side.pct(0.5)),
        ms(node),
        if node <= Duration::from_millis(1) {
            "met".to_string()
        } else {
            format!("missed by {:.3} ms", ms(node) - 1.0)
        }
    );
}
