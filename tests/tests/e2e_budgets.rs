//! End to end: cost control (docs/cost-control.md). The real agent admits
//! by knock, prices real traffic through the XDP and TC programs, and its
//! budget loop gates on the forecast, throttles and cuts live connections
//! in the kernel, honours approvals, and caps the egress of a bulk
//! download (the extraction guard). Every wait is a bounded poll of the
//! audit spool, the control API or the traffic itself.

use portcullis_e2e::e2e;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use e2e::{
    OK_TIMEOUT, PROTECTED_PORT, SERVICE,
    control::{ctl, ctl_json, ctl_refused},
    knock::{KnockEnv, KnockSettings},
    metrics, serial,
};
use portcullis_proto::v1::{self, event::Body};
use portcullis_testkit::{echo_roundtrip, poll_until};

const INVOKE: &str = "model:llm:invoke";
const TOKEN_TTL: Duration = Duration::from_secs(600);
const MIB: usize = 1 << 20;
/// How long a budget's action may take to reach the kernel: the budget
/// loop runs every second after the accounting tick.
const ENFORCED: Duration = Duration::from_secs(10);

fn start(name: &str, price: &str, extra: &str) -> KnockEnv {
    KnockEnv::start(
        name,
        &KnockSettings {
            service_extra: format!("price = {{ {price} }}\n"),
            extra: extra.to_string(),
            ..KnockSettings::default()
        },
    )
}

fn budget_events(k: &KnockEnv) -> Vec<v1::BudgetEvent> {
    k.env
        .spool_events()
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::Budget(b)) => Some(b),
            _ => None,
        })
        .collect()
}

fn wait_budget_event(
    k: &KnockEnv,
    what: &str,
    f: impl Fn(&v1::BudgetEvent) -> bool,
) -> v1::BudgetEvent {
    poll_until(ENFORCED, || budget_events(k).into_iter().find(&f))
        .unwrap_or_else(|| panic!("no budget event: {what}\nagent log:\n{}", k.log()))
}

/// An admitted connection to the echo service, from the client's main
/// IPv4 address.
fn connect(k: &KnockEnv) -> TcpStream {
    let s = k
        .env
        .connect(false, PROTECTED_PORT, OK_TIMEOUT)
        .expect("admitted connect");
    s.set_read_timeout(Some(OK_TIMEOUT)).unwrap();
    s
}

/// Echoes `bytes` through `s` in 64 KiB round trips.
fn echo_bytes(s: &mut TcpStream, bytes: usize) {
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut back = vec![0u8; chunk.len()];
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).expect("send");
        s.read_exact(&mut back).expect("echo");
        sent += chunk.len();
    }
}

/// Bytes per second echoed through `s` for `for_` (bounded: a stalled
/// connection ends the measurement at its read timeout).
fn echo_rate(s: &mut TcpStream, for_: Duration) -> f64 {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let chunk = vec![0x33_u8; 16 * 1024];
    let mut back = vec![0u8; chunk.len()];
    let start = Instant::now();
    let mut moved = 0usize;
    while start.elapsed() < for_ {
        if s.write_all(&chunk).is_err() || s.read_exact(&mut back).is_err() {
            break;
        }
        moved += chunk.len();
    }
    moved as f64 / start.elapsed().as_secs_f64()
}

/// `ctl budget set NAME` for alice over 7 days, with an amount of one
/// micro-unit (her spend is over it at once) and the thresholds `at`.
fn set_alice_budget(k: &KnockEnv, name: &str, at: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "budget",
        "set",
        name,
        "--identity",
        "acme/alice",
        "--period",
        "7d",
        "--amount",
        "1",
    ];
    for a in at {
        args.extend(["--at", a]);
    }
    ctl_json(&k.env, None, &args)
}

fn spend_row(k: &KnockEnv, identity: &str) -> Option<serde_json::Value> {
    let v = ctl_json(&k.env, None, &["spend"]);
    v["rows"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == identity)
        .cloned()
}

fn wait_action(k: &KnockEnv, identity: &str, action: &str) {
    poll_until(ENFORCED, || {
        spend_row(k, identity)
            .filter(|r| r["budget_action"] == action && r["approved"] == false)
            .map(|_| ())
    })
    .unwrap_or_else(|| {
        panic!(
            "{identity} never under {action:?}: {:?}\nagent log:\n{}",
            spend_row(k, identity),
            k.log()
        )
    });
}

