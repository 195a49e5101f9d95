//! End to end: the audit stream with real processes (docs/events.md). The agent (knock admission on, one checkpoint and
//! one report a second) and `portcullis collector` both run in the server
//! namespace, talking over its loopback. A client knocks continuously, so
//! events keep flowing while the test kills the agent with SIGKILL (and
//! tears its spool's tail), stops the collector for a while, and kills the
//! collector mid-write. Afterwards the collector's output must hold every
//! sequence number of the node exactly once, and `portcullis audit verify`
//! must accept it, and name the place once a line is deleted.

use portcullis_e2e::e2e;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use e2e::{
    SERVICE,
    collector::{Collector, output_files},
    knock::{KnockEnv, KnockSettings},
    serial,
};
use portcullis_e2e::devtoken;
use portcullis_proto::v1;
use portcullis_testkit::{TempDir, poll_until};
use portcullis_trail::frame::read_segment_file;
use prost::Message as _;

const INVOKE: &str = "model:llm:invoke";
const COLLECTOR_PORT: u16 = 7443;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// The client knocks (each admitted knock is one audit event) until the
/// test has seen what it needs, but never longer than this.
const KNOCKING_AT_MOST: Duration = Duration::from_secs(240);

fn json_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str()?.parse().ok())
}

/// Sequence numbers of `node`'s events in the output, counted (a finding
/// record carries no event of its own and is not counted).
fn delivered(dir: &Path, node: &str) -> BTreeMap<u64, u32> {
    let mut seqs = BTreeMap::new();
    for f in output_files(dir) {
        let text = fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line still being written
            };
            let p = &v["portcullis"];
            if p["node_id"].as_str() != Some(node) || p.get("raw").is_none() {
                continue;
            }
            if let Some(seq) = json_u64(&p["seq"]) {
                *seqs.entry(seq).or_insert(0) += 1;
            }
        }
    }
    seqs
}

/// Segment files of the agent's spool, oldest first.
fn segments(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(spool)
        .expect("spool dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pcs"))
        .collect();
    v.sort();
    v
}

/// The newest sequence number the agent has made durable.
fn spool_head(spool: &Path) -> u64 {
    let last = segments(spool).pop().expect("a segment");
    let read = read_segment_file(&last).expect("read segment");
    let bytes = read.frames.last().expect("an event in the active segment");
    portcullis_trail::chain::Head::of(bytes)
        .expect("decodes")
        .seq
}

/// The newest `Lifecycle` STARTED event in the spool.
fn last_started(spool: &Path) -> v1::Lifecycle {
    let mut found = None;
    for seg in segments(spool) {
        for bytes in read_segment_file(&seg).expect("read segment").frames {
            let ev = v1::Event::decode(bytes.as_slice()).expect("decodes");
            if let Some(v1::event::Body::Lifecycle(l)) = ev.body
                && l.phase == v1::lifecycle::Phase::Started as i32
            {
                found = Some(l);
            }
        }
    }
    found.expect("a STARTED event in the spool")
}

