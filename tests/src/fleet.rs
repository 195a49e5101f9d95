//! `portcullis-fleet` (`cargo xtask fleet`): several nodes, each its own
//! network namespace with its own agent, one client namespace linked to
//! every node, and one collector all the agents stream to. It shows what
//! holds across a fleet: an admission is per node; `portcullis ctl` with
//! several `--node` targets revokes a tenant everywhere at once and reports
//! per node; the collector receives every node's chain without a gap, also
//! across an agent killed with SIGKILL and restarted; and `portcullis audit
//! verify` on the collector's directory passes for every node.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use portcullis_testkit::{
    AgentProcess, BpffsMount, Fleet, FleetNode, TempDir, poll_until, run_in, tcp_echo_server,
    try_connect,
};
use portcullis_trail::node_key::NodeKey;

use crate::{
    e2e::collector::Collector,
    story::{Story, node_binary},
};

const MODEL_PORT: u16 = 8000;
const COLLECTOR_PORT: u16 = 7300;
const ISSUER: &str = "https://fleet-issuer.invalid";
const AUDIENCE: &str = "portcullis-fleet";
/// A dropped SYN is retransmitted after a second: half a second without an
/// answer means the port is dark.
const DARK: Duration = Duration::from_millis(500);
const READY: Duration = Duration::from_secs(30);
/// How long the collector may take to acknowledge every node's events.
const DELIVERY: Duration = Duration::from_secs(30);

struct Member {
    name: String,
    dir: PathBuf,
    cfg: PathBuf,
    agent: Option<AgentProcess>,
    _bpffs: BpffsMount,
}

impl Member {
    fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
}

fn config(name: &str, node: &FleetNode, bpffs: &BpffsMount, dir: &Path, issuer: &Path) -> String {
    format!(
        r#"# portcullis fleet node {name} (generated)
[agent]
node_id = "{name}"
node_key = "{dir}/node.key"

[kernel]
interfaces = ["{iface}"]
pin_dir = "{pin}"
bpffs = "{fs}"

[tokens]
jwks_file = "{issuer}/jwks.json"
issuer = "{ISSUER}"
audience = "{AUDIENCE}"

[[services]]
name = "llm"
protocol = "tcp"
port = {MODEL_PORT}

[audit]
spool_dir = "{dir}/spool"
checkpoint_secs = 1
report_interval_secs = 1

[audit.collector]
endpoint = "http://{collector}:{COLLECTOR_PORT}"
allow_plaintext = true

[accounting]
ledger = "{dir}/ledger.json"

[control]
socket = "{dir}/control.sock"
"#,
        dir = dir.display(),
        iface = node.node_if,
        pin = bpffs.pin_dir().display(),
        fs = bpffs.path().display(),
        issuer = issuer.display(),
        collector = node.client_v4,
    )
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Run<'a> {
    exe: PathBuf,
    fleet: &'a Fleet,
    members: Vec<Member>,
    dir: PathBuf,
    story: Story,
}

impl Run<'_> {
    fn mint(&self, subject: &str) -> anyhow::Result<PathBuf> {
        crate::story::mint_file(&self.dir, ISSUER, AUDIENCE, "acme", subject)
    }

    fn knock(&self, k: usize, token: &Path) -> anyhow::Result<bool> {
        let node = self.fleet.nodes[k].node_v4.to_string();
        crate::story::knock(&self.fleet.client, &self.exe, token, &node, 1000, 2)
    }

    fn answers(&self, k: usize) -> bool {
        let addr = SocketAddr::new(self.fleet.nodes[k].node_v4.into(), MODEL_PORT);
        try_connect(&self.fleet.client, addr, DARK).is_ok()
    }

    fn reachable(&self) -> Vec<bool> {
        (0..self.members.len()).map(|k| self.answers(k)).collect()
    }

    /// `portcullis ctl --node NAME=SOCKET ... ARGS` over every node (and
    /// `extra` nodes), from the host.
    fn ctl_fleet(&self, extra: &[&str], args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("ctl");
        for m in &self.members {
            cmd.arg("--node")
                .arg(format!("{}={}", m.name, m.socket().display()));
        }
        for e in extra {
            cmd.args(["--node", e]);
        }
        Ok(cmd.args(args).output()?)
    }

    fn ctl_fleet_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ctl_fleet(&[], &full)?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ctl --json printed no JSON: {}", said(&out)))
    }

    fn start_agent(&mut self, k: usize) -> anyhow::Result<String> {
        let m = &mut self.members[k];
        let mut agent = AgentProcess::spawn(&self.exe, &self.fleet.nodes[k].ns, &m.cfg, &[])
            .context("starting an agent")?;
        let origin = agent
            .wait_ready(READY)
            .with_context(|| format!("{}: waiting for the agent:\n{}", m.name, agent.log()))?;
        m.agent = Some(agent);
        Ok(origin)
    }
}

