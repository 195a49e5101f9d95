//! `portcullis audit verify` over collector JSON lines and spool segments:
//! a clean trail passes; every kind of tampering fails naming the line.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use portcullis_collector::evidence::{Report, VerifyOptions, verify_files};
use portcullis_proto::v1::{
    AdmissionDenied, AdmissionGranted, Checkpoint, ControlCall, CostLine, CostReport, DropSummary,
    Gap, Lifecycle, PolicyChange, ReasonCount, Revocation, SourceCount, SpoolPressure, event::Body,
    lifecycle::Phase,
};
use portcullis_testkit::TempDir;
use portcullis_trail::{
    chain::{self, Head, Sealed, Sealer},
    frame::{MAGIC, push_frame},
    hex::hex,
    node_key::NodeKey,
    ocsf,
    verify::Trust,
};
use serde_json::Value;

fn wall(t: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + t)
}

/// One of every event kind, for node `node`, ending with a checkpoint.
fn every_kind(node: &str, key: &NodeKey) -> Vec<Sealed> {
    let pk = key.public_key();
    let bodies = vec![
        Body::Lifecycle(Lifecycle {
            phase: Phase::Started as i32,
            agent_version: "0.1.0".into(),
            public_key: pk.to_vec(),
            key_id: chain::key_id(&pk),
            reason: "start".into(),
            policy_version: "abc".into(),
            ..Default::default()
        }),
        Body::AdmissionGranted(AdmissionGranted {
            identity: "alice".into(),
            tenant: "acme".into(),
            service: "llm".into(),
            model_version: "v3".into(),
            source: "10.0.0.7".into(),
            source_port: 40_000,
            method: 1,
            policies: vec!["allow-analysts".into()],
            policy_version: "abc".into(),
            jti_sha256: vec![0xab; 32],
            expires_unix_ms: 1_800_000_300_000,
            action: "invoke".into(),
            identity_name: "acme/alice".into(),
        }),
        Body::AdmissionDenied(AdmissionDenied {
            service: "llm".into(),
            source: "192.0.2.9".into(),
            method: 1,
            reason: "bad_signature".into(),
            detail: "token signature does not verify".into(),
            action: "invoke".into(),
            ..Default::default()
        }),
        Body::Revocation(Revocation {
            target_kind: "identity".into(),
            target: "alice".into(),
            reason: "operator".into(),
            admissions_removed: 2,
            identities: vec!["alice".into()],
        }),
        Body::PolicyChange(PolicyChange {
            old_version: "abc".into(),
            new_version: "def".into(),
            policies: 4,
            accepted: true,
            error: String::new(),
        }),
        Body::DropSummary(DropSummary {
            interval_start_unix_ns: 1_800_000_000_000_000_000,
            interval_ns: 1_000_000_000,
            reasons: vec![ReasonCount {
                reason: "no_admission".into(),
                packets: 12,
            }],
            top_sources: vec![SourceCount {
                source: "198.51.100.4".into(),
                sampled: 3,
                top_reason: "no_admission".into(),
            }],
            sampled: 3,
            ..Default::default()
        }),
        Body::CostReport(CostReport {
            interval_start_unix_ns: 1_800_000_000_000_000_000,
            interval_ns: 60_000_000_000,
            currency: "USD".into(),
            lines: vec![CostLine {
                identity: "alice".into(),
                service: "llm".into(),
                connections: 1,
                bytes_in: 1000,
                cost_micros: 25,
                ..Default::default()
            }],
            month: "2027-01".into(),
            day: "2027-01-15".into(),
        }),
        Body::ControlCall(ControlCall {
            caller: "uid:0".into(),
            role: "operator".into(),
            method: "Revoke".into(),
            request: "identity=alice".into(),
            allowed: true,
            outcome: "ok".into(),
        }),
        Body::Gap(Gap {
            first_seq: 0,
            last_seq: 0,
            reason: "none".into(),
        }),
        Body::SpoolPressure(SpoolPressure {
            full: true,
            bytes_used: 10,
            bytes_limit: 10,
            refused_admissions: 0,
            on_full: "refuse_admissions".into(),
        }),
        Body::Lifecycle(Lifecycle {
            phase: Phase::Stopping as i32,
            agent_version: "0.1.0".into(),
            reason: "SIGTERM".into(),
            ..Default::default()
        }),
    ];
    let mut s = Sealer::resume(node, Head::EMPTY);
    let mut out: Vec<Sealed> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| s.seal(b, wall(i as u64), i as u64 * 1000))
        .collect();
    let n = out.len() as u64;
    out.push(s.seal_checkpoint(key, n, wall(n), n * 1000));
    out
}

fn line(e: &Sealed) -> String {
    ocsf::event_record(&e.bytes).unwrap().to_string()
}

