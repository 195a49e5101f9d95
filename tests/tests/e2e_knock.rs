//! End to end: admission by knock (docs/admission.md). The real agent
//! with a `[tokens]` section runs in the server namespace; tokens come from
//! the development issuer (`portcullis_agent::devtoken`) in a temporary
//! directory; clients knock with the real `portcullis knock` CLI, or send
//! datagrams built with the client library (`build_knock`) from sockets in
//! the client namespace. IPv4 and IPv6.
//!
//! The tests of this file run one at a time (`e2e::serial`): several
//! bound how long something takes.

use portcullis_e2e::e2e;

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use e2e::{
    DROPPED, OK_TIMEOUT, PROTECTED_PORT, SERVICE,
    knock::{KnockEnv, KnockService, KnockSettings, close_with_rst},
    serial,
};
use portcullis_agent::loader::clock;
use portcullis_testkit::echo_roundtrip;

const INVOKE: &str = "model:llm:invoke";
const TOKEN_TTL: Duration = Duration::from_secs(300);

fn family(v6: bool) -> &'static str {
    if v6 { "v6" } else { "v4" }
}

/// Seconds in the CLI's "admitted to S until T (in Ns)".
fn admitted_secs(stdout: &str) -> u64 {
    stdout
        .rsplit_once("(in ")
        .and_then(|(_, rest)| rest.split_once("s)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no \"(in Ns)\" in {stdout:?}"))
}

fn assert_timed_out(r: io::Result<std::net::TcpStream>, what: &str) {
    match r {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
        Err(e) => panic!("{what}: expected a silent drop (timeout), got error: {e}"),
        Ok(s) => panic!(
            "{what}: connect unexpectedly succeeded ({:?} -> {:?})",
            s.local_addr(),
            s.peer_addr()
        ),
    }
}

// ---- knock, then connect ----------------------------------------------------

fn knock_admits_and_connect_echoes(v6: bool) {
    let _serial = serial();
    let k = KnockEnv::start(&format!("kn{}", family(v6)), &KnockSettings::default());
    let _server = k.env.echo_server(v6, PROTECTED_PORT);
    k.env
        .assert_dropped(v6, PROTECTED_PORT, false, "before the knock");
    assert!(k.admissions().is_empty(), "no admission before the knock");

    let token = k.mint(&[INVOKE], TOKEN_TTL);
    let out = k.knock_ok(v6, &token, SERVICE, &[]);
    eprintln!("knock {}: {}", family(v6), out.trim());
    // min(token exp, max_ttl): the token's 300 s here.
    let secs = admitted_secs(&out);
    assert!((290..=300).contains(&secs), "admitted for {secs}s: {out}");

    let client = k.env.topo.client_addr(v6);
    let adm = k
        .admission(client, SERVICE, 0)
        .unwrap_or_else(|| panic!("admission of {client} in the kernel: {:?}", k.admissions()));
    let left = adm.expires_ns.saturating_sub(clock::monotonic_ns());
    assert!(
        (280_000_000_000..=301_000_000_000).contains(&left),
        "kernel expiry follows the token: {left} ns left"
    );
    assert_eq!(k.admissions().len(), 1, "exactly one admission");

    k.env.assert_echo(v6, PROTECTED_PORT, "admitted by knock");
    k.env.assert_dropped(
        v6,
        PROTECTED_PORT,
        true,
        "the client's other address was not admitted",
    );
    assert!(k.wait_log("knock admitted", OK_TIMEOUT), "{}", k.log());
}

#[test]
fn knock_with_invoke_scope_admits_and_connect_echoes_v4() {
    knock_admits_and_connect_echoes(false);
}

#[test]
fn knock_with_invoke_scope_admits_and_connect_echoes_v6() {
    knock_admits_and_connect_echoes(true);
}

// ---- scope ------------------------------------------------------------------

#[test]
fn token_for_another_service_is_refused() {
    let _serial = serial();
    let k = KnockEnv::start("knoth", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let token = k.mint(&["model:other:invoke"], TOKEN_TTL);
    k.knock_refused(false, &token, SERVICE, "token for model:other:invoke");
    assert!(
        k.wait_refused("scope", Duration::from_secs(5)),
        "refused for its scope:\n{}",
        k.log()
    );
    assert!(k.admissions().is_empty(), "{:?}", k.admissions());
    k.env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "after a refused knock (token for another service)",
    );
}