fn verify(binary: &Path, args: &[&str], paths: &[PathBuf]) -> std::process::Output {
    std::process::Command::new(binary)
        .args(["audit", "verify"])
        .args(args)
        .args(paths)
        .output()
        .expect("run audit verify")
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of a collector's output directory.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to.join("keys")).unwrap();
    for sub in ["", "keys"] {
        for e in fs::read_dir(from.join(sub)).unwrap().flatten() {
            if e.path().is_file() {
                fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
}

#[test]
fn every_event_reaches_the_collector_exactly_once_through_crashes_and_outages() {
    let _serial = serial();
    let settings = KnockSettings {
        knock_per_source: (100, 100),
        audit: format!(
            "checkpoint_secs = 1\nreport_interval_secs = 1\n\n[audit.collector]\nendpoint = \"http://127.0.0.1:{COLLECTOR_PORT}\"\nbatch_max_events = 64\n"
        ),
        ..KnockSettings::default()
    };
    let mut k = KnockEnv::start("audit", &settings);
    let node = format!("e2e-knock-{}", k.env.topo.index);
    let spool = k.env.state_dir().join("spool");
    let out_dir = TempDir::new("collector-out").expect("out dir");
    // The operator enrolls the node with its public key before the
    // collector accepts anything from it.
    let enrolled = std::process::Command::new(&k.env.binary)
        .args(["collector", "enroll", "--out"])
        .arg(out_dir.path())
        .arg(&node)
        .arg(portcullis_trail::hex::hex(&k.node_public_key))
        .output()
        .expect("run collector enroll");
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let mut collector = Collector::start(
        &k.env.binary,
        &k.env.topo.server,
        SocketAddr::from(([127, 0, 0, 1], COLLECTOR_PORT)),
        out_dir.path(),
        k.env.state_dir(),
    );

    let stop = AtomicBool::new(false);
    let knocks = AtomicU64::new(0);
    // The knocking thread must not borrow the environment the test restarts
    // the agent in: it mints its own tokens from plain paths and claims.
    let issuer_key = k.issuer.key_path.clone();
    let claims = k.claims(&[INVOKE], Duration::from_secs(600));
    let token_dir = k.env.state_dir().join("knock-tokens");
    fs::create_dir_all(&token_dir).unwrap();
    let client_ns = k.env.topo.client.name().to_string();
    let binary = k.env.binary.clone();
    let node_pub = k.node_pub_file.clone();
    let knock_addr = k.knock_addr(false).to_string();
    std::thread::scope(|scope| {
        // Events keep flowing: one admission per knock.
        let (stop, knocks) = (&stop, &knocks);
        let client = scope.spawn(move || {
            let deadline = Instant::now() + KNOCKING_AT_MOST;
            for n in 0.. {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let token = devtoken::mint(&issuer_key, claims.clone()).expect("mint");
                let file = token_dir.join(format!("t{}", n % 8));
                fs::write(&file, token).unwrap();
                let out = std::process::Command::new("ip")
                    .args(["netns", "exec", &client_ns])
                    .arg(&binary)
                    .args(["knock", "--token-file"])
                    .arg(&file)
                    .args(["--service", SERVICE, "--node-key-pub"])
                    .arg(&node_pub)
                    .args(["--timeout-ms", "500", "--retries", "1", &knock_addr])
                    .stdin(Stdio::null())
                    .output()
                    .expect("run knock");
                if out.status.success() {
                    knocks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let wait_for = |what: &str, f: &dyn Fn() -> bool| {
            assert!(
                poll_until(DELIVERY_TIMEOUT, || f().then_some(())).is_some(),
                "{what}"
            );
        };

        // 1. Streaming: the collector acknowledges a steady flow.
        wait_for("first events delivered", &|| {
            delivered(out_dir.path(), &node).len() >= 10
        });

        // 2. SIGKILL the agent mid-stream and tear its spool's tail, as a
        //    crash in the middle of a write would.
        k.env.agent().kill9().expect("kill agent");
        k.env.agent = None;
        let active = segments(&spool).pop().expect("active segment");
        let before = fs::metadata(&active).unwrap().len();
        File::options()
            .append(true)
            .open(&active)
            .unwrap()
            .write_all(&[0x2a, 0, 0, 0, 1, 2, 3])
            .unwrap();
        assert_eq!(k.env.start_agent(), "adopted");
        // The restarted agent cut exactly the torn bytes and said so.
        let started = last_started(&spool);
        assert_eq!(started.recovered_torn_bytes, 7, "{started:?}");
        assert!(started.recovered_seq > 0, "{started:?}");
        assert!(fs::metadata(&active).unwrap().len() >= before);
        let head_after_restart = spool_head(&spool);
        wait_for("delivery resumes after the agent restart", &|| {
            delivered(out_dir.path(), &node)
                .keys()
                .next_back()
                .is_some_and(|&s| s >= head_after_restart)
        });

        // 3. Collector stopped for a while: events pile up in the spool.
        collector.terminate();
        let held = spool_head(&spool);
        wait_for(
            "the agent keeps recording while the collector is down",
            &|| spool_head(&spool) >= held + 5,
        );
        collector.spawn(&k.env.topo.server);
        let target = spool_head(&spool);
        wait_for(
            "the backlog is delivered after the collector returns",
            &|| {
                delivered(out_dir.path(), &node)
                    .keys()
                    .next_back()
                    .is_some_and(|&s| s >= target)
            },
        );

        // 4. Collector killed mid-write (while a backlog streams in).
        collector.terminate();
        let held = spool_head(&spool);
        wait_for("a backlog builds", &|| spool_head(&spool) >= held + 5);
        collector.spawn(&k.env.topo.server);
        wait_for("the collector takes part of the backlog", &|| {
            delivered(out_dir.path(), &node)
                .keys()
                .next_back()
                .is_some_and(|&s| s > held)
        });
        collector.kill9();
        collector.spawn(&k.env.topo.server);

        stop.store(true, Ordering::Relaxed);
        client.join().expect("knock thread");
    });
    assert!(
        knocks.load(Ordering::Relaxed) > 0,
        "some knocks were admitted"
    );

    // Everything the agent holds arrives, each sequence number once. The
    // agent keeps sealing (checkpoints), so the collector may be past the
    // head read here; every seq up to what it holds is checked.
    let head = spool_head(&spool);
    // `agent status` reads the same head from the spool files.
    let status = k.env.status();
    assert!(status["audit_last_seq"] >= head, "{status:?}");
    assert!(status["audit_spool_bytes"] > 0, "{status:?}");
    let seqs = poll_until(DELIVERY_TIMEOUT, || {
        let d = delivered(out_dir.path(), &node);
        d.keys()
            .next_back()
            .is_some_and(|&s| s >= head)
            .then_some(d)
    })
    .unwrap_or_else(|| panic!("the collector never caught up with seq {head}"));
    let last = *seqs.keys().next_back().expect("delivered");
    let missing: Vec<u64> = (1..=last).filter(|s| !seqs.contains_key(s)).collect();
    let dups: Vec<(&u64, &u32)> = seqs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "missing seqs: {missing:?}");
    assert!(dups.is_empty(), "duplicated seqs: {dups:?}");
    assert_eq!(seqs.len() as u64, last);
    eprintln!(
        "delivered seqs 1..={last} exactly once ({} knocks admitted)",
        knocks.load(Ordering::Relaxed)
    );

    // The collector's output verifies as a whole (stopped first, so no line
    // is being written while it is read): against its own record of the
    // node's key and up to the heads it acknowledged, and together with
    // the agent's spool, whose acknowledged events are the same events
    // (corroboration, not duplicates).
    collector.terminate();
    let files = output_files(out_dir.path());
    let ok = verify(
        &k.env.binary,
        &[],
        &[out_dir.path().to_owned(), spool.clone()],
    );
    assert!(
        ok.status.success(),
        "audit verify rejected the collector's output with the spool:\n{}",
        said(&ok)
    );
    let text = said(&ok);
    assert!(
        text.contains("key from collector (enrolled)") && text.contains(" corroborated"),
        "{text}"
    );

    // Records cut from the end of the last file, at a line boundary: the
    // collector acknowledged them, so they are missing.
    let cut_dir = TempDir::new("cut").expect("dir");
    copy_dir(out_dir.path(), cut_dir.path());
    let last_file = output_files(cut_dir.path()).pop().expect("a file");
    let text_last = fs::read_to_string(&last_file).unwrap();
    let keep: Vec<&str> = text_last.lines().collect();
    let keep = &keep[..keep.len().saturating_sub(keep.len() / 3 + 1)];
    fs::write(
        &last_file,
        keep.join("\n") + if keep.is_empty() { "" } else { "\n" },
    )
    .unwrap();
    let bad = verify(&k.env.binary, &[], &[cut_dir.path().to_owned()]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "truncation went unnoticed:\n{}",
        said(&bad)
    );
    assert!(said(&bad).contains("missing: node"), "{}", said(&bad));

    // Deleting one line is found, and named.
    let tampered_dir = TempDir::new("tampered").expect("dir");
    let all: String = files
        .iter()
        .map(|f| fs::read_to_string(f).unwrap())
        .collect();
    let lines: Vec<&str> = all.lines().collect();
    let victim = lines.len() / 2;
    let kept: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, l)| *l)
        .collect();
    let tampered = tampered_dir.path().join("events.jsonl");
    fs::write(&tampered, kept.join("\n") + "\n").unwrap();
    let bad = verify(
        &k.env.binary,
        &["--allow-unsigned"],
        std::slice::from_ref(&tampered),
    );
    let text = said(&bad);
    assert!(
        !bad.status.success(),
        "a deleted line went unnoticed:\n{text}"
    );
    assert!(
        text.contains(&format!(":{}", victim + 1)),
        "audit verify does not name line {} (where the deleted event was):\n{text}",
        victim + 1
    );
    drop(collector);
}