#[test]
fn the_forecast_denies_before_the_spend_crosses_and_a_warning_is_emitted_once() {
    let _one = serial();
    // 1 unit per MiB sent to the model; the rate of the last 3 s is
    // projected over the period.
    let k = start(
        "bgt-deny",
        "per_mib_in_micros = 1000000",
        r#"
[cost_control]
forecast_window_secs = 3

[[budgets]]
name = "alice-watch"
identity = "acme/alice"
period = "30d"
amount_micros = 1000000000000
thresholds = [{ percent = 1, action = "warn" }]

[[budgets]]
name = "alice-week"
identity = "acme/alice"
period = "7d"
amount_micros = 100000000
thresholds = [{ percent = 100, action = "deny" }]
"#,
    );
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    k.knock_ok(false, &token, SERVICE, &[]);
    let _echo = k.env.echo_server(false, PROTECTED_PORT);
    let mut s = connect(&k);
    // 4 MiB: 4 units of a 100-unit weekly budget, at a rate that would
    // spend far more than 100 within the week.
    echo_bytes(&mut s, 4 * MIB);
    let deny = wait_budget_event(&k, "alice-week reaches deny", |b| {
        b.budget == "alice-week" && b.kind == "threshold" && b.action == "deny"
    });
    assert!(
        deny.spent_micros < deny.amount_micros && deny.forecast_micros >= deny.amount_micros,
        "gated on the forecast, before the spend: {deny:?}"
    );
    assert_eq!(deny.threshold_percent, 100);
    assert!(deny.rate_micros_per_hour > 0 && deny.horizon_secs == 7 * 86_400);
    // The live connection is cut within the budget loop's second.
    let cut = poll_until(ENFORCED, || {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        echo_roundtrip(&mut s, b"still there?", Duration::from_millis(500))
            .is_err()
            .then_some(())
    });
    assert!(cut.is_some(), "the admitted connection was not cut");
    let revoked = k.env.spool_events().into_iter().any(|e| {
        matches!(e.body, Some(Body::Revocation(r)) if r.target_kind == "budget" && r.target == "acme/alice")
    });
    assert!(revoked, "the cut is audited as a budget revocation");
    // The next knock is refused, and the refusal names the budget.
    k.knock_refused(false, &token, SERVICE, "over the forecast");
    let denied = poll_until(ENFORCED, || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::AdmissionDenied(d)) if d.reason == "budget" => Some(d),
            _ => None,
        })
    })
    .expect("an audited refusal with reason budget");
    assert!(denied.detail.contains("alice-week"), "{}", denied.detail);
    // The warning fired once, although its budget stayed over the
    // threshold for several evaluations.
    let warns = budget_events(&k)
        .into_iter()
        .filter(|b| b.budget == "alice-watch" && b.action == "warn")
        .count();
    assert_eq!(warns, 1, "{:?}", budget_events(&k));
    // Once the burst leaves the forecast window, the forecast is the
    // spend again: the deny is lifted and a knock admits.
    wait_budget_event(&k, "alice-week lifted", |b| {
        b.budget == "alice-week" && b.previous == "deny" && b.action.is_empty()
    });
    k.knock_ok(false, &token, SERVICE, &[]);
    let row = spend_row(&k, "acme/alice").expect("alice's spend");
    assert!(row["month_micros"].as_u64().unwrap() >= 4_000_000, "{row}");
}

