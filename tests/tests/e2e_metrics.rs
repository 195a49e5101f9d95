//! End to end: the Prometheus endpoint (docs/metrics.md). The real
//! agent serves `GET /metrics` on a loopback address of the server
//! namespace; the test scrapes it from inside that namespace, checks the
//! text with `promtool check metrics`, and compares the values with the
//! kernel's own counters.

use portcullis_e2e::e2e;

use std::time::Duration;

use e2e::{
    PROTECTED_PORT, SERVICE,
    knock::{KnockEnv, KnockSettings},
    metrics::{get, promtool_check, samples},
    serial,
};

const INVOKE: &str = "model:llm:invoke";
use e2e::metrics::METRICS;

#[test]
fn metrics_are_valid_and_match_the_kernel() {
    let _serial = serial();
    let k = KnockEnv::start(
        "metrics",
        &KnockSettings {
            // [metrics] after [control]'s own lines.
            control: format!("\n[metrics]\nlisten = \"{METRICS}\"\n"),
            ..KnockSettings::default()
        },
    );
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    k.knock_ok(
        false,
        &k.mint(&[INVOKE], Duration::from_secs(300)),
        SERVICE,
        &[],
    );
    k.env.assert_echo(false, PROTECTED_PORT, "admitted");
    k.env
        .assert_dropped(false, PROTECTED_PORT, true, "the other address");

    let (status, body) = get(&k, "/metrics");
    assert!(status.contains("200"), "{status}");
    promtool_check(&body);
    let m = samples(&body);
    // Nothing moves between the scrape and this read: no traffic.
    let kernel = k.env.status();
    let drops = |reason: &str, shadow: &str| {
        m.get(&format!(
            "portcullis_drops_total{{reason=\"{reason}\",shadow=\"{shadow}\"}}"
        ))
        .copied()
        .unwrap_or_else(|| panic!("no drops sample for {reason}/{shadow}:\n{body}"))
    };
    assert!(drops("no_admission", "false") >= 1.0);
    assert_eq!(
        drops("no_admission", "false"),
        kernel["no_admission"] as f64
    );
    assert_eq!(drops("no_admission", "true"), 0.0);
    assert_eq!(
        m["portcullis_passed_packets_total"],
        kernel["passed"] as f64
    );
    assert!(m["portcullis_passed_packets_total"] >= 1.0);
    assert_eq!(m["portcullis_admissions_granted_total"], 1.0);
    assert_eq!(m["portcullis_live_admissions"], 1.0);
    assert_eq!(m["portcullis_table_entries{map=\"PCL_ADMIT\"}"], 1.0);
    assert!(m["portcullis_table_fill_ratio{map=\"PCL_ADMIT\"}"] > 0.0);
    assert_eq!(
        m[&format!("portcullis_service_shadow_mode{{service=\"{SERVICE}\"}}")],
        0.0
    );
    assert!(
        m.keys()
            .any(|k| k.starts_with("portcullis_policy_info{version=")),
        "{body}"
    );
    assert!(m["portcullis_audit_sealed_seq"] >= 1.0);

    // Only /metrics is served.
    let (status, _) = get(&k, "/");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn a_flood_at_a_service_is_a_detection_within_two_seconds_and_closes_after() {
    use portcullis_proto::v1::event::Body;
    use portcullis_testkit::{FloodPlan, connect_flood};
    let _serial = serial();
    let k = KnockEnv::start(
        "flood",
        &KnockSettings {
            control: format!(
                "\n[metrics]\nlisten = \"{METRICS}\"\n\n[findings]\nflood_per_sec = 100\nquiet_secs = 2\n"
            ),
            ..KnockSettings::default()
        },
    );
    let target = std::net::SocketAddr::new(k.env.topo.server_addr(false), PROTECTED_PORT);
    let started = std::time::SystemTime::now();
    // ~1000 unadmitted SYNs a second for 4 s: all dropped.
    let stats = connect_flood(
        &k.env.topo.client,
        target,
        FloodPlan {
            duration: Duration::from_secs(4),
            interval: Duration::from_millis(1),
            attempt_timeout: Duration::from_millis(100),
            max_pending: 256,
        },
    )
    .expect("flood");
    assert_eq!(stats.connected, 0, "nothing gets through");
    let detections = || -> Vec<portcullis_proto::v1::Detection> {
        k.env
            .spool_events()
            .into_iter()
            .filter_map(|e| match e.body {
                Some(Body::Detection(d)) => Some(d),
                _ => None,
            })
            .collect()
    };
    let closed = portcullis_testkit::poll_until(Duration::from_secs(10), || {
        let d = detections();
        d.iter().any(|d| !d.open).then_some(d)
    })
    .expect("the episode opens and, once quiet, closes");
    let flood: Vec<_> = closed.iter().filter(|d| d.kind == "flood").collect();
    assert_eq!(flood.len(), 2, "one open and one close: {closed:?}");
    let (open, close) = (flood[0], flood[1]);
    assert!(
        open.open && open.subject == SERVICE && open.rate > 100,
        "{open:?}"
    );
    let delay = open.started_unix_ms - portcullis_trail::time::unix_ms(started);
    assert!(delay <= 2_000, "opened {delay} ms after the flood began");
    assert!(!close.open && close.started_unix_ms == open.started_unix_ms);
    assert!(
        close.total >= stats.attempts as u64 / 2,
        "{close:?} for {stats:?}"
    );
    // The metrics count it.
    let (_, body) = get(&k, "/metrics");
    let m = samples(&body);
    assert_eq!(
        m["portcullis_detections_total{kind=\"flood\"}"], 1.0,
        "{body}"
    );
    assert!(
        !m.keys()
            .any(|k| k.starts_with("portcullis_detection_open{")),
        "closed: {body}"
    );
}

#[test]
fn a_storm_of_refused_knocks_is_a_detection() {
    use portcullis_proto::v1::event::Body;
    let _serial = serial();
    let k = KnockEnv::start(
        "kstorm",
        &KnockSettings {
            control: "\n[findings]\nrefusals_per_sec = 50\nquiet_secs = 1\n".into(),
            ..KnockSettings::default()
        },
    );
    let sock = k.client_udp(false, None);
    let to = k.knock_addr(false);
    // ~500 junk knocks a second for 2 s: refused by the kernel's per-source
    // limit or by the agent, never admitted.
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        let _ = sock.send_to(b"not a knock at all, just noise", to);
        std::thread::sleep(Duration::from_millis(2));
    }
    let storm = portcullis_testkit::poll_until(Duration::from_secs(10), || {
        let d: Vec<_> = k
            .env
            .spool_events()
            .into_iter()
            .filter_map(|e| match e.body {
                Some(Body::Detection(d)) if d.kind == "refusal_storm" => Some(d),
                _ => None,
            })
            .collect();
        (d.len() == 2).then_some(d)
    })
    .expect("a refusal storm opens and closes");
    assert!(storm[0].open && storm[0].rate > 50, "{storm:?}");
    assert!(!storm[1].open && storm[1].total > 100, "{storm:?}");
    assert!(k.admissions().is_empty());
}

#[test]
fn a_spool_the_collector_stopped_draining_is_a_detection() {
    use portcullis_proto::v1::event::Body;
    let _serial = serial();
    // A collector that is never there: events wait, nothing is acknowledged.
    let k = KnockEnv::start(
        "stall",
        &KnockSettings {
            audit: "\n[audit.collector]\nendpoint = \"http://127.0.0.1:9\"\n".into(),
            control: "\n[findings]\nspool_stall_secs = 1\n".into(),
            ..KnockSettings::default()
        },
    );
    let stall = portcullis_testkit::poll_until(Duration::from_secs(10), || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::Detection(d)) if d.kind == "spool_stall" => Some(d),
            _ => None,
        })
    })
    .expect("the stall is detected");
    assert!(stall.open && stall.rate > 1, "{stall:?}");
    assert!(stall.detail.contains("events wait"), "{stall:?}");
    // `ctl status` says how long the collector has not acknowledged.
    let status = e2e::control::ctl_json(&k.env, None, &["status"]);
    assert!(
        status["collector_lag_secs"].as_u64().unwrap() >= 1
            && status["spool_events"].as_u64().unwrap() > 0,
        "{status}"
    );
}