/// Runs the fleet with `n` nodes (2-8) and the node binary `agent_bin`.
pub fn run(agent_bin: Option<PathBuf>, n: usize) -> anyhow::Result<()> {
    if !(2..=portcullis_testkit::MAX_FLEET).contains(&n) {
        bail!("--nodes: give 2-{}", portcullis_testkit::MAX_FLEET);
    }
    let exe = node_binary(agent_bin)?;
    println!(
        "portcullis fleet: {n} nodes, one client, one collector, each in its own network namespace"
    );
    let fleet = Fleet::new("fleet", n).context("creating the fleet's namespaces")?;
    let tmp = TempDir::new("fleet").context("creating a temp dir")?;
    let dir = tmp.path().to_path_buf();
    let issuer = dir.join("issuer");
    crate::devtoken::keygen(&issuer).context("creating a development issuer")?;
    let out = dir.join("collector");
    std::fs::create_dir_all(&out)?;
    let mut members = Vec::new();
    for (k, node) in fleet.nodes.iter().enumerate() {
        let name = format!("fleet-node-{k}");
        let state = dir.join(&name);
        std::fs::create_dir_all(&state)?;
        // The operator enrolls every node's key before its stream counts.
        let key = NodeKey::load_or_create(state.join("node.key"))?.public_key();
        let enrolled = std::process::Command::new(&exe)
            .args(["collector", "enroll", "--out"])
            .arg(&out)
            .arg(&name)
            .arg(portcullis_trail::hex::hex(&key))
            .output()?;
        if !enrolled.status.success() {
            bail!("enrolling {name}: {}", said(&enrolled));
        }
        let bpffs = BpffsMount::new().context("mounting a private bpffs")?;
        let cfg = state.join("agent.toml");
        std::fs::write(&cfg, config(&name, node, &bpffs, &state, &issuer))?;
        members.push(Member {
            name,
            dir: state,
            cfg,
            agent: None,
            _bpffs: bpffs,
        });
    }
    let listen = SocketAddr::from(([0, 0, 0, 0], COLLECTOR_PORT));
    let mut collector = Collector::start_with(
        &exe,
        &fleet.client,
        listen,
        &out,
        &dir,
        &["--allow-plaintext"],
    );
    let servers: Vec<_> = fleet
        .nodes
        .iter()
        .map(|node| tcp_echo_server(&node.ns, SocketAddr::new(node.node_v4.into(), MODEL_PORT)))
        .collect::<Result<_, _>>()
        .context("starting the model servers")?;
    let mut run = Run {
        exe,
        fleet: &fleet,
        members,
        dir: dir.clone(),
        story: Story::new(),
    };
    let result = story(&mut run, &out);
    drop(servers);
    for (m, node) in run.members.iter().zip(&fleet.nodes) {
        let cfg = m.cfg.to_string_lossy().into_owned();
        let _ = run_in(&node.ns, &run.exe, &["agent", "detach", "--config", &cfg]);
    }
    for m in &mut run.members {
        if let Some(mut a) = m.agent.take() {
            let _ = a.terminate(Duration::from_secs(5));
        }
    }
    collector.terminate();
    if result.is_err() || run.story.failed() > 0 {
        eprintln!("---- collector log ----\n{}", collector.log());
    }
    result?;
    run.story.verdict("fleet")
}

