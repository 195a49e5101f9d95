//! End to end: the real agent, the real XDP/TC programs on a veth, real TCP
//! and UDP between two network namespaces (docs/operations.md).
//!
//! Each test builds its own topology, bpffs and agent; the tests of this
//! file run one at a time (`e2e::serial`) because several assert
//! timing (expiry and revocation within a second, rates within 15%).

use portcullis_e2e::e2e;

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use e2e::{
    ECHO_TIMEOUT, EchoLoop, Env, IDENTITY, KNOCK_PORT, OK_TIMEOUT, OPEN_PORT, PROTECTED_PORT,
    SERVICE, Settings, serial,
};
use portcullis_testkit::FloodPlan;

fn family(v6: bool) -> &'static str {
    if v6 { "v6" } else { "v4" }
}

// ---- default deny -----------------------------------------------------------

fn unadmitted_is_dropped(v6: bool, xdp_mode: &'static str) {
    let _serial = serial();
    let settings = Settings {
        xdp_mode,
        ..Settings::default()
    };
    let env = Env::with_agent(&format!("deny{}", family(v6)), &settings);
    let _protected = env.echo_server(v6, PROTECTED_PORT);
    let _open = env.echo_server(v6, OPEN_PORT);
    env.assert_dropped(
        v6,
        PROTECTED_PORT,
        false,
        "unadmitted client, protected port",
    );
    env.assert_echo(v6, OPEN_PORT, "unprotected port on the same server");
    // No listener on an unprotected port: the stack answers (RST) as usual.
    let closed = portcullis_testkit::try_connect(&env.topo.client, env.server(v6, 9), OK_TIMEOUT);
    assert_eq!(
        closed.expect_err("nothing listens on 9").kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let status = env.status();
    assert!(
        status.get("no_admission").copied().unwrap_or(0) >= 1,
        "the dropped SYN is counted: {status:?}"
    );
}

#[test]
fn unadmitted_connect_times_out_open_port_connects_v4() {
    unadmitted_is_dropped(false, "auto");
}

#[test]
fn unadmitted_connect_times_out_open_port_connects_v6() {
    unadmitted_is_dropped(true, "auto");
}

#[test]
fn unadmitted_connect_times_out_generic_xdp() {
    unadmitted_is_dropped(false, "generic");
}

// ---- static admissions ------------------------------------------------------

#[test]
fn static_admission_lets_the_client_through_v4_and_v6() {
    let _serial = serial();
    let env = env_with("adm", |e| {
        Settings::default()
            .admit(e.topo.client_addr(false), 3600)
            .admit(e.topo.client_addr(true), 3600)
    });
    for v6 in [false, true] {
        let _server = env.echo_server(v6, PROTECTED_PORT);
        env.assert_echo(
            v6,
            PROTECTED_PORT,
            &format!("admitted client ({})", family(v6)),
        );
        // The same client from its other address has no admission.
        env.assert_dropped(v6, PROTECTED_PORT, true, "second, unadmitted address");
    }
    let status = env.status();
    assert!(status.get("passed").copied().unwrap_or(0) > 0, "{status:?}");
}

/// An `Env` whose config admits (or lets later admit) the client: the
/// config is written once the topology's addresses are known.
fn env_with(name: &str, settings: impl FnOnce(&Env) -> Settings) -> Env {
    let mut env = Env::new(name, &Settings::default());
    let s = settings(&env);
    std::fs::write(
        &env.config,
        e2e::config_text(&env.topo, &env.bpffs, env.state_dir(), &s),
    )
    .unwrap();
    assert_eq!(env.start_agent(), "fresh");
    env
}

// ---- expiry -----------------------------------------------------------------

fn expiry_cuts_established_connection(v6: bool) {
    let _serial = serial();
    const TTL: u64 = 3;
    let env = env_with(&format!("exp{}", family(v6)), |_| Settings::default());
    let _server = env.echo_server(v6, PROTECTED_PORT);
    env.assert_dropped(v6, PROTECTED_PORT, false, "before the admission");
    let source = env.topo.client_addr(v6).to_string();
    let ttl = TTL.to_string();
    let before = Instant::now();
    env.cli_ok(
        "admit",
        &[
            "--identity",
            IDENTITY,
            "--source",
            &source,
            "--service",
            SERVICE,
            "--ttl-secs",
            &ttl,
        ],
    );
    let after = Instant::now();
    // The kernel expiry lies between these two (same monotonic clock).
    let earliest = before + Duration::from_secs(TTL);
    let latest = after + Duration::from_secs(TTL);
    let stream = env
        .connect(v6, PROTECTED_PORT, OK_TIMEOUT)
        .expect("admitted client connects");
    let echo = EchoLoop::start(stream, latest + Duration::from_secs(3));
    let out = echo.join();
    let (failed_at, why) = out
        .failed_at
        .clone()
        .unwrap_or_else(|| panic!("data still flows 3 s after expiry: {out:?}"));
    assert!(
        failed_at + Duration::from_millis(50) >= earliest,
        "connection cut {:?} before the admission expired ({why})",
        earliest.saturating_duration_since(failed_at)
    );
    let late = failed_at.saturating_duration_since(latest);
    assert!(
        late <= Duration::from_millis(1500),
        "first failed echo {late:?} after expiry (limit 1.5 s)"
    );
    assert!(
        out.ok > 100 && out.longest_gap < Duration::from_millis(500),
        "data flowed continuously until expiry: {out:?}"
    );
    eprintln!(
        "expiry {}: cut {:?} after the latest possible expiry; {} echoes before",
        family(v6),
        late,
        out.ok
    );
    // New connections are refused too (silently).
    env.assert_dropped(v6, PROTECTED_PORT, false, "after expiry");
    let status = env.status();
    assert!(
        status.get("expired").copied().unwrap_or(0) >= 1,
        "{status:?}"
    );
}

#[test]
fn expiry_stops_an_established_connection_within_a_second_v4() {
    expiry_cuts_established_connection(false);
}

#[test]
fn expiry_stops_an_established_connection_within_a_second_v6() {
    expiry_cuts_established_connection(true);
}

// ---- revocation -------------------------------------------------------------

fn revocation_cuts_established_connection(v6: bool, by_identity: bool) {
    let _serial = serial();
    let env = env_with(&format!("rev{}", family(v6)), |e| {
        Settings::default().admit(e.topo.client_addr(v6), 3600)
    });
    let _server = env.echo_server(v6, PROTECTED_PORT);
    let stream = env
        .connect(v6, PROTECTED_PORT, OK_TIMEOUT)
        .expect("admitted client connects");
    let echo = EchoLoop::start(stream, Instant::now() + Duration::from_secs(10));
    assert!(
        echo.wait_for(50, Duration::from_secs(5)),
        "echo loop is running"
    );
    let source = env.topo.client_addr(v6).to_string();
    let args: Vec<&str> = if by_identity {
        vec!["--identity", IDENTITY]
    } else {
        vec!["--source", &source, "--service", SERVICE]
    };
    let issued = Instant::now();
    env.cli_ok("revoke", &args);
    let done = Instant::now();
    let out = echo.join();
    let (failed_at, _) = out
        .failed_at
        .clone()
        .unwrap_or_else(|| panic!("revocation did not cut the connection: {out:?}"));
    let delay = failed_at.saturating_duration_since(issued);
    eprintln!(
        "revoke {} ({}): command took {:?}, first failed echo {:?} after issuing it",
        family(v6),
        if by_identity {
            "identity"
        } else {
            "source/service"
        },
        done - issued,
        delay
    );
    assert!(
        failed_at + ECHO_TIMEOUT >= issued,
        "connection failed before the revocation: {out:?}"
    );
    assert!(
        delay <= Duration::from_secs(1),
        "revocation took {delay:?} to reach the established connection (limit 1 s)"
    );
    env.assert_dropped(v6, PROTECTED_PORT, false, "new connection after revocation");
    let status = env.status();
    let cut = status.get("revoked").copied().unwrap_or(0)
        + status.get("no_admission").copied().unwrap_or(0);
    assert!(cut >= 1, "{status:?}");
}

#[test]
fn revoke_identity_cuts_an_established_connection_v4() {
    revocation_cuts_established_connection(false, true);
}

#[test]
fn revoke_identity_cuts_an_established_connection_v6() {
    revocation_cuts_established_connection(true, true);
}

#[test]
fn revoke_source_service_cuts_an_established_connection_v4() {
    revocation_cuts_established_connection(false, false);
}

#[test]
fn revoke_source_service_cuts_an_established_connection_v6() {
    revocation_cuts_established_connection(true, false);
}

// ---- connection rate --------------------------------------------------------

fn connection_rate_is_enforced(v6: bool) {
    let _serial = serial();
    const RATE: f64 = 20.0;
    const BURST: f64 = 1.0;
    let env = env_with(&format!("rate{}", family(v6)), |e| {
        Settings::default()
            .identity(IDENTITY, "conn_per_sec = 20\nconn_burst = 1")
            .admit(e.topo.client_addr(v6), 3600)
    });
    let server = env.echo_server(v6, PROTECTED_PORT);
    let plan = FloodPlan {
        duration: Duration::from_secs(3),
        // 1000 attempts/s: a refill is used within 1 ms of becoming due.
        interval: Duration::from_millis(1),
        // Shorter than the 1 s SYN retransmit: a dropped SYN is abandoned.
        attempt_timeout: Duration::from_millis(200),
        max_pending: 512,
    };
    let st =
        portcullis_testkit::connect_flood(&env.topo.client, env.server(v6, PROTECTED_PORT), plan)
            .expect("flood");
    let secs = st.elapsed.as_secs_f64();
    let expected = BURST + RATE * secs;
    eprintln!(
        "rate {}: {st:?}; expected {expected:.1} connections in {secs:.3} s",
        family(v6)
    );
    assert!(st.attempts > 1000, "attempts came fast enough: {st:?}");
    let got = f64::from(st.connected);
    assert!(
        (got - expected).abs() <= expected * 0.15,
        "{} connections in {secs:.3} s, expected {expected:.1} ± 15% ({st:?})",
        st.connected
    );
    let status = env.status();
    assert!(
        status.get("conn_rate").copied().unwrap_or(0) >= u64::from(st.timed_out) / 2,
        "dropped SYNs counted as conn_rate: {status:?} {st:?}"
    );
    drop(server);
}

#[test]
fn connection_rate_limit_holds_within_15_percent_v4() {
    connection_rate_is_enforced(false);
}

#[test]
fn connection_rate_limit_holds_within_15_percent_v6() {
    connection_rate_is_enforced(true);
}

// ---- knock pre-auth limiter -------------------------------------------------

fn knock_flood_is_limited_per_source(v6: bool) {
    let _serial = serial();
    const SENT: u32 = 2000;
    const RATE: f64 = 5.0;
    const BURST: f64 = 10.0;
    let env = env_with(&format!("knock{}", family(v6)), |_| Settings::default());
    let before = env.status();
    let server_addr = SocketAddr::new(env.topo.server_addr(v6), KNOCK_PORT);
    // Our own socket on the knock port counts what passes XDP. Should the
    // agent hold the port itself (its knock listener), count with the
    // kernel's knock_passed counter instead.
    let server = match env
        .topo
        .server
        .run(|| UdpSocket::bind(server_addr))
        .unwrap()
    {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            eprintln!("knock: {server_addr} is held (by the agent); counting knock_passed instead");
            None
        }
        Err(e) => panic!("bind the knock port {server_addr} in the server namespace: {e}"),
    };
    let any: SocketAddr = if v6 {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let client = env
        .topo
        .client
        .run(|| UdpSocket::bind(any))
        .unwrap()
        .unwrap();
    let payload = [0x5au8; 64];
    let start = Instant::now();
    for i in 0..SENT {
        let mut p = payload;
        p[..4].copy_from_slice(&i.to_be_bytes());
        client.send_to(&p, server_addr).expect("send knock");
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Drain: everything that passed XDP is already queued or arrives within
    // microseconds; stop at the first 300 ms of silence (bounded).
    let received = match &server {
        Some(server) => {
            server
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut received = 0u32;
            let mut buf = [0u8; 256];
            let drain_deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < drain_deadline {
                match server.recv_from(&mut buf) {
                    Ok(_) => received += 1,
                    Err(_) => break,
                }
            }
            received
        }
        None => {
            let now = env.status();
            let passed = now.get("knock_passed").copied().unwrap_or(0)
                - before.get("knock_passed").copied().unwrap_or(0);
            u32::try_from(passed).expect("small count")
        }
    };
    let limit = BURST + RATE * elapsed * 1.15 + 1.0;
    eprintln!(
        "knock {}: {received} of {SENT} received in {elapsed:.3} s (limit {limit:.1})",
        family(v6)
    );
    assert!(
        f64::from(received) >= 10.0 && f64::from(received) <= limit,
        "{received} knocks passed, expected 10..={limit:.1}"
    );
    let after = env.status();
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let (src_drops, passed, global) = (
        delta("knock_source_rate"),
        delta("knock_passed"),
        delta("knock_global_rate"),
    );
    eprintln!(
        "knock {}: status knock_source_rate={src_drops} knock_passed={passed} knock_global_rate={global}",
        family(v6)
    );
    assert_eq!(
        passed,
        u64::from(received),
        "knock_passed counts what reached the socket"
    );
    let rest = u64::from(SENT - received);
    // Datagrams lost before XDP (veth ring overflow) are not counted by
    // the kernel program at all: allow a few percent.
    assert!(
        src_drops <= rest && src_drops as f64 >= rest as f64 * 0.95,
        "knock_source_rate drops {src_drops}, expected ≈ {rest}"
    );
}

#[test]
fn knock_flood_is_rate_limited_per_source_v4() {
    knock_flood_is_limited_per_source(false);
}

#[test]
fn knock_flood_is_rate_limited_per_source_v6() {
    knock_flood_is_limited_per_source(true);
}
