//! Scraping a test agent's Prometheus endpoint from inside its server
//! namespace (its loopback only), and checking the text with promtool.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::Duration,
};

use super::knock::KnockEnv;

/// `[metrics] listen` of the tests: the server namespace's loopback.
pub const METRICS: &str = "127.0.0.1:9477";

/// Status line and body of one HTTP/1.0 request, from the server
/// namespace.
pub fn get(k: &KnockEnv, path: &str) -> (String, String) {
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
pub fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

pub fn promtool_check(body: &str) {
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