#[test]
fn throttling_lowers_a_live_connection_and_lifting_or_an_approval_restores_it() {
    let _one = serial();
    let k = start(
        "bgt-throttle",
        "per_mib_in_micros = 1000",
        r#"
[cost_control]
forecast_window_secs = 3
throttle_floor_bytes_per_sec = 262144

[metrics]
listen = "127.0.0.1:9477"
"#,
    );
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    k.knock_ok(false, &token, SERVICE, &[]);
    let _echo = k.env.echo_server(false, PROTECTED_PORT);
    let mut s = connect(&k);
    let free = echo_rate(&mut s, Duration::from_millis(1500));
    assert!(free > 4_000_000.0, "unthrottled rate {free:.0} B/s");
    // A budget set at run time that alice's spend already exceeds.
    let set = set_alice_budget(&k, "slow", &["100:throttle"]);
    assert_eq!(set["budgets"][0]["name"], "slow");
    wait_action(&k, "acme/alice", "throttle");
    // The metrics show the meter's action and the throttled identity.
    let (_, body) = metrics::get(&k, "/metrics");
    metrics::promtool_check(&body);
    let m = metrics::samples(&body);
    assert_eq!(
        m.get(r#"portcullis_budget_action{budget="slow",key="",period="7d"}"#),
        Some(&2.0),
        "{body}"
    );
    assert_eq!(m.get("portcullis_budget_throttled_identities"), Some(&1.0));
    let throttled = echo_rate(&mut s, Duration::from_millis(2000));
    assert!(
        throttled * 8.0 < free && throttled < 4.0 * 262_144.0,
        "throttled {throttled:.0} B/s against {free:.0} B/s free"
    );
    // An approval lets alice through: full rate again, until its amount
    // (0.2 units = 200 MiB at this price) is used.
    ctl_json(
        &k.env,
        None,
        &[
            "budget",
            "approve",
            "--identity",
            "acme/alice",
            "--amount",
            "200000",
            "--until",
            "+1h",
            "--reason",
            "e2e",
        ],
    );
    let approved = poll_until(ENFORCED, || {
        let r = echo_rate(&mut s, Duration::from_millis(500));
        (r > 4.0 * throttled).then_some(r)
    })
    .unwrap_or_else(|| panic!("the approval did not restore the rate\n{}", k.log()));
    let ended = poll_until(Duration::from_secs(30), || {
        echo_rate(&mut s, Duration::from_millis(300));
        budget_events(&k)
            .into_iter()
            .find(|b| b.kind == "approval_ended" && b.identity == "acme/alice")
    })
    .expect("the approval ends once its amount is used");
    assert_eq!(ended.detail, "amount used");
    assert!(ended.used_micros >= ended.amount_micros);
    wait_action(&k, "acme/alice", "throttle");
    let again = echo_rate(&mut s, Duration::from_millis(2000));
    assert!(
        again * 4.0 < approved,
        "throttled again: {again:.0} vs {approved:.0}"
    );
    eprintln!(
        "echo rate: free {free:.0} B/s, throttled {throttled:.0}, approved {approved:.0}, throttled again {again:.0}"
    );
    // Removing the budget lifts the throttle on the same connection.
    ctl_json(&k.env, None, &["budget", "remove", "slow"]);
    let lifted = poll_until(ENFORCED, || {
        let r = echo_rate(&mut s, Duration::from_millis(500));
        (r > 4.0 * again).then_some(r)
    });
    assert!(lifted.is_some(), "removing the budget restores the rate");
    // Tightened to deny, the same live connection is cut.
    set_alice_budget(&k, "slow", &["50:throttle", "100:deny"]);
    let cut = poll_until(ENFORCED, || {
        echo_roundtrip(&mut s, b"x", Duration::from_millis(500))
            .is_err()
            .then_some(())
    });
    assert!(cut.is_some(), "the live connection over its budget is cut");
    // Every edit and the approval are in the trail.
    let kinds: Vec<String> = budget_events(&k).into_iter().map(|b| b.kind).collect();
    for kind in ["set", "approval", "approval_ended", "removed"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }
}

#[test]
fn bad_budget_edits_are_refused_with_the_field_and_change_nothing() {
    let _one = serial();
    let k = start("bgt-bad", "per_connection_micros = 1000", "");
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "budget",
                "set",
                "b",
                "--identity",
                "x",
                "--period",
                "day",
                "--amount",
                "0",
            ],
            "amount_micros",
        ),
        (
            &[
                "budget",
                "set",
                "b",
                "--identity",
                "x",
                "--period",
                "day",
                "--amount",
                "-5",
            ],
            "amount_micros",
        ),
        (
            &[
                "budget",
                "set",
                "b",
                "--service",
                "nope",
                "--period",
                "day",
                "--amount",
                "5",
            ],
            "service",
        ),
        (
            &[
                "budget",
                "set",
                "b",
                "--identity",
                "x",
                "--period",
                "week",
                "--amount",
                "5",
            ],
            "period",
        ),
        (
            &[
                "budget",
                "set",
                "b",
                "--identity",
                "x",
                "--period",
                "day",
                "--amount",
                "5",
                "--at",
                "90:deny",
                "--at",
                "95:warn",
            ],
            "thresholds[1]",
        ),
        (
            &[
                "budget",
                "approve",
                "--identity",
                "nobody",
                "--amount",
                "5",
                "--until",
                "+1h",
            ],
            "identity",
        ),
        (&["budget", "remove", "ghost"], "name"),
    ];
    for (args, field) in cases {
        let err = ctl_refused(&k.env, None, args);
        assert!(err.contains(&format!("{field}:")), "{args:?}: {err}");
    }
    let list = ctl_json(&k.env, None, &["budget", "list"]);
    assert_eq!(list["budgets"].as_array().unwrap().len(), 0, "{list}");
    // Accepted with a warning: a scope nobody has spent under yet.
    let out = ctl(
        &k.env,
        None,
        &[
            "budget", "set", "later", "--tenant", "newco", "--period", "month", "--amount", "5",
        ],
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["warnings"][0].as_str().unwrap().contains("newco"), "{v}");
    // An approval too far ahead is refused.
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    k.knock_ok(false, &token, SERVICE, &[]);
    let err = ctl_refused(
        &k.env,
        None,
        &[
            "budget",
            "approve",
            "--identity",
            "acme/alice",
            "--amount",
            "5",
            "--until",
            "+40d",
        ],
    );
    assert!(err.contains("until:"), "{err}");
}

