//! End to end: the agent fails closed where an operator could make it fail
//! open (issue "Fail closed everywhere"). Pins on a bpf filesystem private to
//! the agent's mount namespace are refused; a link pin removed under a
//! running agent is restored; every kernel drop reaches the audit trail
//! across stops, crashes and restarts; the one-shot commands behave on a
//! closed pipe and without root.
//!
//! The tests of this file run one at a time (`e2e::serial`).

use portcullis_e2e::e2e;

use std::{
    collections::BTreeMap,
    io::Read,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use e2e::{
    DROPPED, Env, OK_TIMEOUT, PROTECTED_PORT, READY_TIMEOUT, Settings, parse_status, serial,
};
use portcullis_common::Reason;
use portcullis_proto::v1::{event::Body, lifecycle::Phase};
use portcullis_testkit::{AgentProcess, poll_until};

/// A pin directory on the namespace's own /sys/fs/bpf: `ip netns exec`
/// (how the harness, and many operators, start the agent) gives the agent a
/// new mount namespace with a fresh /sys, so a bpffs mounted there lives
/// and dies with the agent.
fn private_bpffs_config(env: &Env) -> String {
    let pin_dir = format!(
        "/sys/fs/bpf/pcl-e2e-{}-{}",
        std::process::id(),
        env.topo.index
    );
    let text = std::fs::read_to_string(&env.config).expect("config");
    text.lines()
        .map(|l| {
            if l.starts_with("pin_dir = ") {
                format!("pin_dir = \"{pin_dir}\"")
            } else if l.starts_with("bpffs = ") {
                "bpffs = \"/sys/fs/bpf\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn xdp_attached(env: &Env) -> bool {
    let out = env
        .topo
        .server
        .ip(&["-d", "link", "show", "dev", &env.topo.server_if])
        .expect("ip link");
    out.contains("xdp")
}

fn state_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_bpffs_private_to_the_agent_is_refused_and_nothing_is_left() {
    let _s = serial();
    let env = Env::new("pinpriv", &Settings::default());
    let text = private_bpffs_config(&env);
    std::fs::write(&env.config, &text).expect("write config");
    let mut agent =
        AgentProcess::spawn(&env.binary, &env.topo.server, &env.config, &[]).expect("spawn agent");
    let status = poll_until(READY_TIMEOUT, || agent.try_wait().ok().flatten())
        .expect("the agent exits by itself");
    let log = agent.log();
    assert!(!status.success(), "refused: {log}");
    for hint in [
        "nsenter",
        "ip netns exec",
        "mountPropagation",
        "ephemeral_pins",
    ] {
        assert!(
            log.contains(hint),
            "the message says how to run it ({hint}):\n{log}"
        );
    }
    assert!(!xdp_attached(&env), "nothing was attached");
    // No node key, spool or ledger: only the config the test wrote.
    assert_eq!(state_files(env.state_dir()), ["agent.toml"], "{log}");
    // The port is open as before: no enforcement was promised.
    let _echo = env.echo_server(false, PROTECTED_PORT);
    env.assert_echo(false, PROTECTED_PORT, "no agent, no enforcement");
}

/// Explicitly allowed (tests, demos), ephemeral pins start, and the trail
/// says so; and they show why they are refused by default: the enforcement
/// ends with the agent.
#[test]
fn ephemeral_pins_are_allowed_explicitly_and_reported() {
    let _s = serial();
    let mut env = Env::new("pineph", &Settings::default());
    let text =
        private_bpffs_config(&env).replace("[kernel]\n", "[kernel]\nephemeral_pins = true\n");
    std::fs::write(&env.config, &text).expect("write config");
    assert_eq!(env.start_agent(), "fresh");
    let _echo = env.echo_server(false, PROTECTED_PORT);
    env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "enforced while the agent runs",
    );
    let started = env
        .spool_events()
        .into_iter()
        .find_map(|e| match e.body {
            Some(Body::Lifecycle(l)) if l.phase == Phase::Started as i32 => Some(l),
            _ => None,
        })
        .expect("a STARTED event");
    assert!(started.ephemeral_pins, "{started:?}");
    assert!(started.pin_durability.contains("ephemeral"), "{started:?}");
    assert!(env.agent().log().contains("ephemeral_pins"));
    env.agent().terminate(OK_TIMEOUT).expect("SIGTERM");
    env.agent = None;
    // The namespace, its bpffs and the pins are gone with the agent.
    poll_until(OK_TIMEOUT, || (!xdp_attached(&env)).then_some(()))
        .expect("the program went with the pins");
    env.assert_echo(false, PROTECTED_PORT, "open once the agent is gone");
}

/// A link pin removed while the agent runs is pinned again within about a
/// second; enforcement never stops, and still holds after the agent dies.
#[test]
fn a_removed_link_pin_is_restored() {
    let _s = serial();
    let mut env = Env::with_agent("pinlink", &Settings::default());
    let _echo = env.echo_server(false, PROTECTED_PORT);
    let links = env.bpffs.pin_dir().join("links");
    let xdp = links.join(format!("xdp-{}", env.topo.server_if));
    let tc = links.join(format!("tc-{}", env.topo.server_if));
    assert!(xdp.exists() && tc.exists());
    std::fs::remove_file(&xdp).expect("remove the XDP link pin");
    std::fs::remove_file(&tc).expect("remove the TC link pin");
    env.assert_dropped(
        false,
        PROTECTED_PORT,
        true,
        "enforced while the pin is gone",
    );
    poll_until(Duration::from_secs(3), || {
        (xdp.exists() && tc.exists()).then_some(())
    })
    .unwrap_or_else(|| panic!("pins restored; log:\n{}", env.agent().log()));
    assert!(env.agent().log().contains("link_repinned"));
    let repaired = poll_until(Duration::from_secs(3), || {
        let n = env
            .spool_events()
            .iter()
            .filter(|e| {
                matches!(&e.body, Some(Body::Lifecycle(l)) if l.phase == Phase::Repaired as i32)
            })
            .count();
        (n >= 2).then_some(n)
    });
    assert!(repaired.is_some(), "both repairs are audited");
    env.agent().kill9().expect("SIGKILL");
    env.agent = None;
    env.assert_dropped(
        false,
        PROTECTED_PORT,
        true,
        "still enforced by the restored pins",
    );
}

/// Kernel drop counters of the drop reasons, from `agent status`.
fn kernel_drops(env: &Env) -> BTreeMap<String, u64> {
    let text = parse_status(&env.cli_ok("status", &[]));
    let json = portcullis_e2e::e2e::status_from_json(&env.cli_ok("status", &["--json"]));
    // `--json` says what the lines say (counters only grow in between).
    assert_eq!(
        text.keys().collect::<Vec<_>>(),
        json.keys().collect::<Vec<_>>()
    );
    for (k, v) in text
        .iter()
        .filter(|(k, _)| Reason::ALL.iter().any(|r| r.name() == *k))
    {
        assert!(json[k] >= *v, "agent status --json {k}: {} < {v}", json[k]);
    }
    text.into_iter()
        .filter(|(name, _)| Reason::ALL.iter().any(|r| r.is_drop() && r.name() == name))
        .collect()
}

/// What the trail's drop summaries add up to, per kernel drop reason.
fn trail_drops(env: &Env) -> BTreeMap<String, u64> {
    let mut sum = BTreeMap::new();
    for e in env.spool_events() {
        if let Some(Body::DropSummary(s)) = e.body {
            for r in s.reasons {
                if Reason::ALL.iter().any(|k| k.name() == r.reason) {
                    *sum.entry(r.reason).or_insert(0) += r.packets;
                }
            }
        }
    }
    sum
}

/// SYNs from the client's second address (never admitted) until stopped.
struct Unadmitted {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Unadmitted {
    fn start(env: &Env) -> Unadmitted {
        let stop = Arc::new(AtomicBool::new(false));
        let ns = env.topo.client.path();
        let src = env.topo.client_alt_addr(false);
        let dst = env.server(false, PROTECTED_PORT);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            portcullis_testkit::enter_path(&ns).expect("enter the client namespace");
            // Bounded: at most ten minutes even if never stopped.
            let end = std::time::Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                // One SYN each: the attempt gives up after 20 ms.
                let _ = portcullis_testkit::connect_bound_here(
                    std::net::SocketAddr::new(src, 0),
                    dst,
                    Duration::from_millis(20),
                );
            }
        });
        Unadmitted {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("traffic thread");
        }
    }
}

impl Drop for Unadmitted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the kernel counted `more` further `no_admission` drops.
fn wait_drops(env: &Env, more: u64) {
    let start = kernel_drops(env).get("no_admission").copied().unwrap_or(0);
    poll_until(Duration::from_secs(10), || {
        (kernel_drops(env).get("no_admission").copied().unwrap_or(0) >= start + more).then_some(())
    })
    .expect("traffic is being dropped");
}

/// Drops during and around a SIGTERM and a SIGKILL restart: the trail's
/// summaries add up exactly to the kernel's counters, reason by reason.
#[test]
fn every_drop_is_in_the_trail_across_restarts() {
    let _s = serial();
    let mut env = Env::with_agent("dropsum", &Settings::default());
    let traffic = Unadmitted::start(&env);
    wait_drops(&env, 20);
    // A graceful stop writes a final summary ...
    env.agent().terminate(OK_TIMEOUT).expect("SIGTERM");
    env.agent = None;
    // ... drops while no agent runs ...
    wait_drops(&env, 20);
    assert_eq!(env.start_agent(), "adopted");
    wait_drops(&env, 20);
    // ... a crash leaves no final summary ...
    env.agent().kill9().expect("SIGKILL");
    env.agent = None;
    wait_drops(&env, 20);
    // ... and the next start reports everything since the last one.
    assert_eq!(env.start_agent(), "adopted");
    wait_drops(&env, 20);
    traffic.stop();
    env.agent().terminate(OK_TIMEOUT).expect("SIGTERM");
    env.agent = None;
    let kernel = kernel_drops(&env);
    let trail = trail_drops(&env);
    assert!(kernel["no_admission"] >= 100, "{kernel:?}");
    for (reason, n) in &kernel {
        assert_eq!(
            trail.get(reason).copied().unwrap_or(0),
            *n,
            "{reason}: the trail's summaries vs the kernel counter\nkernel {kernel:?}\ntrail {trail:?}"
        );
    }
    let restarts = env
        .spool_events()
        .into_iter()
        .filter(|e| matches!(&e.body, Some(Body::DropSummary(s)) if s.since_restart))
        .count();
    assert_eq!(restarts, 3, "one catch-up summary per start");
}

/// `agent status | head -1`: a closed pipe ends the command quietly, never
/// a panic; and status shows the pins and how full each table is.
#[test]
fn status_on_a_closed_pipe_and_table_fill() {
    let _s = serial();
    let env = Env::with_agent("statpipe", &Settings::default());
    let text = env.cli_ok("status", &[]);
    assert!(text.contains("pins host mount namespace"), "{text}");
    for map in ["PCL_ADMIT", "PCL_FLOWS", "PCL_IDENT", "PCL_KNOCK_SRC"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("table {map} "))),
            "{map} fill in status:\n{text}"
        );
    }
    assert!(text.contains("raise=kernel.max_admissions"), "{text}");
    let config = env.config.to_str().expect("utf-8").to_owned();
    let mut child = env
        .topo
        .server
        .exec(&env.binary)
        .args(["agent", "status", "--config", &config])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn status");
    // Read one line, then close the pipe, as `head -1` does.
    let mut out = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    out.read_exact(&mut first).expect("some output");
    drop(out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    let status = child.wait().expect("wait");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{status:?}: {err}"
    );
}

/// Without root, the one-shot commands say so instead of "no pinned state".
#[test]
fn non_root_commands_ask_for_root() {
    let _s = serial();
    let env = Env::with_agent("nonroot", &Settings::default());
    let config = env.config.to_str().expect("utf-8").to_owned();
    for args in [
        vec!["agent", "status", "--config", &config],
        vec![
            "agent",
            "admit",
            "--config",
            &config,
            "--identity",
            "x",
            "--source",
            "10.0.0.1",
            "--service",
            "llm",
            "--ttl-secs",
            "5",
        ],
        vec!["agent", "revoke", "--config", &config, "--identity", "x"],
    ] {
        let out = Command::new(&env.binary)
            .args(&args)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run as nobody");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("permission denied (run as root)"),
            "{args:?}: {err}"
        );
    }
    // Nothing was changed by the refused calls.
    assert_eq!(parse_status(&env.cli_ok("status", &[]))["admissions"], 0);
    let _ = DROPPED;
}