/// Two nodes interleaved.
fn clean_lines() -> Vec<String> {
    let ka = NodeKey::generate().unwrap();
    let kb = NodeKey::generate().unwrap();
    let a = every_kind("node-a", &ka);
    let b = every_kind("node-b", &kb);
    a.iter()
        .zip(&b)
        .flat_map(|(x, y)| [line(x), line(y)])
        .collect()
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&p, text).unwrap();
    p
}

/// Verification without keys: these tests are about the chain and the
/// records; authenticity has its own tests.
fn verify(files: &[PathBuf]) -> Report {
    verify_files(&VerifyOptions {
        allow_unsigned: true,
        ..VerifyOptions::new(files.to_vec())
    })
    .unwrap()
}

/// The first problem: (line, kind, message).
fn first(r: &Report) -> (u64, String, String) {
    let p = r.problems.first().expect("a problem");
    (p.at.line, p.kind.clone(), p.message.clone())
}

#[test]
fn a_clean_trail_passes_with_per_node_summaries() {
    let d = TempDir::new("clean").unwrap();
    let f = write(d.path(), "a.jsonl", &clean_lines());
    let r = verify(std::slice::from_ref(&f));
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(r.records, 24);
    assert_eq!(r.nodes.len(), 2);
    for n in &r.nodes {
        assert_eq!(
            (n.events, n.last_seq, n.last_checkpoint, n.unsigned),
            (12, 12, Some(12), 0)
        );
    }
    // The binary, given the file alone and no key, says plainly that who
    // wrote it was not checked, and fails (exit 1)...
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-collector"))
        .args(["audit", "verify"])
        .arg(&f)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("authenticity NOT checked"), "{stdout}");
    // ... unless told to accept that (exit 0, the same as warnings).
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-collector"))
        .args(["audit", "verify", "--allow-unsigned"])
        .arg(&f)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("OK: 24 records, 2 nodes, 0 problems, 2 warnings"),
        "{stdout}"
    );
    // The same report for machines.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-collector"))
        .args(["audit", "verify", "--allow-unsigned", "--json"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["records"], 24);
    assert_eq!(v["warnings"][0]["kind"], "unauthenticated");
    let node = &v["nodes"][0];
    assert_eq!(
        (
            &node["node_id"],
            &node["first_seq"],
            &node["last_seq"],
            &node["checkpoints"],
            &node["signed_head"]
        ),
        (
            &Value::from("node-a"),
            &Value::from(1),
            &Value::from(12),
            &Value::from(1),
            &Value::from(12)
        )
    );
    assert_eq!(node["key_source"], "trail (not authenticated)");
    // Unreadable input: exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-collector"))
        .args(["audit", "verify"])
        .arg(d.path().join("missing.jsonl"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_unsigned_tail_is_a_warning_not_a_failure() {
    let d = TempDir::new("tail").unwrap();
    let mut lines = clean_lines();
    lines.truncate(lines.len() - 2); // drop both checkpoints
    let f = write(d.path(), "a.jsonl", &lines);
    let r = verify(&[f]);
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(
        r.nodes
            .iter()
            .all(|n| n.unsigned == 11 && n.last_checkpoint.is_none())
    );
}

#[test]
fn an_edited_ocsf_field_is_named_by_line_and_path() {
    let d = TempDir::new("edit-ocsf").unwrap();
    let mut lines = clean_lines();
    // Line 3 is node-a's admission granted.
    let mut v: Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(v["user"]["name"], "alice");
    v["user"]["name"] = "mallory".into();
    lines[2] = v.to_string();
    let f = write(d.path(), "a.jsonl", &lines);
    let r = verify(std::slice::from_ref(&f));
    let (line, kind, msg) = first(&r);
    assert_eq!((line, kind.as_str()), (3, "edited"));
    assert!(msg.contains("$.user.name"), "{msg}");
    assert!(msg.contains("mallory") && msg.contains("alice"), "{msg}");
    // Also an added field.
    let mut lines = clean_lines();
    let mut v: Value = serde_json::from_str(&lines[5]).unwrap();
    v["metadata"]["note"] = "hi".into();
    lines[5] = v.to_string();
    let r = verify(&[write(d.path(), "b.jsonl", &lines)]);
    let (line, _, msg) = first(&r);
    assert_eq!(line, 6);
    assert!(msg.contains("$.metadata.note"), "{msg}");
    // The binary names file:line and exits non-zero.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-collector"))
        .args(["audit", "verify"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "FIRST PROBLEM: {}:3: edited: $.user.name",
            f.display()
        )),
        "{stdout}"
    );
}

#[test]
fn an_edited_raw_is_detected_even_when_the_record_is_recomputed() {
    let d = TempDir::new("edit-raw").unwrap();
    let ka = NodeKey::generate().unwrap();
    let evs = every_kind("node-a", &ka);
    let mut lines: Vec<String> = evs.iter().map(line).collect();
    // Forge seq 2: other bytes, same seq and prev_hash.
    let mut s = Sealer::resume("node-a", Head::of(&evs[0].bytes).unwrap());
    let forged = s.seal(
        Body::AdmissionGranted(AdmissionGranted {
            identity: "mallory".into(),
            service: "llm".into(),
            ..Default::default()
        }),
        wall(1),
        1000,
    );
    // Only raw edited: the record no longer matches its bytes.
    let mut v: Value = serde_json::from_str(&lines[1]).unwrap();
    v["portcullis"]["raw"] = base64_of(&forged.bytes).into();
    let mut only_raw = lines.clone();
    only_raw[1] = v.to_string();
    let r = verify(&[write(d.path(), "a.jsonl", &only_raw)]);
    let (line, kind, _) = first(&r);
    assert_eq!((line, kind.as_str()), (2, "edited"));
    // The whole record recomputed from forged bytes: the chain breaks at
    // the next line.
    lines[1] = line_of(&forged);
    let r = verify(&[write(d.path(), "b.jsonl", &lines)]);
    let (line, kind, _) = first(&r);
    assert_eq!((line, kind.as_str()), (3, "chain_break"));
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn line_of(e: &Sealed) -> String {
    line(e)
}

#[test]
fn deleted_reordered_duplicated_and_truncated_lines_fail() {
    let d = TempDir::new("lines").unwrap();
    // Deleted: line 5 (node-a seq 3) gone; node-a seq 4 is now line 6.
    let mut lines = clean_lines();
    lines.remove(4);
    let r = verify(&[write(d.path(), "del.jsonl", &lines)]);
    let (line, kind, msg) = first(&r);
    assert_eq!((line, kind.as_str()), (6, "gap"), "{msg}");
    assert!(msg.contains("seqs 3..=3 missing"), "{msg}");

    // Reordered: node-a seq 2 (line 3) and seq 3 (line 5) swapped.
    let mut lines = clean_lines();
    lines.swap(2, 4);
    let r = verify(&[write(d.path(), "swap.jsonl", &lines)]);
    let kinds: Vec<(u64, &str)> = r
        .problems
        .iter()
        .map(|p| (p.at.line, p.kind.as_str()))
        .collect();
    assert_eq!(kinds[0], (3, "gap"), "{kinds:?}");
    assert!(kinds.contains(&(5, "reorder")), "{kinds:?}");

    // Duplicated: line 4 again right after itself.
    let mut lines = clean_lines();
    let dup = lines[3].clone();
    lines.insert(4, dup);
    let r = verify(&[write(d.path(), "dup.jsonl", &lines)]);
    let (line, kind, msg) = first(&r);
    assert_eq!((line, kind.as_str()), (5, "duplicate"), "{msg}");
    assert!(msg.contains("dup.jsonl:4"), "{msg}");

    // Truncated: the last line cut in the middle.
    let lines = clean_lines();
    let p = write(d.path(), "trunc.jsonl", &lines);
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 40).unwrap();
    let r = verify(&[p]);
    let (line, kind, _) = first(&r);
    assert_eq!((line, kind.as_str()), (24, "truncated"));
}

#[test]
fn a_bad_checkpoint_signature_and_a_pinned_key_mismatch_fail() {
    let d = TempDir::new("keys").unwrap();
    let key = NodeKey::generate().unwrap();
    let evs = every_kind("node-a", &key);
    let lines: Vec<String> = evs.iter().map(line).collect();
    let f = write(d.path(), "a.jsonl", &lines);
    // Pinned to another key: the STARTED key mismatches and the checkpoint
    // does not verify.
    let other = NodeKey::generate().unwrap();
    let r = verify_files(&VerifyOptions {
        files: vec![f.clone()],
        trust: Trust::Pinned,
        pinned: HashMap::from([("node-a".to_owned(), other.public_key())]),
        allow_unsigned: false,
    })
    .unwrap();
    let kinds: Vec<(u64, &str)> = r
        .problems
        .iter()
        .map(|p| (p.at.line, p.kind.as_str()))
        .collect();
    assert_eq!(kinds, vec![(1, "key_mismatch"), (12, "bad_signature")]);
    // With the right key pinned (keys file through the binary): clean.
    let keys = d.path().join("keys");
    std::fs::write(&keys, format!("node-a {}\n", hex(&key.public_key()))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-collector"))
        .args(["audit", "verify", "--pinned-only", "--keys"])
        .arg(&keys)
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A checkpoint whose signature bytes were altered.
    let mut s = Sealer::resume("node-a", Head::of(&evs[10].bytes).unwrap());
    let bad = s.seal(
        Body::Checkpoint(Checkpoint {
            signature: vec![7; 64],
            key_id: chain::key_id(&key.public_key()),
            events_since_last: 11,
        }),
        wall(11),
        11_000,
    );
    let mut lines = lines;
    lines[11] = line(&bad);
    let r = verify(&[write(d.path(), "b.jsonl", &lines)]);
    let (line, kind, _) = first(&r);
    assert_eq!((line, kind.as_str()), (12, "bad_signature"));
}

#[test]
fn declared_gaps_are_warnings() {
    let d = TempDir::new("declared").unwrap();
    let key = NodeKey::generate().unwrap();
    let mut s = Sealer::resume("node-a", Head::EMPTY);
    let pk = key.public_key();
    let mut evs = vec![s.seal(
        Body::Lifecycle(Lifecycle {
            phase: Phase::Started as i32,
            public_key: pk.to_vec(),
            ..Default::default()
        }),
        wall(0),
        0,
    )];
    for i in 1..5 {
        evs.push(s.seal(Body::Revocation(Revocation::default()), wall(i), i * 1000));
    }
    evs.push(s.seal(
        Body::Gap(Gap {
            first_seq: 2,
            last_seq: 3,
            reason: "drop_oldest".into(),
        }),
        wall(6),
        6000,
    ));
    // Seqs 2 and 3 were dropped by the agent.
    let lines: Vec<String> = [0, 3, 4, 5].iter().map(|&i| line(&evs[i])).collect();
    let r = verify(&[write(d.path(), "a.jsonl", &lines)]);
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.kind == "declared_gap" && w.at.line == 2)
    );
    assert_eq!(r.nodes[0].declared_gaps, vec![(2, 3)]);
}

fn segment(path: &Path, evs: &[Sealed]) {
    let mut b = MAGIC.to_vec();
    for e in evs {
        push_frame(&mut b, &e.bytes);
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn spool_segments_verify_and_a_torn_segment_fails() {
    let d = TempDir::new("spool").unwrap();
    let key = NodeKey::generate().unwrap();
    let evs = every_kind("node-a", &key);
    let s1 = d.path().join("seg-1");
    let s2 = d.path().join("seg-2");
    segment(&s1, &evs[..5]);
    segment(&s2, &evs[5..]);
    let r = verify(&[s1.clone(), s2.clone()]);
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(r.nodes[0].last_checkpoint, Some(12));
    // Segments out of order: a gap then a reorder.
    let r = verify(&[s2.clone(), s1.clone()]);
    assert!(!r.is_clean());
    // A torn last frame.
    let len = std::fs::metadata(&s2).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s2)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let r = verify(&[s1, s2.clone()]);
    let p = &r.problems[0];
    assert_eq!((p.at.line, p.kind.as_str()), (7, "truncated"), "{p}");
    assert!(p.to_string().contains("frame 7"), "{p}");
}

/// Every class's records validate against the OCSF schema (pydantic-ocsf,
/// which bundles the OCSF schema exports, plus a strict attribute check):
/// see tests/ocsf/validate.py.
#[test]
fn records_validate_against_the_ocsf_schema() {
    let d = TempDir::new("ocsf").unwrap();
    let key = NodeKey::generate().unwrap();
    let mut lines: Vec<String> = every_kind("node-a", &key).iter().map(line).collect();
    // A node's detections: an episode's open and close records.
    let mut s = Sealer::resume("node-b", Head::EMPTY);
    for (i, open) in [true, false].into_iter().enumerate() {
        let d = portcullis_proto::v1::Detection {
            kind: "flood".into(),
            subject: "llm".into(),
            open,
            rate: 5000,
            threshold: 1000,
            started_unix_ms: 1_700_000_000_000,
            duration_ms: if open { 0 } else { 4000 },
            total: if open { 0 } else { 20000 },
            detail: String::new(),
        };
        lines.push(line(&s.seal(
            Body::Detection(d),
            wall(i as u64),
            i as u64 * 1000,
        )));
    }
    // And a collector finding.
    let f = portcullis_trail::verify::Finding {
        kind: portcullis_trail::verify::FindingKind::ChainBreak,
        node_id: "node-a".into(),
        seq: 4,
        message: "prev_hash does not link".into(),
    };
    lines.push(
        ocsf::finding_record(&f, 1_800_000_000_000, "192.0.2.1".parse().ok(), Some(b"x"))
            .to_string(),
    );
    let file = write(d.path(), "records.jsonl", &lines);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/ocsf/validate.py");
    let out = Command::new(portcullis_testkit::require_python())
        .arg(&script)
        .arg(&file)
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("{} records valid", lines.len())),
        "{text}"
    );
}
