//! End to end: fail static across agent crashes and restarts, adoption of
//! the pinned state, and `agent detach` (docs/operations.md).

use portcullis_e2e::e2e;

use std::time::{Duration, Instant};

use e2e::{EchoLoop, Env, OK_TIMEOUT, PROTECTED_PORT, Settings, serial};
use portcullis_testkit::echo_roundtrip;

/// Admitted traffic flows and unadmitted traffic is dropped, for both
/// address families.
fn assert_enforcing(env: &Env, when: &str) {
    for v6 in [false, true] {
        env.assert_echo(
            v6,
            PROTECTED_PORT,
            &format!("{when}: admitted client (v6={v6})"),
        );
        env.assert_dropped(
            v6,
            PROTECTED_PORT,
            true,
            &format!("{when}: unadmitted address (v6={v6})"),
        );
    }
}

#[test]
fn enforcement_survives_kill9_restart_adopts_and_detach_opens() {
    let _serial = serial();
    let mut env = Env::new("restart", &Settings::default());
    let settings = Settings::default()
        .admit(env.topo.client_addr(false), 3600)
        .admit(env.topo.client_addr(true), 3600);
    std::fs::write(
        &env.config,
        e2e::config_text(&env.topo, &env.bpffs, env.state_dir(), &settings),
    )
    .unwrap();
    assert_eq!(env.start_agent(), "fresh");
    let _v4 = env.echo_server(false, PROTECTED_PORT);
    let _v6 = env.echo_server(true, PROTECTED_PORT);
    assert_enforcing(&env, "agent running");

    // An established connection that must live through everything below.
    let mut held = env
        .connect(false, PROTECTED_PORT, OK_TIMEOUT)
        .expect("connect");
    echo_roundtrip(&mut held, b"before", OK_TIMEOUT).expect("echo before");
    // And one echoing continuously across the crash and the restart.
    let streaming = env
        .connect(true, PROTECTED_PORT, OK_TIMEOUT)
        .expect("connect");
    let echo = EchoLoop::start(streaming, Instant::now() + Duration::from_secs(120));
    assert!(echo.wait_for(20, Duration::from_secs(5)));

    // Crash: the kernel keeps enforcing the pinned programs and maps.
    let pid = env.agent().pid().expect("pid");
    // `ip netns exec` execs in place: the child is the agent itself.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("agent exe");
    assert_eq!(exe, env.binary, "pid {pid} is the agent, not a wrapper");
    env.agent().kill9().expect("kill -9");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "agent {pid} is gone"
    );
    env.agent = None;
    assert!(
        env.bpffs
            .pin_dir()
            .join("links")
            .read_dir()
            .unwrap()
            .count()
            >= 1
    );
    assert_enforcing(&env, "agent dead");
    echo_roundtrip(&mut held, b"while dead", OK_TIMEOUT).expect("established flow while dead");
    // Status works from the pins alone.
    let status = env.status();
    assert!(
        status.get("no_admission").copied().unwrap_or(0) >= 2,
        "{status:?}"
    );

    // Restart: adopts the pinned programs and maps untouched.
    assert_eq!(
        env.start_agent(),
        "adopted",
        "restart adopts the pinned state"
    );
    assert_enforcing(&env, "agent restarted");
    echo_roundtrip(&mut held, b"after restart", OK_TIMEOUT)
        .expect("established flow after restart");
    let before_stop = echo.ok.load(std::sync::atomic::Ordering::Relaxed);
    let out = echo.stop();
    assert!(
        out.failed_at.is_none(),
        "the streaming connection broke during crash/restart: {out:?}"
    );
    assert!(out.ok >= before_stop);
    eprintln!(
        "restart: {} echoes across crash and restart, longest gap {:?}",
        out.ok, out.longest_gap
    );

    // Graceful stop leaves the programs in place (fail static).
    let status = env
        .agent()
        .terminate(Duration::from_secs(10))
        .expect("SIGTERM");
    assert!(status.success(), "agent exit status on SIGTERM: {status}");
    env.agent = None;
    assert_enforcing(&env, "agent stopped with SIGTERM");

    // detach: the operator's explicit act; the ports open.
    env.cli_ok("detach", &[]);
    for v6 in [false, true] {
        let mut s = env
            .connect_alt(v6, PROTECTED_PORT, OK_TIMEOUT)
            .unwrap_or_else(|e| {
                panic!("after detach, unadmitted connect (v6={v6}) must succeed: {e}")
            });
        echo_roundtrip(&mut s, b"open", OK_TIMEOUT).expect("echo after detach");
    }
    assert!(
        !env.bpffs.pin_dir().join("links").exists()
            || env
                .bpffs
                .pin_dir()
                .join("links")
                .read_dir()
                .unwrap()
                .count()
                == 0,
        "no pinned links remain"
    );
}

#[test]
fn restart_while_unadmitted_stays_closed_and_static_admissions_are_not_reinstalled() {
    let _serial = serial();
    let mut env = Env::new("readopt", &Settings::default());
    let settings = Settings::default().admit(env.topo.client_addr(false), 3600);
    std::fs::write(
        &env.config,
        e2e::config_text(&env.topo, &env.bpffs, env.state_dir(), &settings),
    )
    .unwrap();
    assert_eq!(env.start_agent(), "fresh");
    let _server = env.echo_server(false, PROTECTED_PORT);
    env.assert_echo(false, PROTECTED_PORT, "static admission");
    // Revoke the static admission, then restart: adoption must not bring it
    // back (static admissions are installed only on a fresh load).
    let source = env.topo.client_addr(false).to_string();
    env.cli_ok("revoke", &["--source", &source, "--service", e2e::SERVICE]);
    env.assert_dropped(false, PROTECTED_PORT, false, "after revoke");
    env.agent().kill9().expect("kill -9");
    env.agent = None;
    env.assert_dropped(false, PROTECTED_PORT, false, "agent dead");
    assert_eq!(env.start_agent(), "adopted");
    env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "adopted: revoked admission stays gone",
    );
}

#[test]
fn a_failing_test_leaves_no_agent_pins_mount_or_namespace_behind() {
    let _serial = serial();
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut env = Env::with_agent("guard", &Settings::default());
        seen = Some((
            env.agent().pid().expect("pid"),
            env.bpffs.path().to_path_buf(),
            env.topo.netns_names().map(str::to_owned),
            env.config.clone(),
        ));
        panic!("a test fails while the agent runs");
    }));
    assert!(result.is_err());
    let (pid, mount, names, config) = seen.expect("env was built");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "agent {pid} killed"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(mount.to_str().unwrap()), "bpffs unmounted");
    assert!(!mount.exists(), "mount point removed");
    assert!(!config.exists(), "config directory removed");
    let listed = portcullis_testkit::list_netns().unwrap();
    for n in &names {
        assert!(!listed.contains(n), "{n} deleted");
    }
}