/// A server that answers each connection's small request with `bytes` of
/// response and closes.
struct Bulk {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bulk {
    fn start(k: &KnockEnv, addr: SocketAddr, bytes: usize) -> Bulk {
        let listener = k
            .env
            .topo
            .server
            .run(|| TcpListener::bind(addr))
            .expect("enter the server namespace")
            .expect("bind the bulk server");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                        let mut req = [0u8; 64];
                        if c.read(&mut req).is_ok() {
                            let chunk = vec![0x77_u8; 64 * 1024];
                            let mut sent = 0;
                            while sent < bytes && !flag.load(Ordering::Relaxed) {
                                if c.write_all(&chunk).is_err() {
                                    break;
                                }
                                sent += chunk.len();
                            }
                        }
                    }
                    // A server's accept loop, bounded by the stop flag.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Bulk {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Downloads from the bulk server: (bytes, bytes per second), bounded by
/// `limit`.
fn download(k: &KnockEnv, v6: bool, port: u16, limit: Duration) -> (usize, f64) {
    let mut s = k.env.connect(v6, port, OK_TIMEOUT).expect("connect bulk");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"GET /weights\n").expect("request");
    let start = Instant::now();
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    (got, got as f64 / start.elapsed().as_secs_f64())
}

#[test]
fn a_bulk_download_trips_the_extraction_guard_and_balanced_traffic_does_not() {
    let _one = serial();
    const BULK_PORT: u16 = 8091;
    let k = KnockEnv::start(
        "bgt-guard",
        &KnockSettings {
            services: vec![
                e2e::knock::KnockService {
                    name: SERVICE,
                    port: PROTECTED_PORT,
                    action: "invoke",
                },
                e2e::knock::KnockService {
                    name: "weights",
                    port: BULK_PORT,
                    action: "invoke",
                },
            ],
            extra: r#"
[cost_control.extraction]
egress_bytes_per_min = 0
ratio = 10
baseline_factor = 0
min_bytes_per_min = 4194304
cap_bytes_per_sec = 262144
hold_secs = 30
"#
            .to_string(),
            ..KnockSettings::default()
        },
    );
    // alice talks (request and response alike); bob downloads: the same
    // total of bytes.
    let alice = k.mint(&[INVOKE], TOKEN_TTL);
    let bob = k.mint_for("bob", &["model:weights:invoke"], TOKEN_TTL);
    k.knock_ok(false, &alice, SERVICE, &[]);
    k.knock_ok(true, &bob, "weights", &[]);
    let _echo = k.env.echo_server(false, PROTECTED_PORT);
    let _bulk = Bulk::start(&k, k.env.server(true, BULK_PORT), 16 * MIB);
    let mut s = connect(&k);
    echo_bytes(&mut s, 8 * MIB);
    let (got, free) = download(&k, true, BULK_PORT, Duration::from_secs(20));
    assert!(got >= 16 * MIB, "the first download completes: {got}");
    let detection = poll_until(ENFORCED, || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::Detection(d)) if d.kind == "extraction" && d.open => Some(d),
            _ => None,
        })
    })
    .unwrap_or_else(|| panic!("no extraction detection\n{}", k.log()));
    assert_eq!(detection.subject, "acme/bob");
    assert!(detection.rate >= 16 * MIB as u64, "{detection:?}");
    assert!(detection.detail.contains("ratio"), "{}", detection.detail);
    // The egress of bob's next download is capped in TC.
    let (_, capped) = download(&k, true, BULK_PORT, Duration::from_secs(3));
    assert!(
        capped * 8.0 < free && capped < 4.0 * 262_144.0,
        "capped {capped:.0} B/s against {free:.0} B/s"
    );
    eprintln!(
        "bulk download: free {free:.0} B/s, capped {capped:.0} B/s; {}",
        detection.detail
    );
    // alice's balanced traffic (more bytes than the floor each way) did
    // not trip it.
    echo_bytes(&mut s, 2 * MIB);
    let alice_found = k.env.spool_events().into_iter().any(|e| {
        matches!(e.body, Some(Body::Detection(d)) if d.kind == "extraction" && d.subject == "acme/alice")
    });
    assert!(
        !alice_found,
        "ordinary request/response traffic is not extraction"
    );
}