fn story(r: &mut Run, out: &Path) -> anyhow::Result<()> {
    let n = r.members.len();
    r.story
        .chapter("every node's agent loads its programs and streams to the collector");
    for k in 0..n {
        let origin = r.start_agent(k)?;
        let claim = format!(
            "{} enforcing on {} ({origin})",
            r.members[k].name, r.fleet.nodes[k].node_if
        );
        r.story.step(&claim, origin == "fresh");
    }
    r.story.step(
        &format!("port {MODEL_PORT} is dark on all {n} nodes"),
        r.reachable().iter().all(|a| !a),
    );

    r.story.chapter("an admission is per node");
    let alice = r.mint("alice")?;
    let knocked = r.knock(0, &alice)?;
    r.story
        .step("alice knocks on fleet-node-0 and is admitted", knocked);
    let reach = r.reachable();
    r.story.step("fleet-node-0 answers alice", reach[0]);
    r.story.step(
        "every other node still drops her: an admission on one node opens nothing elsewhere",
        reach[1..].iter().all(|a| !a),
    );
    let mut all = true;
    for k in 1..n {
        all &= r.knock(k, &alice)?;
    }
    r.story.step("alice knocks on the other nodes too", all);
    r.story.step(
        "every node answers her now",
        r.reachable().iter().all(|a| *a),
    );

    r.story
        .chapter("one command revokes tenant acme on every node at once");
    let human = r.ctl_fleet(
        &[],
        &["revoke", "--tenant", "acme", "--reason", "fleet demo"],
    )?;
    r.story.show(&String::from_utf8_lossy(&human.stdout));
    r.story.step(
        "`portcullis ctl --node ... revoke --tenant acme` succeeds on every node",
        human.status.success(),
    );
    let cut = poll_until(Duration::from_secs(2), || {
        r.reachable().iter().all(|a| !a).then_some(())
    });
    r.story.step("every node drops alice again", cut.is_some());
    let again = r.ctl_fleet_json(&["revoke", "--tenant", "acme"])?;
    let rows = again["nodes"].as_array().cloned().unwrap_or_default();
    r.story.step(
        &format!(
            "a second revoke finds nothing left: --json reports NotFound for each of the {n} nodes"
        ),
        rows.len() == n
            && rows.iter().all(|v| {
                v["ok"] == false && v["error"].as_str().is_some_and(|e| e.contains("NotFound"))
            }),
    );
    let ghost = r.ctl_fleet(&["ghost=/nonexistent/control.sock"], &["status"])?;
    let text = String::from_utf8_lossy(&ghost.stdout);
    r.story.step(
        "an unreachable node is reported as failed, the others still answer, and the exit status is 1",
        ghost.status.code() == Some(1)
            && text.contains("== ghost (/nonexistent/control.sock): FAILED")
            && text.contains(&format!("{} ok, 1 failed", n)),
    );

    r.story
        .chapter("a node's agent is killed with SIGKILL and restarted");
    let victim = 1;
    if let Some(mut a) = r.members[victim].agent.take() {
        a.kill9()?;
    }
    let bob = r.mint("bob")?;
    r.story.step(
        "while it is down, its kernel still drops the revoked client",
        !r.answers(victim),
    );
    let origin = r.start_agent(victim)?;
    r.story.step(
        &format!("the restarted agent adopts its pinned state ({origin})"),
        origin == "adopted",
    );
    let knocked = r.knock(victim, &bob)?;
    r.story.step(
        "bob is admitted by the restarted agent",
        knocked && r.answers(victim),
    );

    r.story
        .chapter("the collector holds every node's chain, without a gap");
    let status = r.ctl_fleet_json(&["status"])?;
    let sealed: Vec<u64> = status["nodes"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|n| n["reply"]["sealed_seq"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let delivered = poll_until(DELIVERY, || {
        let now = r.ctl_fleet_json(&["status"]).ok()?;
        let acked: Vec<u64> = now["nodes"]
            .as_array()?
            .iter()
            .map(|n| n["reply"]["acked_seq"].as_u64().unwrap_or(0))
            .collect();
        (acked.len() == sealed.len() && acked.iter().zip(&sealed).all(|(a, s)| a >= s))
            .then_some(acked)
    });
    r.story.step(
        &format!("the collector acknowledged every node's events up to {sealed:?}"),
        delivered.is_some(),
    );
    let verify = std::process::Command::new(&r.exe)
        .args(["audit", "verify", "--json"])
        .arg(out)
        .output()?;
    let report: Value = serde_json::from_slice(&verify.stdout).unwrap_or(Value::Null);
    let nodes = report["nodes"].as_array().cloned().unwrap_or_default();
    for m in &r.members {
        let row = nodes.iter().find(|v| v["node_id"] == m.name.as_str());
        let line = row.map_or_else(
            || "missing".to_string(),
            |v| {
                format!(
                    "seq {}..{}, {} events, {} checkpoints, key {}",
                    v["first_seq"], v["last_seq"], v["events"], v["checkpoints"], v["key_source"]
                )
            },
        );
        r.story.step(
            &format!("{}: {line}", m.name),
            row.is_some_and(|v| {
                v["first_seq"] == 1
                    && v["events"].as_u64().unwrap_or(0) > 0
                    && v["declared_gaps"].as_array().is_some_and(Vec::is_empty)
            }),
        );
    }
    r.story.step(
        &format!(
            "`portcullis audit verify` on the collector's directory passes ({} records, {} problems)",
            report["records"],
            report["problems"].as_array().map_or(0, Vec::len)
        ),
        verify.status.success() && report["ok"] == true && nodes.len() == n,
    );
    if !verify.status.success() {
        r.story.show(&said(&verify));
    }
    Ok(())
}