#[test]
fn retrain_service_needs_a_retrain_scope() {
    let _serial = serial();
    const TUNE: &str = "tune";
    const TUNE_PORT: u16 = 8001;
    let settings = KnockSettings {
        services: vec![
            KnockService {
                name: SERVICE,
                port: PROTECTED_PORT,
                action: "invoke",
            },
            KnockService {
                name: TUNE,
                port: TUNE_PORT,
                action: "retrain",
            },
        ],
        ..KnockSettings::default()
    };
    let k = KnockEnv::start("kntrain", &settings);
    let _llm = k.env.echo_server(false, PROTECTED_PORT);
    let _tune = k.env.echo_server(false, TUNE_PORT);

    // Neither another service's invoke scope nor this service's.
    let invoke_llm = k.mint(&[INVOKE], TOKEN_TTL);
    k.knock_refused(false, &invoke_llm, TUNE, "model:llm:invoke for tune");
    let invoke_tune = k.mint(&["model:tune:invoke"], TOKEN_TTL);
    k.knock_refused(false, &invoke_tune, TUNE, "model:tune:invoke for tune");
    assert!(
        k.wait_refused("scope", Duration::from_secs(5)),
        "{}",
        k.log()
    );
    assert!(k.admissions().is_empty(), "{:?}", k.admissions());
    k.env
        .assert_dropped(false, TUNE_PORT, false, "retrain port, no retrain scope");

    // A retrain scope (any service) admits to the retrain service only.
    let retrain = k.mint(&["model:*:retrain"], TOKEN_TTL);
    k.knock_ok(false, &retrain, TUNE, &[]);
    k.env
        .assert_echo(false, TUNE_PORT, "admitted with model:*:retrain");
    k.knock_refused(
        false,
        &retrain,
        SERVICE,
        "model:*:retrain for an invoke service",
    );
    k.env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "the invoke service is not covered by a retrain token",
    );
    let client = k.env.topo.client_addr(false);
    assert!(k.admission(client, TUNE, 0).is_some());
    assert!(k.admission(client, SERVICE, 0).is_none());
}

// ---- replay -----------------------------------------------------------------

/// The same datagram twice: the first is answered and admits, the replay
/// is refused silently (`replayed_nonce`) and does not touch the admission.
/// A fresh knock afterwards does extend it, so the comparison is sensitive.
fn replayed_knock_is_ignored(v6: bool) {
    let _serial = serial();
    const MAX_TTL: u64 = 600;
    let settings = KnockSettings {
        max_ttl_secs: MAX_TTL,
        ..KnockSettings::default()
    };
    let k = KnockEnv::start(&format!("knrep{}", family(v6)), &settings);
    // Longer than max_ttl: every grant's expiry is "now + max_ttl", so a
    // second grant would move it.
    let token = k.mint(&[INVOKE], Duration::from_secs(1800));
    let sock = k.client_udp(v6, None);
    let server = k.knock_addr(v6);
    let client = k.env.topo.client_addr(v6);

    let (datagram, nonce) = k.datagram(v6, &token, SERVICE, 0);
    sock.send_to(&datagram, server).expect("send knock");
    let reply = k
        .await_reply(&sock, &nonce, Duration::from_secs(3))
        .unwrap_or_else(|| panic!("the first knock is answered; agent log:\n{}", k.log()));
    assert!(reply.verified);
    assert_eq!(reply.service, SERVICE);
    let first = k.admission(client, SERVICE, 0).expect("admitted");
    let granted_at = first.expires_ns - MAX_TTL * 1_000_000_000;
    // Let the kernel clock move on (jiffies), so that any new grant would
    // carry a later expiry.
    assert!(
        portcullis_testkit::poll_until(Duration::from_secs(2), || {
            (clock::monotonic_ns() > granted_at + 50_000_000).then_some(())
        })
        .is_some()
    );

    sock.send_to(&datagram, server).expect("send replay");
    assert!(
        k.await_reply(&sock, &nonce, Duration::from_secs(1))
            .is_none(),
        "the replay must not be answered"
    );
    assert!(
        k.wait_refused("replayed_nonce", Duration::from_secs(5)),
        "the replay reached the agent and was refused as a replay:\n{}",
        k.log()
    );
    let after = k.admission(client, SERVICE, 0).expect("still admitted");
    assert_eq!(
        after.expires_ns, first.expires_ns,
        "the replay did not extend the admission"
    );

    // Control: a fresh knock of the same token extends it.
    let (fresh, fresh_nonce) = k.datagram(v6, &token, SERVICE, 0);
    sock.send_to(&fresh, server).expect("send fresh knock");
    k.await_reply(&sock, &fresh_nonce, Duration::from_secs(3))
        .expect("a fresh knock is answered");
    let extended = k.admission(client, SERVICE, 0).expect("admitted");
    assert!(
        extended.expires_ns > first.expires_ns,
        "a fresh knock extends the admission ({} -> {})",
        first.expires_ns,
        extended.expires_ns
    );
}

