//! End to end: the Prometheus endpoint (README.md, "Metrics"). The real
//! agent serves `GET /metrics` on a loopback address of the server
//! namespace; the test scrapes it from inside that namespace, checks the
//! text with `promtool check metrics`, and compares the values with the
//! kernel's own counters.

use portcullis_e2e::e2e;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use e2e::{
    PROTECTED_PORT, SERVICE,
    knock::{KnockEnv, KnockSettings},
    serial,
};

const INVOKE: &str = "model:llm:invoke";
const METRICS: &str = "127.0.0.1:9477";

/// Status line and body of one HTTP/1.0 request, from the server
/// namespace.
fn get(k: &KnockEnv, path: &str) -> (String, String) {
    let path = path.to_string();
    k.env
        .topo
        .server
        .run(move || {
            let mut s = TcpStream::connect(METRICS).expect("connect to the metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).expect("read the response");
            let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
            (
                head.lines().next().unwrap_or("").to_string(),
                body.to_string(),
            )
        })
        .expect("enter the server namespace")
}

/// `name{labels} value` lines (labels as written), comments skipped.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn promtool_check(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`, installed by `cargo xtask setup`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