/// The spend of budget `budget`'s meter `key`, as `ctl budget list` shows.
fn meter_spent(k: &KnockEnv, budget: &str, key: &str) -> Option<u64> {
    let v = ctl_json(&k.env, None, &["budget", "list"]);
    v["budgets"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == budget)?["meters"]
        .as_array()?
        .iter()
        .find(|m| m["key"] == key)?["spent_micros"]
        .as_u64()
}

fn restart(k: &mut KnockEnv) {
    k.env
        .agent()
        .terminate(Duration::from_secs(10))
        .expect("agent stops");
    k.env.agent = None;
    assert_eq!(k.env.start_agent(), "adopted");
}

#[test]
fn a_period_rolls_over_exactly_once_across_agent_restarts() {
    let _one = serial();
    let mut k = start(
        "bgt-roll",
        "per_mib_in_micros = 1000000",
        r#"
[[budgets]]
name = "daily"
identity = "*"
period = "day"
amount_micros = 1000000000000
thresholds = [{ percent = 100, action = "warn" }]
"#,
    );
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    k.knock_ok(false, &token, SERVICE, &[]);
    let _echo = k.env.echo_server(false, PROTECTED_PORT);
    let send = |k: &KnockEnv, mib: usize| echo_bytes(&mut connect(k), mib * MIB);
    send(&k, 2);
    let first = poll_until(ENFORCED, || {
        meter_spent(&k, "daily", "acme/alice").filter(|s| *s >= 2_000_000)
    })
    .expect("the day's meter counts the first transfer");
    // The agent stops; the meter's day is then over (as if it had been
    // stopped before midnight and started after it).
    k.env
        .agent()
        .terminate(Duration::from_secs(10))
        .expect("agent stops");
    k.env.agent = None;
    let ledger = k.env.state_dir().join("ledger.json");
    let mut j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ledger).expect("ledger")).expect("ledger JSON");
    let meters = j["budgets"]["meters"].as_array_mut().expect("meters kept");
    let m = meters
        .iter_mut()
        .find(|m| m["budget"] == "daily" && m["key"] == "acme/alice")
        .expect("alice's meter kept in the ledger");
    assert_eq!(m["spent"].as_u64(), Some(first));
    m["period"] = serde_json::json!("2000-01-01");
    std::fs::write(&ledger, serde_json::to_vec(&j).unwrap()).expect("write ledger");
    assert_eq!(k.env.start_agent(), "adopted");
    send(&k, 1);
    let second = poll_until(ENFORCED, || {
        meter_spent(&k, "daily", "acme/alice").filter(|s| *s >= 1_000_000)
    })
    .expect("the new day's meter counts the second transfer");
    assert!(
        second < first,
        "the new day starts from zero: {second} after {first}"
    );
    // Restarted again within the day: the meter is not reset a second time.
    restart(&mut k);
    send(&k, 1);
    let third = poll_until(ENFORCED, || {
        meter_spent(&k, "daily", "acme/alice").filter(|s| *s >= second + 1_000_000)
    });
    assert!(
        third.is_some(),
        "spend since the roll-over is kept: {:?} after {second}",
        meter_spent(&k, "daily", "acme/alice")
    );
}