#[test]
fn replayed_knock_gets_no_reply_and_does_not_extend_v4() {
    replayed_knock_is_ignored(false);
}

#[test]
fn replayed_knock_gets_no_reply_and_does_not_extend_v6() {
    replayed_knock_is_ignored(true);
}

// ---- flow-scoped ------------------------------------------------------------

/// `knock --source-port P`: only a connection from port P is admitted, and
/// only one: the kernel deletes the one-use admission when the first SYN
/// creates its flow.
///
/// Observed (reported, not asserted): right after that connection is closed
/// a new connection from the same port P to the same service may still get
/// in, for as long as the flow entry lives and the kernel still looks for
/// flow-scoped admissions (`CFG_FLOW_SCOPED`): the path meant for a
/// retransmitted SYN cannot tell it from a new connection on the same
/// 5-tuple. The agent clears the flag at its next stats interval once no
/// flow-scoped admission is left; from then on port P is dropped like any
/// other, which is asserted.
fn flow_scoped_knock(v6: bool) {
    let _serial = serial();
    let k = KnockEnv::start(&format!("knflow{}", family(v6)), &KnockSettings::default());
    let _server = k.env.echo_server(v6, PROTECTED_PORT);
    let client = k.env.topo.client_addr(v6);
    let port: u16 = 40_000 + u16::from(k.env.topo.index);
    let other: u16 = port + 1000;

    let token = k.mint(&[INVOKE], TOKEN_TTL);
    let p = port.to_string();
    k.knock_ok(v6, &token, SERVICE, &["--source-port", &p]);
    let adm = k
        .admission(client, SERVICE, port)
        .unwrap_or_else(|| panic!("flow-scoped admission: {:?}", k.admissions()));
    assert_eq!(adm.source_port, port);
    assert!(
        k.admission(client, SERVICE, 0).is_none(),
        "no address-wide admission"
    );
    assert!(
        k.flow_scoped_flag(),
        "the kernel looks for flow-scoped admissions"
    );

    assert_timed_out(
        k.connect_from_port(v6, other, PROTECTED_PORT, DROPPED),
        "another source port",
    );
    k.env
        .assert_dropped(v6, PROTECTED_PORT, false, "a kernel-chosen source port");

    let mut first = k
        .connect_from_port(v6, port, PROTECTED_PORT, OK_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect from the admitted port {port}: {e}"));
    echo_roundtrip(&mut first, b"scoped", OK_TIMEOUT).expect("echo on the scoped flow");
    assert!(
        k.admission(client, SERVICE, port).is_none(),
        "the first SYN consumed the one-use admission: {:?}",
        k.admissions()
    );
    // The established connection lives on its flow entry.
    echo_roundtrip(&mut first, b"still", OK_TIMEOUT).expect("echo after consumption");
    close_with_rst(first);

    // One use is one connection: a new connection from the same port right
    // after (the flow entry still exists, the kernel flag may still be set)
    // carries a new initial sequence number and is dropped.
    assert_timed_out(
        k.connect_from_port(v6, port, PROTECTED_PORT, DROPPED),
        "a new connection from the admitted port right after the first closed",
    );

    assert!(
        portcullis_testkit::poll_until(Duration::from_secs(5), || (!k.flow_scoped_flag())
            .then_some(()))
        .is_some(),
        "the agent clears CFG_FLOW_SCOPED once no flow-scoped admission is left"
    );
    assert_timed_out(
        k.connect_from_port(v6, port, PROTECTED_PORT, DROPPED),
        "a second connection from the admitted port (one use)",
    );
    assert_timed_out(
        k.connect_from_port(v6, other, PROTECTED_PORT, DROPPED),
        "another source port after the admission was used",
    );
}

#[test]
fn flow_scoped_knock_admits_one_connection_from_its_port_v4() {
    flow_scoped_knock(false);
}

#[test]
fn flow_scoped_knock_admits_one_connection_from_its_port_v6() {
    flow_scoped_knock(true);
}

// ---- expired and invalid tokens --------------------------------------------

#[test]
fn expired_untrusted_and_tampered_tokens_are_refused() {
    let _serial = serial();
    // leeway 0 (KnockSettings default): expired means expired.
    let k = KnockEnv::start("knexp", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let client = k.env.topo.client_addr(false);

    // exp = floor(mint time) + 2 s: at least a second to use it.
    let short = k.mint(&[INVOKE], Duration::from_secs(2));
    let minted = SystemTime::now();
    let out = k.knock_ok(false, &short, SERVICE, &[]);
    assert!(
        admitted_secs(&out) <= 2,
        "admission ends with the token: {out}"
    );
    let adm = k.admission(client, SERVICE, 0).expect("admitted");
    assert!(
        adm.expires_ns <= clock::monotonic_ns() + 2_100_000_000,
        "kernel expiry is the token's"
    );

    // Wait (bounded) until the token is past its exp (<= minted + 2 s).
    let dead = minted + Duration::from_millis(2050);
    assert!(
        portcullis_testkit::poll_until(Duration::from_secs(5), || (SystemTime::now() >= dead)
            .then_some(()))
        .is_some()
    );
    k.knock_refused(false, &short, SERVICE, "expired token");
    assert!(
        k.wait_refused("token_expired", Duration::from_secs(5)),
        "{}",
        k.log()
    );
    k.env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "the admission expired with its token",
    );

    // A well-formed token from an issuer key the node does not know.
    let foreign = k.mint_foreign(&[INVOKE], TOKEN_TTL);
    k.knock_refused(false, &foreign, SERVICE, "token from an untrusted key");
    assert!(
        k.wait_refused("unknown_kid", Duration::from_secs(5)),
        "{}",
        k.log()
    );

    // A trusted token with one signature byte changed.
    let good = k.mint(&[INVOKE], TOKEN_TTL);
    let (input, sig) = good.rsplit_once('.').expect("three segments");
    let mut sig = sig.to_string();
    let c = if sig.starts_with('A') { "B" } else { "A" };
    sig.replace_range(0..1, c);
    let tampered = format!("{input}.{sig}");
    k.knock_refused(false, &tampered, SERVICE, "tampered signature");
    assert!(
        k.wait_refused("bad_signature", Duration::from_secs(5)),
        "{}",
        k.log()
    );
    k.env
        .assert_dropped(false, PROTECTED_PORT, false, "after the refused knocks");
    // The untampered token still works (the refusals cost nothing).
    k.knock_ok(false, &good, SERVICE, &[]);
    k.env
        .assert_echo(false, PROTECTED_PORT, "valid token after refusals");
}

// ---- restart ----------------------------------------------------------------

#[test]
fn knock_granted_admission_survives_kill9_and_restart() {
    let _serial = serial();
    let mut k = KnockEnv::start("knrestart", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let client = k.env.topo.client_addr(false);
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    k.knock_ok(false, &token, SERVICE, &[]);
    let before = k.admission(client, SERVICE, 0).expect("admitted");
    let mut held = k
        .env
        .connect(false, PROTECTED_PORT, OK_TIMEOUT)
        .expect("connect");
    echo_roundtrip(&mut held, b"before", OK_TIMEOUT).expect("echo before");

    k.env.agent().kill9().expect("kill -9");
    k.env.agent = None;
    k.env.assert_echo(
        false,
        PROTECTED_PORT,
        "knock admission while the agent is dead",
    );
    echo_roundtrip(&mut held, b"dead", OK_TIMEOUT).expect("established flow, agent dead");

    assert_eq!(k.env.start_agent(), "adopted", "restart adopts the pins");
    let after = k.admission(client, SERVICE, 0).expect("still admitted");
    assert_eq!(
        after, before,
        "the adopted admission is untouched (same slot and expiry)"
    );
    k.env
        .assert_echo(false, PROTECTED_PORT, "knock admission after the restart");
    echo_roundtrip(&mut held, b"after", OK_TIMEOUT).expect("established flow, restarted");
    k.env.assert_dropped(
        false,
        PROTECTED_PORT,
        true,
        "other address after the restart",
    );

    // The restarted agent answers knocks again, signed with the same node
    // key (knock_ok verifies the reply with the key read at first start).
    k.knock_ok(false, &token, SERVICE, &[]);
}

// ---- flood ------------------------------------------------------------------

/// One source floods the knock port with knock-shaped datagrams (fresh
/// nonces, a token from an unknown key) while another source (the client's
/// `_alt` address) knocks with a valid token: the valid knock is answered
/// promptly; the kernel's per-source limiter absorbs the flood.
#[test]
fn knock_flood_from_one_source_does_not_delay_another() {
    let _serial = serial();
    const FLOOD_MAX: u64 = 300_000;
    const FLOOD_FOR: Duration = Duration::from_secs(10);
    const STARTED: u64 = 20_000;
    const ATTEMPT: Duration = Duration::from_millis(300);
    const ATTEMPTS: u32 = 5;
    let k = KnockEnv::start("knflood", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let server = k.knock_addr(false);
    let alt = k.env.topo.client_alt_addr(false);
    let before = k.env.status();

    let junk_token = k.mint_foreign(&[INVOKE], TOKEN_TTL);
    let junk: Vec<Vec<u8>> = (0..512)
        .map(|_| k.datagram(false, &junk_token, SERVICE, 0).0)
        .collect();
    let flood_sock = k.client_udp(false, None);
    let alt_sock = k.client_udp(false, Some(alt));
    let valid = k.mint(&[INVOKE], TOKEN_TTL);

    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + FLOOD_FOR;
            let mut n: u64 = 0;
            while n < FLOOD_MAX && !stop.load(Ordering::Relaxed) && Instant::now() < end {
                // ENOBUFS and the like: the flood goes on.
                let _ = flood_sock.send_to(&junk[n as usize % junk.len()], server);
                n += 1;
                sent.store(n, Ordering::Relaxed);
            }
            n
        })
    };
    let flooding = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        (sent.load(Ordering::Relaxed) >= STARTED).then_some(())
    })
    .is_some();

    // The valid knock from the other source, with the client's retry
    // pattern: a fresh nonce per attempt.
    let start = Instant::now();
    let mut admitted = None;
    for attempt in 1..=ATTEMPTS {
        let (d, nonce) = k.datagram(false, &valid, SERVICE, 0);
        alt_sock.send_to(&d, server).expect("send valid knock");
        if let Some(r) = k.await_reply(&alt_sock, &nonce, ATTEMPT) {
            admitted = Some((attempt, start.elapsed(), r));
            break;
        }
    }
    let flood_running = !flood.is_finished();
    stop.store(true, Ordering::Relaxed);
    let total = flood.join().expect("flood thread");
    let after = k.env.status();
    let delta =
        |key: &str| after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0);
    eprintln!(
        "flood: {total} datagrams sent; valid knock from {alt}: {:?}; kernel: \
         knock_source_rate={} knock_global_rate={} knock_passed={}",
        admitted.as_ref().map(|(a, t, _)| (a, t)),
        delta("knock_source_rate"),
        delta("knock_global_rate"),
        delta("knock_passed"),
    );
    assert!(flooding, "the flood got going ({total} sent)");
    assert!(
        flood_running,
        "the valid knock was tried while the flood ran"
    );
    let (attempt, latency, reply) = admitted.unwrap_or_else(|| {
        panic!(
            "the valid knock from {alt} was not answered during the flood; agent log:\n{}",
            k.log()
        )
    });
    assert!(reply.verified);
    assert!(
        latency < Duration::from_secs(1),
        "admitted only after {latency:?} (attempt {attempt})"
    );
    assert!(
        delta("knock_source_rate") >= 1000,
        "the per-source limiter dropped the flood"
    );
    assert!(
        k.admission(alt, SERVICE, 0).is_some(),
        "{:?}",
        k.admissions()
    );

    // The alt address connects; the flooding address was never admitted.
    let mut s = k
        .env
        .connect_alt(false, PROTECTED_PORT, OK_TIMEOUT)
        .expect("connect from the admitted alt address");
    echo_roundtrip(&mut s, b"alt", OK_TIMEOUT).expect("echo from alt");
    k.env
        .assert_dropped(false, PROTECTED_PORT, false, "the flooding source");
    assert!(
        k.wait_refused("unknown_kid", Duration::from_secs(5)),
        "the flood datagrams that passed the limiter were refused:\n{}",
        k.log()
    );
}
