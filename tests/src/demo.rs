//! `portcullis-demo`: the whole product in two network namespaces on the
//! embedded defaults, checking each claim as it goes: a port that does not
//! answer, tokens and knocks (IPv4 and IPv6), a Cedar policy that refuses
//! and names itself, a rate limit, priced traffic and a cost report, the
//! kernel enforcing while the agent is dead, a revocation cutting a live
//! connection, and the collector's OCSF records verified by `portcullis
//! audit verify`. Nothing touches the host's interfaces; every namespace,
//! mount and process is removed on exit, on failure and on Ctrl-C.

use std::{
    io::{BufRead as _, IsTerminal as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

use portcullis_testkit::{
    AgentProcess, BpffsMount, TempDir, Topology, connect_from, echo_roundtrip, poll_until, run_in,
    tcp_echo_server, try_connect,
};
use portcullis_trail::node_key::NodeKey;

use crate::{
    e2e::collector::Collector,
    story::{Story, node_binary},
};

const MODEL_PORT: u16 = 8000;
const OPEN_PORT: u16 = 8080;
const COLLECTOR_PORT: u16 = 7300;
/// A dropped SYN is retransmitted after a second: half a second without an
/// answer means the port is dark.
const DARK: Duration = Duration::from_millis(500);
const READY: Duration = Duration::from_secs(20);
const ISSUER: &str = "https://demo-issuer.invalid";
const AUDIENCE: &str = "portcullis-demo";
/// New connections per identity: a burst of 4, then 2 a second.
const CONN_BURST: u32 = 4;
/// The demo's price list, in micro-units of USD.
const PRICE: &str = "price = { per_connection_micros = 10000, per_mib_in_micros = 50000, per_mib_out_micros = 200000, per_mtok_out_micros = 15000000 }";

/// The demo's policies: inference within one's own tenant.
const POLICIES: [(&str, &str); 2] = [
    (
        "invoke.cedar",
        "// Any identity whose token grants the model may invoke it.\n@id(\"invoke\")\npermit (principal, action == Portcullis::Action::\"invoke\", resource);\n",
    ),
    (
        "tenants.cedar",
        "// Never another tenant's model.\n@id(\"tenant-isolation\")\nforbid (principal, action, resource)\nwhen { resource.tenant != \"\" && principal.tenant != resource.tenant };\n",
    ),
];

fn config(topo: &Topology, bpffs: &BpffsMount, dir: &Path) -> String {
    format!(
        r#"# portcullis demo configuration (generated)
[agent]
node_id = "demo-node"
node_key = "{dir}/node.key"

[kernel]
interfaces = ["{iface}"]
pin_dir = "{pin}"
bpffs = "{fs}"

[limits]
conn_per_sec = 2
conn_burst = {CONN_BURST}

[tokens]
jwks_file = "{dir}/issuer/jwks.json"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
revocations_file = "{dir}/revocations"

[policy]
dir = "{dir}/policies"

[[services]]
name = "llm"
protocol = "tcp"
port = {MODEL_PORT}
tenant = "acme"
{PRICE}

[audit]
spool_dir = "{dir}/spool"
checkpoint_secs = 1
report_interval_secs = 1

[audit.collector]
endpoint = "http://127.0.0.1:{COLLECTOR_PORT}"

[accounting]
ledger = "{dir}/ledger.json"

[control]
socket = "{dir}/control.sock"
"#,
        dir = dir.display(),
        iface = topo.server_if,
        pin = bpffs.pin_dir().display(),
        fs = bpffs.path().display(),
    )
}

struct Demo {
    exe: PathBuf,
    cfg: PathBuf,
    topo: Topology,
    dir: PathBuf,
    out: PathBuf,
    story: Story,
    interactive: bool,
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Demo {
    /// A chapter; in interactive mode, after Enter.
    fn chapter(&mut self, title: &str) {
        if self.interactive {
            print!("\n-- press Enter for: {title} ");
            let _ = std::io::Write::flush(&mut std::io::stdout());
            let _ = std::io::stdin().lock().read_line(&mut String::new());
        }
        self.story.chapter(title);
    }

    /// A development token for `tenant/subject` granting the model.
    fn mint(&self, tenant: &str, subject: &str) -> anyhow::Result<PathBuf> {
        crate::story::mint_file(&self.dir, ISSUER, AUDIENCE, tenant, subject)
    }

    /// `portcullis knock` from the client namespace; true when admitted.
    fn knock(&self, token: &Path, v6: bool) -> anyhow::Result<bool> {
        let server = self.topo.server_addr(v6).to_string();
        crate::story::knock(&self.topo.client, &self.exe, token, &server, 700, 1)
    }

    /// `portcullis ctl ARGS` on the node's control socket.
    fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let socket = self.dir.join("control.sock");
        let out = std::process::Command::new(&self.exe)
            .arg("ctl")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("portcullis ctl {}: {}", args.join(" "), said(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn agent_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let cfg = self.cfg.to_string_lossy().into_owned();
        let mut full = vec!["agent", args[0], "--config", &cfg];
        full.extend_from_slice(&args[1..]);
        let out = run_in(&self.topo.server, &self.exe, &full)?;
        if !out.status.success() {
            bail!("portcullis {}: {}", full.join(" "), said(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn model(&self, v6: bool) -> SocketAddr {
        SocketAddr::new(self.topo.server_addr(v6), MODEL_PORT)
    }

    fn connect(&self, v6: bool, timeout: Duration) -> std::io::Result<TcpStream> {
        try_connect(&self.topo.client, self.model(v6), timeout)
    }

    fn answers(&self, v6: bool) -> bool {
        answered(self.connect(v6, DARK))
    }

    /// From the client namespace's second, never admitted, address.
    fn answers_other(&self) -> bool {
        let src: IpAddr = self.topo.client_v4_alt.into();
        answered(connect_from(
            &self.topo.client,
            src,
            self.model(false),
            DARK,
        ))
    }

    fn start_agent(&self) -> anyhow::Result<AgentProcess> {
        AgentProcess::spawn(&self.exe, &self.topo.server, &self.cfg, &[])
            .context("starting the agent")
    }

    /// The collector's records so far, in order.
    fn records(&self) -> Vec<Value> {
        crate::e2e::collector::records(&self.out)
    }

    /// Waits (bounded) for a collector record `pick` accepts.
    fn await_record(&self, pick: impl Fn(&Value) -> bool) -> Option<Value> {
        poll_until(Duration::from_secs(10), || {
            self.records().into_iter().find(|r| pick(r))
        })
    }

    /// Prints a record, pretty; of the `portcullis` extension only where
    /// the record sits in the chain (the full event is in the file).
    fn show_record(&self, r: &Value) {
        let mut r = r.clone();
        if let Some(p) = r.get_mut("portcullis").and_then(Value::as_object_mut) {
            p.retain(|k, _| matches!(k.as_str(), "node_id" | "seq" | "hash"));
        }
        self.story
            .show(&serde_json::to_string_pretty(&r).unwrap_or_default());
    }
}

fn answered(conn: std::io::Result<TcpStream>) -> bool {
    match conn {
        Ok(mut s) => echo_roundtrip(&mut s, b"ping", DARK).is_ok(),
        Err(_) => false,
    }
}

/// The kind of audit event a record carries (`cost_report`,
/// `revocation`, ...), from its `portcullis.event`.
fn event_kind(r: &Value) -> Option<&str> {
    r["portcullis"]["event"]
        .as_object()?
        .iter()
        .find(|(_, v)| v.is_object())
        .map(|(k, _)| k.as_str())
}

/// True when `v` (any depth) holds the number `n`.
fn has_number(v: &Value, n: u64) -> bool {
    match v {
        Value::Number(x) => x.as_u64() == Some(n),
        Value::Array(a) => a.iter().any(|x| has_number(x, n)),
        Value::Object(o) => o.values().any(|x| has_number(x, n)),
        _ => false,
    }
}

/// True when `v` (any depth) holds a string containing `needle`.
fn mentions(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s.contains(needle),
        Value::Array(a) => a.iter().any(|x| mentions(x, needle)),
        Value::Object(o) => o.values().any(|x| mentions(x, needle)),
        _ => false,
    }
}

/// Runs the demo with the node binary `agent_bin` (default: `portcullis`
/// next to the running program); `interactive` pauses before each chapter
/// (only when standard input is a terminal).
pub fn run(agent_bin: Option<PathBuf>, interactive: bool) -> anyhow::Result<()> {
    let exe = node_binary(agent_bin)?;
    portcullis_testkit::clean_up_on_interrupt().context("installing the Ctrl-C handler")?;
    println!("portcullis demo: a client and a model server in two network namespaces");
    println!("(Ctrl-C at any time removes everything the demo made)\n");
    let topo = Topology::new("demo").context("creating the demo namespaces")?;
    let bpffs = BpffsMount::new().context("mounting a private bpffs")?;
    let tmp = TempDir::new("demo").context("creating a temp dir")?;
    let dir = tmp.path().to_path_buf();
    let cfg = dir.join("agent.toml");
    crate::devtoken::keygen(&dir.join("issuer")).context("creating a development issuer")?;
    std::fs::create_dir_all(dir.join("policies"))?;
    for (name, text) in POLICIES {
        std::fs::write(dir.join("policies").join(name), text)?;
    }
    std::fs::write(&cfg, config(&topo, &bpffs, &dir))?;
    // The collector, enrolled with the node's key before the node starts.
    let out = dir.join("collector");
    std::fs::create_dir_all(&out)?;
    let key = NodeKey::load_or_create(dir.join("node.key"))?.public_key();
    let enrolled = std::process::Command::new(&exe)
        .args(["collector", "enroll", "--out"])
        .arg(&out)
        .args(["demo-node", &portcullis_trail::hex::hex(&key)])
        .output()?;
    if !enrolled.status.success() {
        bail!("enrolling the node: {}", said(&enrolled));
    }
    let listen = SocketAddr::from(([127, 0, 0, 1], COLLECTOR_PORT));
    let mut collector = Collector::start(&exe, &topo.server, listen, &out, &dir);
    println!(
        "client {} / {} --veth--> server {} / {} (XDP on {}); model port {MODEL_PORT} protected, {OPEN_PORT} not",
        topo.client_v4, topo.client_v6, topo.server_v4, topo.server_v6, topo.server_if
    );
    let mut servers = Vec::new();
    for v6 in [false, true] {
        for port in [MODEL_PORT, OPEN_PORT] {
            let addr = SocketAddr::new(topo.server_addr(v6), port);
            servers.push(tcp_echo_server(&topo.server, addr).context("starting an echo server")?);
        }
    }
    let mut demo = Demo {
        exe,
        cfg,
        topo,
        dir,
        out,
        story: Story::new(),
        interactive: interactive && std::io::stdin().is_terminal(),
    };
    let result = story(&mut demo);
    drop(servers);
    let _ = demo.agent_cli(&["detach"]);
    collector.terminate();
    if result.is_err() || demo.story.failed() > 0 {
        eprintln!("---- collector log ----\n{}", collector.log());
    }
    result?;
    demo.story.verdict("demo")
}

fn story(d: &mut Demo) -> anyhow::Result<()> {
    d.chapter("the agent loads its XDP/TC programs and pins them");
    let mut agent = d.start_agent()?;
    let origin = agent.wait_ready(READY).context("waiting for the agent")?;
    d.story.step(
        &format!("agent enforcing (origin: {origin})"),
        origin == "fresh",
    );
    d.story.step(
        &format!("port {OPEN_PORT} (unprotected) answers"),
        answered(try_connect(
            &d.topo.client,
            SocketAddr::new(d.topo.server_v4.into(), OPEN_PORT),
            DARK,
        )),
    );
    let t = Instant::now();
    let dark = d.connect(false, DARK);
    let timed_out = matches!(&dark, Err(e) if e.kind() == std::io::ErrorKind::TimedOut);
    d.story.step(
        &format!(
            "an unauthenticated request to port {MODEL_PORT} gets nothing: {} after {} ms, no RST (the SYN was dropped)",
            match &dark {
                Ok(_) => "connected".to_string(),
                Err(e) => e.kind().to_string(),
            },
            t.elapsed().as_millis()
        ),
        timed_out,
    );

    d.chapter("a client gets a token and knocks (IPv4 and IPv6)");
    let alice = d.mint("acme", "alice")?;
    d.story.show(&format!(
        "minted {} for acme/alice, scope model:llm:invoke, 5 minutes",
        alice.display()
    ));
    d.story.step(
        "alice knocks over IPv4 and the node admits her",
        d.knock(&alice, false)?,
    );
    d.story.step(
        &format!("port {MODEL_PORT} answers alice over IPv4"),
        d.answers(false),
    );
    d.story.step(
        &format!(
            "another address of the same client ({}) is still dropped",
            d.topo.client_v4_alt
        ),
        !d.answers_other(),
    );
    d.story.step(
        &format!("port {MODEL_PORT} is dark to alice over IPv6 until she knocks there"),
        !d.answers(true),
    );
    d.story.step(
        "alice knocks over IPv6 and is admitted",
        d.knock(&alice, true)?,
    );
    d.story.step(
        &format!(
            "port {MODEL_PORT} answers alice over IPv6 ({})",
            d.topo.server_v6
        ),
        d.answers(true),
    );

    d.chapter("a Cedar policy refuses a request, and says which policy");
    let mallory = d.mint("globex", "mallory")?;
    d.story.show("policies/tenants.cedar: @id(\"tenant-isolation\") forbid ... when { resource.tenant != principal.tenant }");
    d.story.step(
        "mallory (tenant globex, a valid token for the model) knocks: no answer, the port stays dark",
        !d.knock(&mallory, false)? && !d.answers_other(),
    );
    let denial = d.await_record(|r| mentions(r, "mallory") && mentions(r, "tenant-isolation"));
    d.story.step(
        "the collector's record of the refusal names tenant-isolation",
        denial.is_some(),
    );
    if let Some(r) = &denial {
        d.show_record(r);
    }

    d.chapter("a rate limit bites: alice opens 10 connections at once");
    let mut opened = 0;
    for _ in 0..10 {
        if d.connect(false, Duration::from_millis(300)).is_ok() {
            opened += 1;
        }
    }
    d.story.step(
        &format!("{opened} of 10 connected: a burst of {CONN_BURST}, then 2 a second; the rest were dropped (drop reason conn_rate)"),
        (CONN_BURST..=CONN_BURST + 2).contains(&opened),
    );
    let stats = d.ctl(&["stats"])?;
    d.story.show(
        &stats
            .lines()
            .filter(|l| l.contains("conn_rate") || l.starts_with("REASON"))
            .collect::<Vec<_>>()
            .join("\n"),
    );

    d.chapter("real traffic is priced, and a cost report reaches the collector");
    // Let the connection bucket refill.
    let conn = poll_until(Duration::from_secs(3), || d.connect(false, DARK).ok());
    let mut moved = 0usize;
    if let Some(mut conn) = conn {
        let chunk = vec![0x5a_u8; 64 * 1024];
        while moved < 2 * 1024 * 1024
            && echo_roundtrip(&mut conn, &chunk, Duration::from_secs(2)).is_ok()
        {
            moved += chunk.len();
        }
    }
    d.story.step(
        &format!("alice sent {} KiB and got them back", moved / 1024),
        moved >= 2 * 1024 * 1024,
    );
    let usage = d.ctl(&[
        "--json",
        "usage",
        "--identity",
        "acme/alice",
        "--service",
        "llm",
        "--requests",
        "3",
        "--tokens-out",
        "20000",
        "--report-id",
        "demo-1",
    ])?;
    let usage: Value = serde_json::from_str(usage.trim()).unwrap_or(Value::Null);
    d.story.step(
        &format!(
            "the model server reports 20,000 output tokens for alice (ctl usage): {} micro-USD at 15 USD per million",
            usage["cost_micros"]
        ),
        usage["cost_micros"] == 300_000,
    );
    d.story
        .show(&format!("prices: {}", PRICE.trim_start_matches("price = ")));
    let cost = d.await_record(|r| {
        event_kind(r) == Some("cost_report") && mentions(r, "alice") && has_number(r, 20_000)
    });
    d.story.step(
        "a cost report for acme/alice with the traffic and the tokens reached the collector",
        cost.is_some(),
    );
    if let Some(r) = &cost {
        d.show_record(r);
        let line = r["portcullis"]["event"]["cost_report"]["lines"]
            .as_array()
            .and_then(|l| l.iter().find(|l| mentions(l, "alice")));
        if let Some(line) = line {
            d.story
                .show("alice's line of the report (portcullis.event.cost_report.lines):");
            d.story
                .show(&serde_json::to_string_pretty(line).unwrap_or_default());
        }
    }

    d.chapter("the agent is killed with SIGKILL: the kernel keeps enforcing");
    agent.kill9()?;
    d.story.step(
        "alice is still served while the agent is dead",
        d.answers(false),
    );
    d.story.step(
        "the other address is still dropped while the agent is dead",
        !d.answers_other(),
    );
    let mut agent = d.start_agent()?;
    let origin = agent
        .wait_ready(READY)
        .context("waiting for the restarted agent")?;
    d.story.step(
        &format!("the restarted agent adopts the pinned state (origin: {origin})"),
        origin == "adopted",
    );

    d.chapter("alice is revoked while connected");
    let mut conn = poll_until(Duration::from_secs(3), || d.connect(false, DARK).ok())
        .context("alice connects")?;
    d.story.step(
        "her connection works",
        echo_roundtrip(&mut conn, b"one", DARK).is_ok(),
    );
    d.ctl(&["revoke", "--identity", "acme/alice", "--reason", "demo"])?;
    let cut = Instant::now();
    let mut cut_after = None;
    while cut.elapsed() < Duration::from_secs(2) {
        if echo_roundtrip(&mut conn, b"more", Duration::from_millis(100)).is_err() {
            cut_after = Some(cut.elapsed());
            break;
        }
    }
    let when = cut_after.map_or("never (within 2 s)".to_string(), |t| {
        format!("{} ms", t.as_millis())
    });
    d.story.step(
        &format!("the live connection is cut {when} after the revocation (bound: 1 s)"),
        cut_after.is_some_and(|t| t <= Duration::from_secs(1)),
    );
    d.story.step(
        &format!("port {MODEL_PORT} is dark to her again, IPv4 and IPv6"),
        !d.answers(false) && !d.answers(true),
    );
    let revoked = d.await_record(|r| event_kind(r) == Some("revocation") && mentions(r, "alice"));
    d.story.step(
        "the revocation is on record at the collector",
        revoked.is_some(),
    );
    if let Some(r) = &revoked {
        d.show_record(r);
    }

    d.chapter("what the kernel counted (portcullis ctl status, portcullis agent status)");
    d.story.show(&d.ctl(&["status"])?);
    let counters = d.agent_cli(&["status"])?;
    d.story.show(
        &counters
            .lines()
            .filter(|l| {
                l.split_whitespace().nth(1).is_some_and(|n| n != "0") && !l.contains("node_key")
            })
            .take(12)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    agent.terminate(Duration::from_secs(5))?;

    d.chapter("the audit trail: hash-chained, signed, verified offline (portcullis audit verify)");
    let verify = std::process::Command::new(&d.exe)
        .args(["audit", "verify"])
        .arg(&d.out)
        .output()?;
    d.story.show(&said(&verify));
    d.story.step(
        "`portcullis audit verify` on the collector's directory passes",
        verify.status.success(),
    );
    let records = d.records();
    let kinds: std::collections::BTreeMap<String, usize> =
        records.iter().fold(Default::default(), |mut m, r| {
            *m.entry(event_kind(r).unwrap_or("?").to_string())
                .or_default() += 1;
            m
        });
    d.story.show(&format!(
        "{} OCSF records by event: {kinds:?}",
        records.len()
    ));
    let count = |k: &str| kinds.get(k).copied().unwrap_or(0);
    d.story.step(
        "on record: alice's two admissions (IPv4, IPv6), mallory's refusal, the revocation, two starts and a stop",
        count("admission_granted") >= 2
            && count("admission_denied") >= 1
            && count("revocation") >= 1
            && count("lifecycle") >= 3,
    );
    Ok(())
}
