//! The collector in-process: a real tonic server on 127.0.0.1:0 driven by a
//! tonic client with events sealed by `chain::Sealer` and a `NodeKey`.

use portcullis_testkit::{TempDir, TmpfsMount};
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use portcullis_collector::{
    Collector, CollectorOptions, Output,
    evidence::{Report, VerifyOptions, verify_files},
    store,
};
use portcullis_proto::v1::{
    AdmissionGranted, AgentMessage, CollectorMessage, EventBatch, Hello, Lifecycle, Proof,
    agent_message::Msg, collector_client::CollectorClient, collector_message, event::Body,
    lifecycle::Phase,
};
use portcullis_trail::{
    chain,
    chain::{Head, Sealed, Sealer},
    node_key::NodeKey,
    ocsf,
};
use prost::Message as _;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Streaming, codegen::tokio_stream::wrappers::ReceiverStream};

/// A collector serving in the background.
struct Running {
    addr: SocketAddr,
    collector: Collector,
    /// Its record of node keys (where `collector enroll` writes).
    keys: Option<std::path::PathBuf>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    async fn start(opts: CollectorOptions) -> Running {
        let keys = match &opts.output {
            Output::Dir { dir, .. } => Some(dir.join("keys")),
            Output::Writer { state_dir, .. } => state_dir.as_ref().map(|d| d.join("keys")),
        };
        let collector = Collector::open(opts).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let c = collector.clone();
        let task = tokio::spawn(async move {
            c.serve(listener, None, async {
                let _ = rx.await;
            })
            .await
        });
        Running {
            addr,
            collector,
            keys,
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("collector stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

fn dir_opts(dir: &Path) -> CollectorOptions {
    rotating_opts(dir, store::DEFAULT_ROTATE_BYTES)
}

/// Output files in `dir`, rotated at `rotate_bytes`.
fn rotating_opts(dir: &Path, rotate_bytes: u64) -> CollectorOptions {
    CollectorOptions::new(Output::Dir {
        dir: dir.to_owned(),
        rotate_bytes,
    })
}

/// A test agent: a node key and a chain.
struct Agent {
    node: String,
    key: NodeKey,
    sealer: Sealer,
    t: u64,
}

impl Agent {
    fn new(node: &str) -> Agent {
        Agent {
            node: node.to_owned(),
            key: NodeKey::generate().unwrap(),
            sealer: Sealer::resume(node, Head::EMPTY),
            t: 0,
        }
    }

    fn seal(&mut self, body: Body) -> Sealed {
        self.t += 1;
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + self.t);
        self.sealer.seal(body, wall, self.t * 1_000)
    }

    fn started(&mut self) -> Sealed {
        let pk = self.key.public_key();
        self.seal(Body::Lifecycle(Lifecycle {
            phase: Phase::Started as i32,
            agent_version: "0.1.0".into(),
            public_key: pk.to_vec(),
            key_id: chain::key_id(&pk),
            reason: "start".into(),
            ..Default::default()
        }))
    }

    fn granted(&mut self, who: &str) -> Sealed {
        self.seal(Body::AdmissionGranted(AdmissionGranted {
            identity: who.into(),
            service: "llm".into(),
            source: "10.0.0.7".into(),
            method: 1,
            policies: vec!["p1".into()],
            action: "invoke".into(),
            expires_unix_ms: 1_800_000_300_000,
            ..Default::default()
        }))
    }

    fn checkpoint(&mut self) -> Sealed {
        self.t += 1;
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + self.t);
        self.sealer
            .seal_checkpoint(&self.key, 1, wall, self.t * 1_000)
    }

    /// STARTED, `n - 2` admissions, a checkpoint.
    fn chain(&mut self, n: usize) -> Vec<Sealed> {
        let mut v = vec![self.started()];
        for i in 0..n.saturating_sub(2) {
            v.push(self.granted(&format!("user{i}")));
        }
        v.push(self.checkpoint());
        v
    }
}

/// A client stream.
struct Stream {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<CollectorMessage>,
}

impl Stream {
    async fn open(addr: SocketAddr) -> Stream {
        let mut client = CollectorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(8);
        let resp = client.stream(ReceiverStream::new(rx)).await.unwrap();
        Stream {
            tx,
            rx: resp.into_inner(),
        }
    }

    async fn send(&self, m: Msg) {
        self.tx.send(AgentMessage { msg: Some(m) }).await.unwrap();
    }

    async fn recv(&mut self) -> Result<collector_message::Msg, tonic::Status> {
        let m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("collector answers within 10 s")?;
        Ok(m.expect("stream open").msg.expect("message set"))
    }

    /// Hello; returns the challenge (the Welcome says nothing else).
    async fn hello(&mut self, node: &str, pk: [u8; 32]) -> Vec<u8> {
        self.send(Msg::Hello(Hello {
            protocol: 2,
            node_id: node.into(),
            public_key: pk.to_vec(),
        }))
        .await;
        match self.recv().await.unwrap() {
            collector_message::Msg::Welcome(w) => w.challenge,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Hello and Proof as `agent`; the collector's answer: resume_after
    /// (Accepted) or the refusal.
    async fn prove(addr: SocketAddr, agent: &Agent) -> (Stream, Result<u64, tonic::Status>) {
        let mut s = Stream::open(addr).await;
        let challenge = s.hello(&agent.node, agent.key.public_key()).await;
        assert_eq!(challenge.len(), 32);
        let sig = agent
            .key
            .sign(&chain::hello_message(&agent.node, &challenge));
        s.send(Msg::Proof(Proof {
            signature: sig.to_vec(),
        }))
        .await;
        let answer = match s.recv().await {
            Ok(collector_message::Msg::Accepted(a)) => Ok(a.resume_after),
            Ok(other) => panic!("expected Accepted, got {other:?}"),
            Err(st) => Err(st),
        };
        (s, answer)
    }

    /// `agent` enrolled (as an operator would), then its full handshake;
    /// returns resume_after.
    async fn handshake(run: &Running, agent: &Agent) -> (Stream, u64) {
        Stream::handshake_at(run.addr, run.keys.as_deref(), agent).await
    }

    async fn handshake_at(
        addr: SocketAddr,
        keys_dir: Option<&Path>,
        agent: &Agent,
    ) -> (Stream, u64) {
        if let Some(k) = keys_dir {
            portcullis_collector::enroll::enroll(k, &agent.node, agent.key.public_key(), true)
                .unwrap();
        }
        let (s, answer) = Stream::prove(addr, agent).await;
        (s, answer.expect("accepted"))
    }

    async fn batch(&mut self, events: &[Sealed]) -> Result<u64, tonic::Status> {
        self.send(Msg::Batch(EventBatch {
            events: events.iter().map(|e| e.bytes.clone()).collect(),
        }))
        .await;
        match self.recv().await? {
            collector_message::Msg::Ack(a) => Ok(a.persisted_through),
            other => panic!("expected Ack, got {other:?}"),
        }
    }
}

/// Every record in the output directory, in write order.
fn records(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for f in store::output_files(dir).unwrap() {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines() {
            out.push(serde_json::from_str(line).unwrap());
        }
    }
    out
}

fn event_seqs(recs: &[Value], node: &str) -> Vec<u64> {
    recs.iter()
        .filter(|r| r["portcullis"]["record"] == "event" && r["portcullis"]["node_id"] == node)
        .map(|r| r["portcullis"]["seq"].as_u64().unwrap())
        .collect()
}

fn findings(recs: &[Value]) -> Vec<String> {
    recs.iter()
        .filter(|r| r["portcullis"]["record"] == "finding")
        .map(|r| {
            assert_eq!(r["class_uid"], 2004);
            r["portcullis"]["finding"]["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// `audit verify DIR`: the collector's files, key record and acknowledged
/// heads.
fn verify_dir(dir: &Path) -> Report {
    verify_files(&VerifyOptions::new(vec![dir.to_owned()])).unwrap()
}

#[tokio::test]
async fn handshake_batches_acks_and_ocsf_records() {
    let dir = TempDir::new("happy").unwrap();
    let run = Running::start(dir_opts(dir.path())).await;
    let mut a = Agent::new("node-a");
    let (mut s, resume) = Stream::handshake(&run, &a).await;
    assert_eq!(resume, 0);
    let evs = a.chain(5);
    assert_eq!(s.batch(&evs[..2]).await.unwrap(), 2);
    assert_eq!(s.batch(&evs[2..]).await.unwrap(), 5);
    let recs = records(dir.path());
    assert_eq!(event_seqs(&recs, "node-a"), vec![1, 2, 3, 4, 5]);
    assert!(findings(&recs).is_empty());
    assert_eq!(recs[0]["class_uid"], 6002);
    assert_eq!(recs[1]["class_uid"], 3002);
    assert_eq!(recs[1]["user"]["name"], "user0");
    assert_eq!(recs[4]["class_uid"], ocsf::PORTCULLIS_CLASS_UID);
    // Each record is exactly the mapping of its bytes.
    for (r, e) in recs.iter().zip(&evs) {
        assert_eq!(r, &ocsf::event_record(&e.bytes).unwrap());
    }
    // The key was trusted on first use and persisted.
    assert!(dir.path().join("keys/node-a.pub").exists());
    drop(s);
    run.stop().await;
    let report = verify_dir(dir.path());
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.nodes[0].last_checkpoint, Some(5));
    assert_eq!(report.nodes[0].unsigned, 0);
}

/// A codec that sends raw bytes (garbage) and reads CollectorMessages.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEnc;
struct RawDec;

impl tonic::codec::Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDec {
    type Item = CollectorMessage;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<CollectorMessage>, tonic::Status> {
        CollectorMessage::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = CollectorMessage;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

async fn send_garbage(addr: SocketAddr, bytes: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(1);
    tx.send(bytes).await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/portcullis.v1.Collector/Stream");
    let resp = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await;
    let status = match resp {
        Err(s) => s,
        Ok(r) => {
            let mut st = r.into_inner();
            tokio::time::timeout(Duration::from_secs(10), st.message())
                .await
                .unwrap()
                .expect_err("garbage must be refused")
        }
    };
    drop(tx);
    status
}

#[tokio::test]
async fn non_agents_are_refused_and_nothing_is_written() {
    let dir = TempDir::new("refuse").unwrap();
    let mut opts = dir_opts(dir.path());
    let pinned = Agent::new("pinned-node");
    let mut impostor = Agent::new("pinned-node");
    opts.pinned = HashMap::from([("pinned-node".to_owned(), pinned.key.public_key())]);
    let run = Running::start(opts).await;

    // Garbage bytes as the first message.
    let st = send_garbage(run.addr, vec![0x08, 0x05, 0xff, 0xff, 0x13]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");

    // Wrong order: a Proof first.
    let mut s = Stream::open(run.addr).await;
    s.send(Msg::Proof(Proof {
        signature: vec![0; 64],
    }))
    .await;
    assert_eq!(s.recv().await.unwrap_err().code(), Code::InvalidArgument);

    // Bad Hello fields (protocol 1 told resume_after before the proof).
    for (protocol, node, key_len) in [(1, "n", 32), (2, "bad/node", 32), (2, "n", 31)] {
        let mut s = Stream::open(run.addr).await;
        s.send(Msg::Hello(Hello {
            protocol,
            node_id: node.into(),
            public_key: vec![1; key_len],
        }))
        .await;
        assert_eq!(s.recv().await.unwrap_err().code(), Code::InvalidArgument);
    }

    // Bad proof: signed by another key than the Hello key.
    let a = Agent::new("node-b");
    let other = NodeKey::generate().unwrap();
    let mut s = Stream::open(run.addr).await;
    let challenge = s.hello("node-b", a.key.public_key()).await;
    s.send(Msg::Proof(Proof {
        signature: other
            .sign(&chain::hello_message("node-b", &challenge))
            .to_vec(),
    }))
    .await;
    assert_eq!(s.recv().await.unwrap_err().code(), Code::Unauthenticated);

    // A valid proof for a key that is not the pinned one: refused before
    // anything about the node is said.
    let (_, answer) = Stream::prove(run.addr, &impostor).await;
    assert_eq!(answer.unwrap_err().code(), Code::PermissionDenied);
    let _ = impostor.chain(3);

    // Events of another node on an authenticated stream.
    let mut c = Agent::new("node-c");
    let mut d = Agent::new("node-d");
    let (mut s, _) = Stream::handshake(&run, &c).await;
    let mut mixed = c.chain(2);
    mixed.push(d.started());
    let err = s.batch(&mixed).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Undecodable event bytes in a batch.
    let (mut s, _) = Stream::handshake(&run, &c).await;
    let mut junk = c.chain(2);
    junk[1].bytes = vec![0xff; 9];
    let err = s.batch(&junk).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let refused = portcullis_collector::Stats::get(&run.collector.stats().refused);
    assert!(refused >= 9, "refused {refused}");
    drop(s);
    run.stop().await;
    let recs = records(dir.path());
    // No event record at all. The failed handshakes, all from 127.0.0.1 in
    // one window: the first reported at once, the rest as one finding with
    // their count (written when the window ends, here at the stop).
    assert!(recs.iter().all(|r| r["portcullis"]["record"] == "finding"));
    let kinds = findings(&recs);
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    let last = recs.last().unwrap()["portcullis"]["finding"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        last.starts_with("6 more failed handshakes from this source"),
        "{last}"
    );
}

#[tokio::test]
async fn oversized_batch_is_refused_whole() {
    let dir = TempDir::new("big").unwrap();
    let mut opts = dir_opts(dir.path());
    opts.max_batch_events = 4;
    let run = Running::start(opts).await;
    let mut a = Agent::new("node-a");
    let (mut s, _) = Stream::handshake(&run, &a).await;
    let evs = a.chain(5);
    assert_eq!(
        s.batch(&evs).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let (mut s, resume) = Stream::handshake(&run, &a).await;
    assert_eq!(resume, 0, "nothing of the refused batch was written");
    assert_eq!(s.batch(&evs[..4]).await.unwrap(), 4);
    drop(s);
    run.stop().await;
    assert_eq!(event_seqs(&records(dir.path()), "node-a"), vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn dedupes_across_reconnects_and_restarts_and_repairs_a_torn_tail() {
    let dir = TempDir::new("dedupe").unwrap();
    let mut a = Agent::new("node-a");
    let evs = a.chain(10);

    let run = Running::start(dir_opts(dir.path())).await;
    let (mut s, resume) = Stream::handshake(&run, &a).await;
    assert_eq!(resume, 0);
    assert_eq!(s.batch(&evs[..5]).await.unwrap(), 5);
    drop(s);
    // Reconnect: resume_after says 5; a resend of 3..=7 writes only 6, 7.
    let (mut s, resume) = Stream::handshake(&run, &a).await;
    assert_eq!(resume, 5);
    assert_eq!(s.batch(&evs[2..7]).await.unwrap(), 7);
    let dups = portcullis_collector::Stats::get(&run.collector.stats().duplicates);
    assert_eq!(dups, 3);
    drop(s);
    run.stop().await;
    assert_eq!(
        event_seqs(&records(dir.path()), "node-a"),
        (1..=7).collect::<Vec<_>>()
    );

    // A crash mid-write leaves a torn last line (never acknowledged).
    let last = store::output_files(dir.path()).unwrap().pop().unwrap();
    let good_len = std::fs::metadata(&last).unwrap().len();
    let torn = ocsf::event_record(&evs[7].bytes).unwrap().to_string();
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap();
        f.write_all(&torn.as_bytes()[..torn.len() / 2]).unwrap();
    }
    // The state file is behind the output too (as after a kill): remove it
    // so heads come from scanning the records.
    std::fs::remove_file(dir.path().join("state.json")).unwrap();

    let run = Running::start(dir_opts(dir.path())).await;
    assert_eq!(
        std::fs::metadata(&last).unwrap().len(),
        good_len,
        "torn tail cut"
    );
    let (mut s, resume) = Stream::handshake(&run, &a).await;
    assert_eq!(resume, 7);
    // The agent resends from 6 (it never got an ack for 8).
    assert_eq!(s.batch(&evs[5..]).await.unwrap(), 10);
    drop(s);
    run.stop().await;
    let recs = records(dir.path());
    assert_eq!(event_seqs(&recs, "node-a"), (1..=10).collect::<Vec<_>>());
    assert!(findings(&recs).is_empty(), "{:?}", findings(&recs));
    let report = verify_dir(dir.path());
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[tokio::test]
async fn rotates_by_size_in_write_order() {
    let dir = TempDir::new("rotate").unwrap();
    let run = Running::start(rotating_opts(dir.path(), 4096)).await;
    let mut a = Agent::new("node-a");
    let mut b = Agent::new("node-b");
    let ea = a.chain(30);
    let eb = b.chain(30);
    let (mut sa, _) = Stream::handshake(&run, &a).await;
    let (mut sb, _) = Stream::handshake(&run, &b).await;
    for i in (0..30).step_by(3) {
        sa.batch(&ea[i..i + 3]).await.unwrap();
        sb.batch(&eb[i..i + 3]).await.unwrap();
    }
    drop((sa, sb));
    run.stop().await;
    let files = store::output_files(dir.path()).unwrap();
    assert!(files.len() >= 5, "{} files", files.len());
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for (i, n) in names.iter().enumerate() {
        assert!(
            n.starts_with("events-") && n.ends_with(&format!("-{:06}.jsonl", i + 1)),
            "{n}"
        );
    }
    // Every file but the last is at most a batch past the limit.
    for f in &files[..files.len() - 1] {
        assert!(std::fs::metadata(f).unwrap().len() <= 4096 + 8192);
    }
    let recs = records(dir.path());
    assert_eq!(event_seqs(&recs, "node-a"), (1..=30).collect::<Vec<_>>());
    assert_eq!(event_seqs(&recs, "node-b"), (1..=30).collect::<Vec<_>>());
    let report = verify_dir(dir.path());
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.nodes.len(), 2);
}

#[tokio::test]
async fn chain_break_and_bad_checkpoint_write_findings() {
    let dir = TempDir::new("findings").unwrap();
    let run = Running::start(dir_opts(dir.path())).await;
    let mut a = Agent::new("node-a");
    let (mut s, _) = Stream::handshake(&run, &a).await;
    let first = a.chain(3);
    s.batch(&first).await.unwrap();
    // An event that does not link to seq 3.
    let mut fork = Sealer::resume(
        "node-a",
        Head {
            seq: 3,
            hash: [9; 32],
        },
    );
    let broken = fork.seal(
        Body::Gap(portcullis_proto::v1::Gap::default()),
        SystemTime::now(),
        99_000,
    );
    // A checkpoint signed by another key.
    let other = NodeKey::generate().unwrap();
    let bad_cp = fork.seal_checkpoint(&other, 1, SystemTime::now(), 99_001);
    assert_eq!(s.batch(&[broken, bad_cp]).await.unwrap(), 5);
    drop(s);
    run.stop().await;
    let recs = records(dir.path());
    assert_eq!(event_seqs(&recs, "node-a"), vec![1, 2, 3, 4, 5]);
    assert_eq!(findings(&recs), vec!["chain_break", "bad_signature"]);
    // The finding carries the offending bytes as evidence.
    let f = recs
        .iter()
        .find(|r| r["portcullis"]["record"] == "finding")
        .unwrap();
    assert!(f["portcullis"]["evidence_raw"].is_string());
    assert_eq!(f["finding_info"]["uid"], "node-a/4/chain_break");
    // audit verify sees the same problems in the output.
    let report = verify_dir(dir.path());
    let kinds: Vec<&str> = report.problems.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(kinds, vec!["chain_break", "bad_signature"]);
}

#[tokio::test]
async fn a_newer_stream_of_the_same_node_takes_over() {
    let dir = TempDir::new("takeover").unwrap();
    let run = Running::start(dir_opts(dir.path())).await;
    let mut a = Agent::new("node-a");
    let evs = a.chain(4);
    let (mut old, _) = Stream::handshake(&run, &a).await;
    assert_eq!(old.batch(&evs[..1]).await.unwrap(), 1);
    let (mut new, resume) = Stream::handshake(&run, &a).await;
    assert_eq!(resume, 1);
    assert_eq!(
        old.batch(&evs[1..2]).await.unwrap_err().code(),
        Code::Aborted
    );
    assert_eq!(new.batch(&evs[1..]).await.unwrap(), 4);
    drop((old, new));
    run.stop().await;
    assert_eq!(event_seqs(&records(dir.path()), "node-a"), vec![1, 2, 3, 4]);
}

#[test]
fn stdout_mode_writes_json_lines_to_stdout() {
    use std::{
        io::{BufRead as _, BufReader},
        process::{Command, Stdio},
    };
    let state = TempDir::new("stdout").unwrap();
    let mut child = Command::new(portcullis_e2e::e2e::agent_binary())
        .args([
            "collector",
            "--listen",
            "127.0.0.1:0",
            "--stdout",
            "--state-dir",
        ])
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Kill(child);
    // The bound address is announced on stderr; keep draining it after.
    let (atx, arx) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        let mut log = Vec::new();
        let mut atx = Some(atx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = line.strip_prefix("portcullis collector: listening on ")
                && let Some(tx) = atx.take()
            {
                let _ = tx.send(a.parse::<SocketAddr>().unwrap());
            }
            log.push(line);
        }
        log
    });
    let addr = arx.recv_timeout(Duration::from_secs(30)).ok();
    let addr = addr.expect("collector announces its address");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut a = Agent::new("node-s");
    let evs = a.chain(4);
    rt.block_on(async {
        let (mut s, resume) =
            Stream::handshake_at(addr, Some(&state.path().join("keys")), &a).await;
        assert_eq!(resume, 0);
        // Acked only after the lines are flushed to stdout.
        assert_eq!(s.batch(&evs).await.unwrap(), 4);
    });
    let lines: Vec<Value> = BufReader::new(stdout)
        .lines()
        .take(4)
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    for (l, e) in lines.iter().zip(&evs) {
        assert_eq!(l, &ocsf::event_record(&e.bytes).unwrap());
    }
    assert!(state.path().join("keys/node-s.pub").exists());
    assert!(state.path().join("state.json").exists());
    drop(_guard);
    let log = drain.join().unwrap();
    assert!(
        log.iter().any(|l| l.contains("agent stream accepted")),
        "{log:?}"
    );
}

/// A 1 MiB tmpfs with an output directory and a ballast file that leaves
/// room for only part of the events the disk-full tests write (removing the
/// ballast is space returning).
fn nearly_full_disk() -> (TmpfsMount, std::path::PathBuf, std::path::PathBuf) {
    let disk = TmpfsMount::new(1 << 20).expect("mount a tmpfs (tests run as root)");
    let out = disk.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 900 * 1024]).unwrap();
    (disk, out, ballast)
}

/// Space returns (the ballast goes); the agent reconnects, is told to
/// resume after what was acknowledged, resends the rest, and the collector
/// stops.
async fn resend_once_space_returns(
    run: Running,
    a: &Agent,
    evs: &[Sealed],
    ballast: &Path,
    acked: u64,
) {
    std::fs::remove_file(ballast).unwrap();
    let (mut s, resume) = Stream::handshake(&run, a).await;
    assert_eq!(resume, acked);
    let from = usize::try_from(acked).unwrap();
    for chunk in evs[from..].chunks(10) {
        s.batch(chunk).await.expect("written once space is back");
    }
    drop(s);
    run.stop().await;
}

/// Disk full at the collector: the batch that does not fit is refused
/// (nothing acknowledged that is not on disk, nothing half-written kept),
/// and once space returns the agent's resend lands exactly once.
#[tokio::test]
async fn collector_disk_full_refuses_without_acking_then_recovers() {
    let (_disk, out, ballast) = nearly_full_disk();

    let mut a = Agent::new("node-full");
    let evs = a.chain(200);
    let run = Running::start(dir_opts(&out)).await;
    let (mut s, _) = Stream::handshake(&run, &a).await;
    let mut acked = 0;
    let mut refused = None;
    for chunk in evs.chunks(10) {
        match s.batch(chunk).await {
            Ok(n) => acked = n,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("the disk filled up before 200 events were written");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(acked > 0 && acked < 200, "acked {acked}");
    // Exactly what was acknowledged is on disk: no more (a half-written
    // batch was cut back), no less.
    assert_eq!(
        event_seqs(&records(&out), "node-full"),
        (1..=acked).collect::<Vec<_>>()
    );

    resend_once_space_returns(run, &a, &evs, &ballast, acked).await;
    assert_eq!(
        event_seqs(&records(&out), "node-full"),
        (1..=200).collect::<Vec<_>>()
    );
    assert!(verify_dir(&out).is_clean());
}

/// The same with batches in flight: the disk fills while several batches
/// are verified and queued. The ones written are acknowledged in order, the
/// rest are dropped unwritten (the node's verifier goes back to what is on
/// disk), and a resend after space returns is accepted and written once.
#[tokio::test]
async fn collector_disk_full_with_batches_in_flight_loses_and_repeats_nothing() {
    let (_disk, out, ballast) = nearly_full_disk();

    let mut a = Agent::new("node-pipe");
    let evs = a.chain(300);
    let run = Running::start(dir_opts(&out)).await;
    let (mut s, _) = Stream::handshake(&run, &a).await;
    // Everything at once: the collector has several batches in flight.
    for chunk in evs.chunks(10) {
        s.send(Msg::Batch(EventBatch {
            events: chunk.iter().map(|e| e.bytes.clone()).collect(),
        }))
        .await;
    }
    let mut acked = 0;
    let status = loop {
        match s.recv().await {
            Ok(collector_message::Msg::Ack(ack)) => {
                assert!(ack.persisted_through >= acked, "acks never go back");
                acked = ack.persisted_through;
            }
            Ok(other) => panic!("expected Ack, got {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(acked < 300, "acked {acked}");
    assert_eq!(
        event_seqs(&records(&out), "node-pipe"),
        (1..=acked).collect::<Vec<_>>(),
        "exactly what was acknowledged is on disk"
    );

    resend_once_space_returns(run, &a, &evs, &ballast, acked).await;
    let recs = records(&out);
    assert_eq!(
        event_seqs(&recs, "node-pipe"),
        (1..=300).collect::<Vec<_>>()
    );
    assert!(findings(&recs).is_empty(), "{:?}", findings(&recs));
    assert!(verify_dir(&out).is_clean());
}

/// The default trust: a node must be enrolled (or pinned). An unknown node
/// is refused after its proof, without learning anything about the
/// collector's state; a second client claiming an enrolled node's id with
/// another key is refused; `--trust tofu` accepts an unknown node and
/// every record of it says so.
#[tokio::test]
async fn only_enrolled_nodes_may_write() {
    let dir = TempDir::new("enrolled").unwrap();
    let run = Running::start(dir_opts(dir.path())).await;
    let mut stranger = Agent::new("node-new");
    let (_, answer) = Stream::prove(run.addr, &stranger).await;
    let st = answer.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    assert!(
        st.message().contains("not enrolled")
            && st
                .message()
                .contains("portcullis collector enroll node-new"),
        "{st:?}"
    );
    let _ = stranger.chain(3);

    let mut a = Agent::new("node-a");
    let (mut s, resume) = Stream::handshake(&run, &a).await;
    assert_eq!(resume, 0);
    assert_eq!(s.batch(&a.chain(4)).await.unwrap(), 4);
    drop(s);
    // Another client with node-a's id and its own key.
    let impostor = Agent::new("node-a");
    let (_, answer) = Stream::prove(run.addr, &impostor).await;
    let st = answer.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    assert!(st.message().contains("enrolled key"), "{st:?}");
    run.stop().await;
    let recs = records(dir.path());
    assert_eq!(event_seqs(&recs, "node-a"), vec![1, 2, 3, 4]);
    assert!(event_seqs(&recs, "node-new").is_empty());
    let report = verify_dir(dir.path());
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.nodes[0].key_source, "collector (enrolled)");
    assert_eq!(report.nodes[0].acknowledged, Some(4));

    // Trust on first use, explicitly.
    let tofu_dir = TempDir::new("tofu").unwrap();
    let mut opts = dir_opts(tofu_dir.path());
    opts.trust = portcullis_collector::TrustMode::Tofu;
    let run = Running::start(opts).await;
    let mut t = Agent::new("node-t");
    let (mut s, answer) = Stream::prove(run.addr, &t).await;
    assert_eq!(answer.unwrap(), 0);
    let evs = t.chain(3);
    assert_eq!(s.batch(&evs).await.unwrap(), 3);
    drop(s);
    run.stop().await;
    let recs = records(tofu_dir.path());
    for r in recs.iter().filter(|r| r["portcullis"]["record"] == "event") {
        assert_eq!(r["portcullis"]["trust"], "tofu", "{r}");
    }
    let report = verify_dir(tofu_dir.path());
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        report.warnings.iter().any(|w| w.kind == "tofu"),
        "{:?}",
        report.warnings
    );
}

/// An unauthenticated peer failing handshakes over and over writes a
/// bounded number of findings (the first, then one with a count per
/// window) and is refused on sight once it keeps failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_failed_handshakes_write_bounded_findings() {
    let dir = TempDir::new("guard").unwrap();
    let mut opts = dir_opts(dir.path());
    opts.guard = portcullis_collector::guard::GuardLimits {
        window: Duration::from_secs(1),
        findings_per_window: 60,
        throttle_after: 20,
    };
    let run = Running::start(opts).await;
    let a = Agent::new("node-a");
    let other = NodeKey::generate().unwrap();
    let mut codes = HashMap::<Code, u32>::new();
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        let mut s = Stream::open(run.addr).await;
        // A refused stream may be closed before the Hello is even sent.
        let _ =
            s.tx.send(AgentMessage {
                msg: Some(Msg::Hello(Hello {
                    protocol: 2,
                    node_id: "node-a".into(),
                    public_key: a.key.public_key().to_vec(),
                })),
            })
            .await;
        let code = match s.recv().await {
            Ok(collector_message::Msg::Welcome(w)) => {
                let _ =
                    s.tx.send(AgentMessage {
                        msg: Some(Msg::Proof(Proof {
                            signature: other
                                .sign(&chain::hello_message("node-a", &w.challenge))
                                .to_vec(),
                        })),
                    })
                    .await;
                s.recv().await.unwrap_err().code()
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(st) => st.code(),
        };
        *codes.entry(code).or_default() += 1;
    }
    let took = started.elapsed();
    assert!(codes[&Code::ResourceExhausted] > 900, "{codes:?}");
    assert!(codes[&Code::Unauthenticated] >= 20, "{codes:?}");
    // Past the window, and stopped (the last window is written at stop).
    let windows = took.as_secs() + 2;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    run.stop().await;
    let recs = records(dir.path());
    let found = findings(&recs);
    assert!(
        !found.is_empty() && found.len() as u64 <= 2 * windows,
        "{} findings for 1000 failures over {took:?}",
        found.len()
    );
    let counted: u64 = recs
        .iter()
        .filter_map(|r| r["portcullis"]["finding"]["message"].as_str())
        .filter_map(|m| m.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        counted + 1,
        u64::from(codes[&Code::Unauthenticated]),
        "every failure is counted once"
    );
}

/// `audit verify` on the collector's directory: records cut from the end
/// at a line boundary are missing; a slice of a rotated file edited and
/// its chain recomputed verifies alone only without authenticity, and
/// fails against the collector's record of the key; the files are 0600 in
/// a 0700 directory.
#[tokio::test]
async fn verify_dir_catches_truncation_and_a_forged_slice() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("forge").unwrap();
    let run = Running::start(rotating_opts(dir.path(), 1)).await;
    let mut a = Agent::new("node-a");
    let mut evs = vec![a.started()];
    for round in 0..6 {
        for i in 0..3 {
            evs.push(a.granted(&format!("user{round}-{i}")));
        }
        evs.push(a.checkpoint());
    }
    let (mut s, _) = Stream::handshake(&run, &a).await;
    for chunk in evs.chunks(5) {
        s.batch(chunk).await.unwrap();
    }
    drop(s);
    run.stop().await;
    let files = store::output_files(dir.path()).unwrap();
    assert!(files.len() >= 3, "{} files", files.len());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700);
    assert_eq!(mode(&dir.path().join("keys")), 0o700);
    for f in files.iter().chain([
        &dir.path().join("state.json"),
        &dir.path().join("acked.log"),
        &dir.path().join("keys/node-a.pub"),
    ]) {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert!(verify_dir(dir.path()).is_clean());

    // Truncation at a line boundary.
    let copy = |tag: &str| {
        let d = TempDir::new(tag).unwrap();
        std::fs::create_dir_all(d.path().join("keys")).unwrap();
        for sub in ["", "keys"] {
            for e in std::fs::read_dir(dir.path().join(sub)).unwrap().flatten() {
                if e.path().is_file() {
                    std::fs::copy(e.path(), d.path().join(sub).join(e.file_name())).unwrap();
                }
            }
        }
        d
    };
    let cut = copy("cut");
    let last = store::output_files(cut.path()).unwrap().pop().unwrap();
    let text = std::fs::read_to_string(&last).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&last, lines[..lines.len() - 2].join("\n") + "\n").unwrap();
    let r = verify_dir(cut.path());
    assert!(
        r.problems
            .iter()
            .any(|p| p.kind == "missing" && p.message.contains("through seq 25")),
        "{:?}",
        r.problems
    );

    // A forged slice: the second file, one admission's identity changed and
    // every later event of the file re-sealed (the attacker has no node
    // key, so the checkpoints keep their old signatures).
    let forged = copy("forged");
    let second = store::output_files(forged.path()).unwrap()[1].clone();
    let recs: Vec<Value> = std::fs::read_to_string(&second)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<portcullis_proto::v1::Event> = recs
        .iter()
        .map(|r| {
            let raw = ocsf::decode_raw(r["portcullis"]["raw"].as_str().unwrap()).unwrap();
            portcullis_proto::v1::Event::decode(raw.as_slice()).unwrap()
        })
        .collect();
    assert!(
        events
            .iter()
            .all(|e| !matches!(e.body, Some(Body::Lifecycle(_)))),
        "a rotated file without the STARTED event"
    );
    let first = &events[0];
    let prev = Head {
        seq: first.seq - 1,
        hash: first.prev_hash.clone().try_into().unwrap(),
    };
    let mut sealer = Sealer::resume("node-a", prev);
    let mut out = String::new();
    for (i, ev) in events.iter().enumerate() {
        let mut body = ev.body.clone().unwrap();
        if i == 1
            && let Body::AdmissionGranted(g) = &mut body
        {
            g.identity = "mallory".into();
        }
        let wall = SystemTime::UNIX_EPOCH + Duration::from_nanos(ev.time_unix_ns as u64);
        let sealed = sealer.seal(body, wall, ev.monotonic_ns);
        out.push_str(&ocsf::event_record(&sealed.bytes).unwrap().to_string());
        out.push('\n');
    }
    std::fs::write(&second, &out).unwrap();
    // Alone and without a key: consistent, but it says its authenticity
    // was not checked (a problem unless --allow-unsigned).
    let alone = verify_files(&VerifyOptions::new(vec![second.clone()])).unwrap();
    assert!(
        alone.problems.iter().all(|p| p.kind == "unauthenticated"),
        "{:?}",
        alone.problems
    );
    assert!(!alone.problems.is_empty());
    // Against the collector's record of the key: the checkpoint fails.
    let r = verify_dir(forged.path());
    assert!(
        r.problems.iter().any(|p| p.kind == "bad_signature"),
        "{:?}",
        r.problems
    );
}
