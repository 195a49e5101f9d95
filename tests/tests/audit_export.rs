//! The exporter against a fake collector whose behaviour each test controls:
//! delivery in order and exactly as bytes, pipelining, resume after
//! disconnects and collector restarts, backoff against an unreachable
//! collector, garbage from the collector (never trims on a bogus ack), TLS
//! and mTLS, and plaintext refused off loopback.

use portcullis_testkit::TempDir;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use portcullis_agent::{
    audit::{
        auditor::{Auditor, StartInfo},
        export,
        export::{Backoff, EventSource, ExportOptions, ExportStatus},
    },
    config::{AuditSection, CollectorTarget, CollectorTls, OnFull},
};
use portcullis_collector::{self, CollectorOptions, Output, store};
use portcullis_e2e::pki::{Ca, Pki};
use portcullis_proto::v1::{
    Accepted, Ack, AgentMessage, CollectorMessage, Event, Gap, Welcome, agent_message,
    collector_message,
    collector_server::{Collector, CollectorServer},
    event::Body,
};
use portcullis_trail::{
    chain,
    chain::{Head, Sealer},
    node_key::NodeKey,
};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tonic::{
    Request, Response, Status, Streaming,
    codegen::tokio_stream::wrappers::ReceiverStream,
    transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming},
};

/// Every bounded wait in this file.
const WAIT: Duration = Duration::from_secs(20);

// ---- the event source ------------------------------------------------------

/// An in-memory spool: sealed events, a durable watch, and a record of every
/// `acknowledged` call.
struct MemSource {
    node_id: String,
    key: Arc<NodeKey>,
    inner: Mutex<MemInner>,
    /// `None` once closed (the auditor stopped).
    durable: Mutex<Option<watch::Sender<u64>>>,
    durable_rx: watch::Receiver<u64>,
}

struct MemInner {
    sealer: Sealer,
    /// seq -> canonical bytes, for events not yet trimmed.
    held: BTreeMap<u64, Vec<u8>>,
    /// Every event ever sealed, in order.
    all: Vec<Vec<u8>>,
    acks: Vec<u64>,
}

impl MemSource {
    fn new(node_id: &str) -> Arc<MemSource> {
        let key = Arc::new(NodeKey::generate().unwrap());
        let (tx, durable_rx) = watch::channel(0);
        Arc::new(MemSource {
            node_id: node_id.to_owned(),
            key,
            inner: Mutex::new(MemInner {
                sealer: Sealer::resume(node_id, Head::EMPTY),
                held: BTreeMap::new(),
                all: Vec::new(),
                acks: Vec::new(),
            }),
            durable: Mutex::new(Some(tx)),
            durable_rx,
        })
    }

    /// Seals `n` events with a `pad`-byte payload each and makes them durable.
    fn append(&self, n: usize, pad: usize) {
        let mut g = self.inner.lock().unwrap();
        let mut last = 0;
        for _ in 0..n {
            let s = g.sealer.seal(
                Body::Gap(Gap {
                    first_seq: 0,
                    last_seq: 0,
                    reason: "x".repeat(pad),
                }),
                SystemTime::now(),
                0,
            );
            last = s.seq;
            g.held.insert(s.seq, s.bytes.clone());
            g.all.push(s.bytes);
        }
        drop(g);
        if let Some(tx) = self.durable.lock().unwrap().as_ref() {
            tx.send_replace(last);
        }
    }

    /// The source stops: no more events will become durable.
    fn close(&self) {
        self.durable.lock().unwrap().take();
    }

    fn all(&self) -> Vec<Vec<u8>> {
        self.inner.lock().unwrap().all.clone()
    }

    fn acks(&self) -> Vec<u64> {
        self.inner.lock().unwrap().acks.clone()
    }

    fn held(&self) -> usize {
        self.inner.lock().unwrap().held.len()
    }
}

impl EventSource for MemSource {
    type Error = std::convert::Infallible;

    fn durable(&self) -> watch::Receiver<u64> {
        self.durable_rx.clone()
    }

    fn read_after(&self, seq: u64, max_events: usize) -> Result<Vec<Vec<u8>>, Self::Error> {
        let g = self.inner.lock().unwrap();
        Ok(g.held
            .range(seq + 1..)
            .take(max_events)
            .map(|(_, b)| b.clone())
            .collect())
    }

    fn acknowledged(&self, seq: u64) {
        let mut g = self.inner.lock().unwrap();
        g.acks.push(seq);
        g.held.retain(|&s, _| s > seq);
    }

    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }
}

// ---- the fake collector ----------------------------------------------------

/// What the fake does on one stream (by session index; `Normal` after the
/// listed ones).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Normal,
    /// Refuse the stream with UNAVAILABLE.
    Refuse,
    /// Ack only after this many batches arrived unacknowledged (proves the
    /// agent pipelines), then normally.
    HoldAcksUntil(usize),
    /// Never ack.
    NeverAck,
    /// Sleep before each ack.
    SlowAck(Duration),
    /// Once this many events are persisted in total, persist the batch but
    /// do not ack it, and drop the stream.
    DropAfter(u64),
    /// Like `DropAfter`, but "crash" losing everything not yet acked.
    CrashAfter(u64),
    /// Send an Ack before the Welcome.
    AckBeforeWelcome,
    /// After the first batch, ack a seq never sent.
    AckUnsent,
    /// After the second batch, ack one below the previous ack.
    AckBackwards,
    /// A second Welcome after the first batch.
    WelcomeTwice,
    /// A Welcome claiming events the node never sealed.
    ResumeAhead,
    /// A Welcome bigger than the agent's decoding limit.
    OversizeWelcome,
}

#[derive(Default)]
struct FakeState {
    modes: Vec<Mode>,
    sessions: usize,
    /// Persisted canonical events, in seq order (index = seq - 1).
    persisted: Vec<Vec<u8>>,
    /// The highest seq acked to the agent.
    acked: u64,
    /// Events received that were already persisted.
    duplicates: u64,
    /// Batches received per session.
    batches: Vec<usize>,
    /// Largest batch (events) seen.
    max_batch: usize,
    proofs_ok: usize,
    errors: Vec<String>,
    /// Refuse (INVALID_ARGUMENT) batches with more events than this, like a
    /// collector configured with a lower limit than the agent.
    batch_limit: Option<usize>,
}

#[derive(Clone)]
struct Fake {
    node_key: [u8; 32],
    state: Arc<Mutex<FakeState>>,
    persisted_tx: Arc<watch::Sender<u64>>,
}

impl Fake {
    fn new(node_key: [u8; 32], modes: &[Mode]) -> Fake {
        Fake {
            node_key,
            state: Arc::new(Mutex::new(FakeState {
                modes: modes.to_vec(),
                ..Default::default()
            })),
            persisted_tx: Arc::new(watch::Sender::new(0)),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    async fn wait_persisted(&self, n: u64) {
        let mut rx = self.persisted_tx.subscribe();
        let done = tokio::time::timeout(WAIT, rx.wait_for(|&p| p >= n))
            .await
            .is_ok();
        if !done {
            panic!(
                "collector persisted {} of {n} events in {WAIT:?}; errors {:?}",
                *rx.borrow(),
                self.st().errors
            );
        }
    }

    async fn serve(
        self,
        mut inbound: Streaming<AgentMessage>,
        tx: mpsc::Sender<Result<CollectorMessage, Status>>,
        mode: Mode,
    ) {
        if let Err(e) = self.serve_inner(&mut inbound, &tx, mode).await {
            self.st().errors.push(e.message().to_owned());
            let _ = tx.send(Err(e)).await;
        }
    }

    async fn serve_inner(
        &self,
        inbound: &mut Streaming<AgentMessage>,
        tx: &mpsc::Sender<Result<CollectorMessage, Status>>,
        mode: Mode,
    ) -> Result<(), Status> {
        let out = |m: collector_message::Msg| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(CollectorMessage { msg: Some(m) }))
                    .await
                    .map_err(|_| Status::cancelled("agent gone"))
            }
        };
        let agent_message::Msg::Hello(hello) = next_msg(inbound).await? else {
            return Err(Status::invalid_argument("expected Hello"));
        };
        if hello.protocol != 2 || hello.public_key != self.node_key {
            return Err(Status::invalid_argument("bad Hello"));
        }
        let resume_after = self.st().persisted.len() as u64;
        if mode == Mode::AckBeforeWelcome {
            out(collector_message::Msg::Ack(Ack {
                persisted_through: resume_after,
            }))
            .await?;
        }
        let challenge: [u8; 32] = ring::rand::generate(&ring::rand::SystemRandom::new())
            .unwrap()
            .expose();
        match mode {
            Mode::OversizeWelcome => {
                out(collector_message::Msg::Welcome(Welcome {
                    challenge: vec![7; 200 * 1024],
                }))
                .await?
            }
            _ => {
                out(collector_message::Msg::Welcome(Welcome {
                    challenge: challenge.to_vec(),
                }))
                .await?
            }
        }
        let agent_message::Msg::Proof(proof) = next_msg(inbound).await? else {
            return Err(Status::invalid_argument("expected Proof"));
        };
        if !chain::verify_signature(
            &self.node_key,
            &chain::hello_message(&hello.node_id, &challenge),
            &proof.signature,
        ) {
            return Err(Status::unauthenticated("bad proof"));
        }
        self.st().proofs_ok += 1;
        // What the collector holds, said only after the proof.
        let resume = if mode == Mode::ResumeAhead {
            resume_after + 1_000_000
        } else {
            resume_after
        };
        out(collector_message::Msg::Accepted(Accepted {
            resume_after: resume,
            trust: "enrolled".into(),
        }))
        .await?;

        let mut batches = 0usize;
        loop {
            let agent_message::Msg::Batch(batch) = next_msg(inbound).await? else {
                return Err(Status::invalid_argument("expected EventBatch"));
            };
            batches += 1;
            if let Some(limit) = self.st().batch_limit
                && batch.events.len() > limit
            {
                return Err(Status::invalid_argument(format!(
                    "a batch of {} events is over the limit of {limit}",
                    batch.events.len()
                )));
            }
            let persisted = {
                let mut st = self.st();
                let idx = st.batches.len() - 1;
                st.batches[idx] += 1;
                st.max_batch = st.max_batch.max(batch.events.len());
                for bytes in batch.events {
                    let seq = Event::decode(bytes.as_slice()).unwrap().seq;
                    let have = st.persisted.len() as u64;
                    if seq <= have {
                        assert_eq!(st.persisted[seq as usize - 1], bytes, "resent bytes differ");
                        st.duplicates += 1;
                    } else if seq == have + 1 {
                        st.persisted.push(bytes);
                    } else {
                        return Err(Status::data_loss(format!("gap: {seq} after {have}")));
                    }
                }
                st.persisted.len() as u64
            };
            self.persisted_tx.send_replace(persisted);
            match mode {
                Mode::NeverAck => continue,
                Mode::HoldAcksUntil(n) if batches < n => continue,
                Mode::SlowAck(d) => tokio::time::sleep(d).await,
                Mode::DropAfter(k) if persisted >= k => {
                    return Err(Status::unavailable("dropping the stream"));
                }
                Mode::CrashAfter(k) if persisted >= k => {
                    let mut st = self.st();
                    let acked = st.acked as usize;
                    st.persisted.truncate(acked);
                    return Err(Status::unavailable("crashed"));
                }
                Mode::AckUnsent if batches == 1 => {
                    out(collector_message::Msg::Ack(Ack {
                        persisted_through: persisted + 1000,
                    }))
                    .await?;
                    continue;
                }
                Mode::AckBackwards if batches == 2 => {
                    let acked = self.st().acked;
                    out(collector_message::Msg::Ack(Ack {
                        persisted_through: acked - 1,
                    }))
                    .await?;
                    continue;
                }
                Mode::WelcomeTwice if batches == 1 => {
                    out(collector_message::Msg::Welcome(Welcome {
                        challenge: challenge.to_vec(),
                    }))
                    .await?;
                    continue;
                }
                _ => {}
            }
            self.st().acked = persisted;
            out(collector_message::Msg::Ack(Ack {
                persisted_through: persisted,
            }))
            .await?;
        }
    }
}

async fn next_msg(inbound: &mut Streaming<AgentMessage>) -> Result<agent_message::Msg, Status> {
    inbound
        .message()
        .await?
        .and_then(|m| m.msg)
        .ok_or_else(|| Status::cancelled("agent closed"))
}

#[tonic::async_trait]
impl Collector for Fake {
    type StreamStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mode = {
            let mut st = self.st();
            let i = st.sessions;
            st.sessions += 1;
            st.batches.push(0);
            st.modes.get(i).copied().unwrap_or(Mode::Normal)
        };
        if mode == Mode::Refuse {
            return Err(Status::unavailable("refusing"));
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().serve(req.into_inner(), tx, mode));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A collector server on its own runtime, so dropping it ends every
/// connection at once, like a process exit.
struct ServerHandle {
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl ServerHandle {
    fn start(fake: &Fake, addr: SocketAddr, tls: Option<ServerTlsConfig>) -> ServerHandle {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let fake = fake.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            // The previous server's port may take a moment to be free.
            let mut tries = 0;
            let incoming = loop {
                match TcpIncoming::bind(addr) {
                    Ok(i) => break i,
                    Err(e) if tries < 100 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            };
            addr_tx.send(incoming.local_addr().unwrap()).unwrap();
            let mut b = Server::builder();
            if let Some(tls) = tls {
                b = b.tls_config(tls).unwrap();
            }
            b.serve_with_incoming(CollectorServer::new(fake), incoming)
                .await
                .unwrap();
        });
        let addr = addr_rx.recv_timeout(WAIT).expect("server bound");
        ServerHandle { rt: Some(rt), addr }
    }

    fn local(fake: &Fake) -> ServerHandle {
        Self::start(fake, "127.0.0.1:0".parse().unwrap(), None)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

// ---- the exporter under test -----------------------------------------------

fn fast() -> ExportOptions {
    ExportOptions {
        backoff: Backoff {
            floor: Duration::from_millis(10),
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
        },
        healthy_after: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        ack_timeout: Duration::from_secs(10),
        window_batches: 8,
        batch_bytes: 1 << 20,
        keepalive: Duration::from_secs(30),
    }
}

fn plain(addr: SocketAddr, batch_max_events: usize) -> CollectorTarget {
    CollectorTarget {
        endpoint: format!("http://{addr}"),
        tls: None,
        allow_plaintext: false,
        batch_max_events,
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    status: Arc<ExportStatus>,
}

impl Running {
    fn start(src: &Arc<MemSource>, target: CollectorTarget, opts: ExportOptions) -> Running {
        let (stop, stop_rx) = watch::channel(false);
        let status = ExportStatus::new();
        let task = tokio::spawn(export::run_with(
            Arc::clone(src),
            Arc::clone(&src.key),
            target,
            stop_rx,
            Arc::clone(&status),
            opts,
        ));
        Running { stop, task, status }
    }

    /// Requests shutdown and waits (bounded) for the task to end.
    async fn stop(self) -> export::ExportSnapshot {
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("exporter stops on shutdown")
            .unwrap();
        self.status.snapshot()
    }

    async fn wait_until(&self, what: &str, f: impl Fn(&export::ExportSnapshot) -> bool) {
        let start = Instant::now();
        loop {
            let s = self.status.snapshot();
            if f(&s) {
                return;
            }
            assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}: {s:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The acks the source saw only ever go up, and end at `last`.
fn assert_acks_monotonic(acks: &[u64], last: u64) {
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "acks {acks:?}");
    assert_eq!(acks.last().copied(), Some(last), "acks {acks:?}");
}

fn assert_delivered_exactly(fake: &Fake, src: &MemSource) {
    let st = fake.st();
    let all = src.all();
    assert_eq!(st.persisted.len(), all.len());
    assert!(
        st.persisted == all,
        "persisted bytes differ from the sealed events"
    );
}

// ---- tests -------------------------------------------------------------------

#[tokio::test]
async fn delivers_every_event_in_order_exactly_as_sealed_and_trims_on_acks() {
    let src = MemSource::new("node-a");
    src.append(1000, 16);
    let fake = Fake::new(src.public_key(), &[]);
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 64), fast());
    fake.wait_persisted(1000).await;
    // Events sealed while connected follow without a reconnect.
    src.append(500, 16);
    fake.wait_persisted(1500).await;
    run.wait_until("acked", |s| s.acked_seq == 1500).await;
    let snap = run.stop().await;
    assert_delivered_exactly(&fake, &src);
    let st = fake.st();
    assert_eq!(st.duplicates, 0);
    assert_eq!(st.sessions, 1);
    assert_eq!(st.proofs_ok, 1);
    assert!(st.max_batch <= 64 && st.max_batch > 1, "{}", st.max_batch);
    assert_acks_monotonic(&src.acks(), 1500);
    assert_eq!(src.held(), 0, "everything acknowledged is trimmed");
    assert_eq!(
        (snap.sent_seq, snap.acked_seq, snap.failures),
        (1500, 1500, 0)
    );
    assert!(!snap.connected);
}

#[tokio::test]
async fn batches_are_bounded_by_bytes_as_well_as_count() {
    let src = MemSource::new("node-bytes");
    src.append(40, 10_000);
    let fake = Fake::new(src.public_key(), &[]);
    let server = ServerHandle::local(&fake);
    let mut opts = fast();
    opts.batch_bytes = 50_000;
    let run = Running::start(&src, plain(server.addr, 4096), opts);
    fake.wait_persisted(40).await;
    run.stop().await;
    assert_delivered_exactly(&fake, &src);
    let st = fake.st();
    assert!(
        st.max_batch <= 4,
        "{} events of 10 kB in one batch",
        st.max_batch
    );
    assert!(st.batches[0] >= 10);
}

#[tokio::test]
async fn batches_shrink_when_the_collector_refuses_them_as_too_large() {
    let src = MemSource::new("node-shrink");
    src.append(500, 8);
    let fake = Fake::new(src.public_key(), &[]);
    fake.st().batch_limit = Some(10);
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 64), fast());
    fake.wait_persisted(500).await;
    run.wait_until("acked", |s| s.acked_seq == 500).await;
    let snap = run.stop().await;
    // 64 -> 32 -> 16 -> 8: three refusals, then everything fits.
    assert_eq!((snap.batch_events, snap.failures), (8, 3), "{snap:?}");
    assert_eq!(snap.protocol_errors, 0);
    assert_delivered_exactly(&fake, &src);
    assert_acks_monotonic(&src.acks(), 500);
}

#[tokio::test]
async fn keeps_several_batches_in_flight() {
    // The fake acks nothing until three batches arrived: an exporter that
    // waited for each ack before the next batch would never get there.
    let src = MemSource::new("node-window");
    src.append(100, 8);
    let fake = Fake::new(src.public_key(), &[Mode::HoldAcksUntil(3)]);
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 10), fast());
    fake.wait_persisted(100).await;
    run.wait_until("all acked", |s| s.acked_seq == 100).await;
    let snap = run.stop().await;
    assert_eq!(snap.failures, 0, "{snap:?}");
    assert_eq!(fake.st().sessions, 1);
}

#[tokio::test]
async fn a_stalled_collector_sees_at_most_the_window_then_a_new_stream() {
    let src = MemSource::new("node-stall");
    src.append(200, 8);
    let fake = Fake::new(src.public_key(), &[Mode::NeverAck]);
    let server = ServerHandle::local(&fake);
    let mut opts = fast();
    opts.window_batches = 3;
    opts.ack_timeout = Duration::from_millis(300);
    let run = Running::start(&src, plain(server.addr, 10), opts);
    fake.wait_persisted(200).await;
    run.wait_until("all acked", |s| s.acked_seq == 200).await;
    let snap = run.stop().await;
    let st = fake.st();
    assert_eq!(st.batches[0], 3, "window of 3 batches, then silence");
    assert_eq!(
        st.duplicates, 0,
        "the second stream resumed after what was persisted"
    );
    assert!(snap.failures >= 1, "{snap:?}");
    assert!(
        snap.last_error.as_deref().unwrap_or("").contains("stalled"),
        "{snap:?}"
    );
    assert_acks_monotonic(&src.acks(), 200);
}

#[tokio::test]
async fn slow_acks_still_deliver_everything() {
    let src = MemSource::new("node-slow");
    src.append(300, 8);
    let fake = Fake::new(
        src.public_key(),
        &[Mode::SlowAck(Duration::from_millis(20))],
    );
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 25), fast());
    run.wait_until("all acked", |s| s.acked_seq == 300).await;
    let snap = run.stop().await;
    assert_eq!(snap.failures, 0);
    assert_delivered_exactly(&fake, &src);
    assert_acks_monotonic(&src.acks(), 300);
}

#[tokio::test]
async fn resumes_after_a_dropped_stream_from_what_the_collector_holds() {
    let src = MemSource::new("node-drop");
    src.append(1000, 8);
    let fake = Fake::new(
        src.public_key(),
        &[Mode::DropAfter(300), Mode::DropAfter(700)],
    );
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 50), fast());
    fake.wait_persisted(1000).await;
    run.wait_until("all acked", |s| s.acked_seq == 1000).await;
    let snap = run.stop().await;
    assert_delivered_exactly(&fake, &src);
    let st = fake.st();
    assert_eq!(st.sessions, 3);
    assert_eq!(
        st.duplicates, 0,
        "events the collector held were not re-sent"
    );
    assert_eq!(snap.failures, 2);
    assert_eq!(snap.reconnects, 2);
    assert_eq!(snap.protocol_errors, 0);
    assert_acks_monotonic(&src.acks(), 1000);
}

#[tokio::test]
async fn resends_what_a_crashed_collector_lost() {
    // The collector loses everything it had not acknowledged: those events
    // must still be in the spool and go again.
    let src = MemSource::new("node-crash");
    src.append(600, 8);
    let fake = Fake::new(src.public_key(), &[Mode::CrashAfter(250)]);
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 50), fast());
    run.wait_until("all acked", |s| s.acked_seq == 600).await;
    run.stop().await;
    assert_delivered_exactly(&fake, &src);
    assert_eq!(fake.st().sessions, 2);
    assert_acks_monotonic(&src.acks(), 600);
}

#[tokio::test]
async fn a_restarted_collector_on_the_same_port_gets_the_rest() {
    let src = MemSource::new("node-restart");
    src.append(400, 8);
    let fake = Fake::new(src.public_key(), &[]);
    let server = ServerHandle::local(&fake);
    let addr = server.addr;
    let run = Running::start(&src, plain(addr, 50), fast());
    fake.wait_persisted(400).await;
    run.wait_until("acked", |s| s.acked_seq == 400).await;
    // The collector process goes away; events keep being sealed.
    drop(server);
    src.append(400, 8);
    run.wait_until("noticed", |s| s.failures >= 1).await;
    let server = ServerHandle::start(&fake, addr, None);
    fake.wait_persisted(800).await;
    run.wait_until("acked", |s| s.acked_seq == 800).await;
    let snap = run.stop().await;
    drop(server);
    assert_delivered_exactly(&fake, &src);
    assert_eq!(fake.st().duplicates, 0);
    assert!(snap.sessions >= 2, "{snap:?}");
    assert_acks_monotonic(&src.acks(), 800);
}

#[tokio::test]
async fn a_refusing_collector_is_retried_with_backoff() {
    let src = MemSource::new("node-refuse");
    src.append(10, 8);
    let fake = Fake::new(
        src.public_key(),
        &[Mode::Refuse, Mode::Refuse, Mode::Refuse],
    );
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 50), fast());
    fake.wait_persisted(10).await;
    run.wait_until("acked", |s| s.acked_seq == 10).await;
    let snap = run.stop().await;
    assert_eq!(fake.st().sessions, 4);
    assert_eq!((snap.failures, snap.reconnects, snap.sessions), (3, 3, 1));
    assert_eq!(src.acks(), vec![10]);
}

#[tokio::test]
async fn an_unreachable_collector_is_retried_at_a_bounded_rate() {
    // A port nothing listens on: connections are refused at once, so the
    // backoff alone paces the attempts.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let src = MemSource::new("node-unreachable");
    src.append(5, 8);
    let mut opts = fast();
    opts.backoff = Backoff {
        floor: Duration::from_millis(20),
        base: Duration::from_millis(10),
        cap: Duration::from_millis(80),
    };
    let floor = opts.backoff.floor;
    let start = Instant::now();
    let run = Running::start(&src, plain(addr, 50), opts);
    run.wait_until("8 attempts failed", |s| s.failures >= 8)
        .await;
    let elapsed = start.elapsed();
    let snap = run.stop().await;
    // 7 waits of at least the floor each lie between 8 failures.
    assert!(elapsed >= floor * 7, "{elapsed:?} for {snap:?}");
    assert!(snap.last_backoff_ms <= 100, "{snap:?}");
    assert_eq!(snap.sessions, 0);
    assert!(
        src.acks().is_empty(),
        "nothing acknowledged, nothing trimmed"
    );
    assert_eq!(src.held(), 5);
    let err = snap.last_error.unwrap();
    assert!(err.contains("connecting"), "{err}");
}

#[test]
fn backoff_schedule_grows_then_caps() {
    let b = Backoff::default();
    let mut prev = Duration::ZERO;
    for n in 0..12 {
        let c = b.ceiling(n);
        assert!(c >= prev && c <= b.cap);
        prev = c;
        assert_eq!(b.delay(n, 0), b.floor);
        assert_eq!(b.delay(n, u64::MAX).max(b.floor + c), b.floor + c);
    }
    assert_eq!(b.ceiling(11), b.cap);
    let rng = ring::rand::SystemRandom::new();
    let a: Vec<_> = (0..20).map(|_| b.next_delay(10, &rng)).collect();
    assert!(a.iter().any(|d| *d != a[0]), "jittered: {a:?}");
}

/// Runs one garbage mode first, then a normal stream; checks the garbage
/// was counted as a protocol error, trimmed nothing bogus, and everything
/// arrived.
async fn garbage_then_recovery(mode: Mode, expect: &str) {
    let src = MemSource::new("node-garbage");
    src.append(100, 8);
    let fake = Fake::new(src.public_key(), &[mode]);
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 10), fast());
    fake.wait_persisted(100).await;
    run.wait_until("all acked", |s| s.acked_seq == 100).await;
    let snap = run.stop().await;
    assert_eq!(snap.protocol_errors, 1, "{mode:?}: {snap:?}");
    let err = snap.last_error.unwrap_or_default();
    assert!(err.contains(expect), "{mode:?}: {err}");
    assert_delivered_exactly(&fake, &src);
    let acks = src.acks();
    assert!(
        acks.iter().all(|&a| a <= 100),
        "{mode:?}: trimmed on a bogus ack: {acks:?}"
    );
    assert_acks_monotonic(&acks, 100);
}

#[tokio::test]
async fn an_ack_before_welcome_is_a_protocol_error() {
    garbage_then_recovery(Mode::AckBeforeWelcome, "before Welcome").await;
}

#[tokio::test]
async fn an_ack_for_an_unsent_seq_never_trims() {
    garbage_then_recovery(Mode::AckUnsent, "only events through").await;
}

#[tokio::test]
async fn an_ack_going_backwards_is_a_protocol_error() {
    garbage_then_recovery(Mode::AckBackwards, "backwards").await;
}

#[tokio::test]
async fn a_second_welcome_is_a_protocol_error() {
    garbage_then_recovery(Mode::WelcomeTwice, "second Welcome").await;
}

#[tokio::test]
async fn a_welcome_claiming_unsealed_events_is_a_protocol_error() {
    garbage_then_recovery(Mode::ResumeAhead, "sealed only through").await;
}

#[tokio::test]
async fn an_oversize_message_is_a_protocol_error() {
    garbage_then_recovery(Mode::OversizeWelcome, "oversize").await;
}

#[tokio::test]
async fn plaintext_to_a_non_loopback_address_is_refused_at_connect_time() {
    // The config check would refuse this; the exporter checks again on the
    // resolved address and never connects.
    let src = MemSource::new("node-plain");
    src.append(3, 8);
    let target = CollectorTarget {
        endpoint: "http://192.0.2.1:7000".into(),
        tls: None,
        allow_plaintext: false,
        batch_max_events: 10,
    };
    let run = Running::start(&src, target, fast());
    run.wait_until("refused", |s| s.failures >= 2).await;
    let snap = run.stop().await;
    let err = snap.last_error.unwrap();
    assert!(
        err.contains("refusing to send audit events unencrypted"),
        "{err}"
    );
    assert!(err.contains("192.0.2.1"), "{err}");
    assert_eq!(snap.sessions, 0);
}

#[tokio::test]
async fn localhost_resolves_to_loopback_and_is_allowed() {
    let src = MemSource::new("node-localhost");
    src.append(20, 8);
    let fake = Fake::new(src.public_key(), &[]);
    let server = ServerHandle::local(&fake);
    let target = CollectorTarget {
        endpoint: format!("http://localhost:{}", server.addr.port()),
        tls: None,
        allow_plaintext: false,
        batch_max_events: 10,
    };
    let run = Running::start(&src, target, fast());
    fake.wait_persisted(20).await;
    run.stop().await;
    assert_delivered_exactly(&fake, &src);
}

#[tokio::test]
async fn shutdown_while_unreachable_returns_promptly() {
    let src = MemSource::new("node-shutdown");
    src.append(1, 8);
    let mut opts = fast();
    opts.backoff = Backoff {
        floor: Duration::from_secs(3600),
        base: Duration::from_secs(1),
        cap: Duration::from_secs(1),
    };
    let target = plain("127.0.0.1:1".parse().unwrap(), 10);
    let run = Running::start(&src, target, opts);
    run.wait_until("first failure", |s| s.failures >= 1).await;
    let start = Instant::now();
    run.stop().await;
    assert!(start.elapsed() < Duration::from_secs(5));
}

// ---- TLS ---------------------------------------------------------------------

fn server_tls(ca: &Ca, names: &[&str], client_ca: Option<&Ca>) -> ServerTlsConfig {
    let (cert, key) = ca.leaf(names, false);
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(cca) = client_ca {
        cfg = cfg.client_ca_root(Certificate::from_pem(cca.pem()));
    }
    cfg
}

fn tls_target(addr: SocketAddr, ca_file: PathBuf, server_name: Option<&str>) -> CollectorTarget {
    CollectorTarget {
        endpoint: format!("https://{addr}"),
        tls: Some(CollectorTls {
            ca_file,
            server_name: server_name.map(str::to_owned),
            client_cert: None,
            client_key: None,
        }),
        allow_plaintext: false,
        batch_max_events: 10,
    }
}

/// Runs against a TLS collector and expects every attempt to fail before
/// the stream opens.
async fn expect_tls_failure(src: &Arc<MemSource>, fake: &Fake, target: CollectorTarget) -> String {
    let run = Running::start(src, target, fast());
    run.wait_until("two failed attempts", |s| s.failures >= 2)
        .await;
    let snap = run.stop().await;
    assert_eq!(snap.sessions, 0, "{snap:?}");
    assert_eq!(fake.st().proofs_ok, 0);
    assert!(src.acks().is_empty());
    snap.last_error.unwrap()
}

#[tokio::test]
async fn tls_with_the_right_ca_and_name_delivers() {
    let pki = Pki::new("tls-ok");
    let ca = Ca::new("portcullis test ca");
    let ca_file = pki.write("ca.pem", &ca.pem());
    let src = MemSource::new("node-tls");
    src.append(50, 8);
    let fake = Fake::new(src.public_key(), &[]);
    let server = ServerHandle::start(
        &fake,
        "127.0.0.1:0".parse().unwrap(),
        Some(server_tls(&ca, &["collector.test"], None)),
    );
    let run = Running::start(
        &src,
        tls_target(server.addr, ca_file, Some("collector.test")),
        fast(),
    );
    fake.wait_persisted(50).await;
    run.wait_until("acked", |s| s.acked_seq == 50).await;
    run.stop().await;
    assert_delivered_exactly(&fake, &src);
}

#[tokio::test]
async fn tls_with_a_wrong_ca_or_a_wrong_name_fails() {
    let pki = Pki::new("tls-bad");
    let ca = Ca::new("portcullis test ca");
    let other = Ca::new("someone else's ca");
    let ca_file = pki.write("ca.pem", &ca.pem());
    let other_file = pki.write("other.pem", &other.pem());
    let garbage = pki.write("garbage.pem", "not a certificate\n");
    let src = MemSource::new("node-tls-bad");
    src.append(5, 8);
    let fake = Fake::new(src.public_key(), &[]);
    let server = ServerHandle::start(
        &fake,
        "127.0.0.1:0".parse().unwrap(),
        Some(server_tls(&ca, &["collector.test"], None)),
    );
    let err = expect_tls_failure(
        &src,
        &fake,
        tls_target(server.addr, other_file, Some("collector.test")),
    )
    .await;
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = expect_tls_failure(
        &src,
        &fake,
        tls_target(server.addr, ca_file.clone(), Some("other.test")),
    )
    .await;
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Without an override the name checked is the endpoint's host (an IP
    // the certificate does not carry).
    let err = expect_tls_failure(&src, &fake, tls_target(server.addr, ca_file, None)).await;
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let err = expect_tls_failure(
        &src,
        &fake,
        tls_target(server.addr, garbage, Some("collector.test")),
    )
    .await;
    assert!(err.contains("no PEM CERTIFICATE"), "{err}");
    assert_eq!(
        fake.st().sessions,
        0,
        "no stream ever reached the collector"
    );
}

#[tokio::test]
async fn mtls_presents_the_client_certificate() {
    let pki = Pki::new("mtls");
    let ca = Ca::new("portcullis test ca");
    let clients = Ca::new("portcullis agents ca");
    let ca_file = pki.write("ca.pem", &ca.pem());
    let (ccert, ckey) = clients.leaf(&["node-mtls"], true);
    let cert_file = pki.write("client.pem", &ccert);
    let key_file = pki.write("client.key", &ckey);
    let src = MemSource::new("node-mtls");
    src.append(20, 8);
    let fake = Fake::new(src.public_key(), &[]);
    let server = ServerHandle::start(
        &fake,
        "127.0.0.1:0".parse().unwrap(),
        Some(server_tls(&ca, &["collector.test"], Some(&clients))),
    );
    // Without a client certificate the collector refuses the handshake.
    let no_identity = tls_target(server.addr, ca_file.clone(), Some("collector.test"));
    expect_tls_failure(&src, &fake, no_identity.clone()).await;
    let mut with_identity = no_identity;
    if let Some(tls) = with_identity.tls.as_mut() {
        tls.client_cert = Some(cert_file);
        tls.client_key = Some(key_file);
    }
    let run = Running::start(&src, with_identity, fast());
    fake.wait_persisted(20).await;
    run.wait_until("acked", |s| s.acked_seq == 20).await;
    run.stop().await;
    assert_delivered_exactly(&fake, &src);
}

// ---- draining at stop ----------------------------------------------------------

#[tokio::test]
async fn a_closed_source_is_drained_and_acknowledged_before_the_exporter_ends() {
    let src = MemSource::new("node-drain");
    src.append(300, 8);
    let fake = Fake::new(src.public_key(), &[Mode::SlowAck(Duration::from_millis(5))]);
    let server = ServerHandle::local(&fake);
    let run = Running::start(&src, plain(server.addr, 20), fast());
    src.close();
    // No shutdown signal: the exporter ends by itself once all 300 are acked.
    tokio::time::timeout(WAIT, run.task)
        .await
        .expect("exporter ends after draining a closed source")
        .unwrap();
    let snap = run.status.snapshot();
    assert_eq!(snap.acked_seq, 300, "{snap:?}");
    assert_delivered_exactly(&fake, &src);
    assert_eq!(src.held(), 0);
}

// ---- the real auditor and the real collector -------------------------------------

/// The real collector serving `dir` on `addr` until `stop`.
struct RealCollector {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RealCollector {
    async fn start(dir: &std::path::Path, addr: SocketAddr) -> RealCollector {
        Self::start_tls(dir, addr, None).await
    }

    async fn start_tls(
        dir: &std::path::Path,
        addr: SocketAddr,
        tls: Option<portcullis_collector::TlsFiles>,
    ) -> RealCollector {
        Self::start_with(dir, addr, tls, false).await
    }

    async fn start_with(
        dir: &std::path::Path,
        addr: SocketAddr,
        tls: Option<portcullis_collector::TlsFiles>,
        node_id_from_cert: bool,
    ) -> RealCollector {
        let mut opts = CollectorOptions::new(Output::Dir {
            dir: dir.to_owned(),
            rotate_bytes: store::DEFAULT_ROTATE_BYTES,
        });
        opts.node_id_from_cert = node_id_from_cert;
        let c = portcullis_collector::Collector::open(opts).unwrap();
        let start = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if start.elapsed() < WAIT => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            c.serve(listener, tls.as_ref(), async {
                let _ = rx.await;
            })
            .await
        });
        RealCollector {
            addr,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("collector stops")
            .unwrap()
            .unwrap();
    }
}

fn control_call(i: u64) -> Body {
    Body::ControlCall(portcullis_proto::v1::ControlCall {
        caller: "test".into(),
        role: "operator".into(),
        method: "Stats".into(),
        request: format!("#{i}"),
        allowed: true,
        outcome: "ok".into(),
    })
}

/// (seq -> raw canonical bytes) of every event record the collector wrote,
/// counting repeats, and the finding records.
fn collector_output(
    dir: &std::path::Path,
    node: &str,
) -> (BTreeMap<u64, Vec<Vec<u8>>>, Vec<String>) {
    let mut events: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut findings = Vec::new();
    for file in store::output_files(dir).unwrap() {
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            match store::record_head(&v) {
                Some((n, head)) if n == node => {
                    let raw = v["portcullis"]["raw"]
                        .as_str()
                        .expect("raw bytes in the record");
                    events
                        .entry(head.seq)
                        .or_default()
                        .push(portcullis_trail::ocsf::decode_raw(raw).unwrap());
                }
                Some(_) => {}
                None => findings.push(line.to_owned()),
            }
        }
    }
    (events, findings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_auditor_to_real_collector_every_seq_exactly_once_across_a_collector_restart() {
    let tmp = TempDir::new("real").unwrap();
    let out = tmp.path().join("collector");
    std::fs::create_dir_all(&out).unwrap();
    let node = "node-real";
    let key = Arc::new(NodeKey::generate().unwrap());
    let cfg = AuditSection {
        spool_dir: tmp.path().join("spool"),
        spool_max_bytes: 256 << 20,
        segment_bytes: 256 << 10,
        on_full: OnFull::RefuseAdmissions,
        checkpoint_events: 1000,
        checkpoint_interval: Duration::from_secs(3600),
        report_interval: Duration::from_secs(3600),
        collector: None,
    };
    let (auditor, writer) = Auditor::open(
        &cfg,
        node,
        Arc::clone(&key),
        StartInfo {
            agent_version: "test".into(),
            policy_version: "p".into(),
            reason: "start".into(),
            ..StartInfo::default()
        },
    )
    .unwrap();
    let writer = tokio::spawn(writer.run());

    portcullis_collector::enroll::enroll(&out.join("keys"), node, key.public_key(), false).unwrap();
    let first = RealCollector::start(&out, "127.0.0.1:0".parse().unwrap()).await;
    let addr = first.addr;
    let (stop_tx, stop_rx) = watch::channel(false);
    let status = ExportStatus::new();
    let exporter = tokio::spawn(export::run_with(
        Arc::new(auditor.clone()),
        Arc::clone(&key),
        plain(addr, 256),
        stop_rx,
        Arc::clone(&status),
        fast(),
    ));
    let wait_acked = |through: u64| {
        let status = Arc::clone(&status);
        async move {
            let start = Instant::now();
            while status.snapshot().acked_seq < through {
                assert!(
                    start.elapsed() < WAIT,
                    "acked {:?} of {through}",
                    status.snapshot()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // 10k events; the collector restarts while a backlog is in flight.
    let mut last = 0;
    for i in 0..5_000u64 {
        if i % 500 == 499 {
            last = auditor.record_durable(control_call(i)).await.unwrap();
        } else {
            auditor.record(control_call(i)).unwrap();
        }
    }
    wait_acked(last / 3).await;
    first.stop().await;
    for i in 5_000..10_000u64 {
        if i % 500 == 499 {
            last = auditor.record_durable(control_call(i)).await.unwrap();
        } else {
            auditor.record(control_call(i)).unwrap();
        }
    }
    let second = RealCollector::start(&out, addr).await;
    wait_acked(last).await;

    // Agent stop: the auditor writes STOPPING and a checkpoint; the exporter
    // delivers them and ends by itself.
    auditor.clone().shutdown("test stop").await.unwrap();
    tokio::time::timeout(WAIT, exporter)
        .await
        .expect("exporter drains and ends after the auditor stops")
        .unwrap();
    let _ = stop_tx.send(true);
    tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
    let stats = auditor.stats();
    let snap = status.snapshot();
    second.stop().await;

    assert!(stats.durable_seq > 10_000, "{stats:?}");
    assert_eq!(snap.acked_seq, stats.durable_seq, "{snap:?} {stats:?}");
    assert!(snap.sessions >= 2 && snap.failures >= 1, "{snap:?}");
    let (events, findings) = collector_output(&out, node);
    assert!(findings.is_empty(), "findings: {findings:#?}");
    let seqs: Vec<u64> = events.keys().copied().collect();
    let expect: Vec<u64> = (1..=stats.durable_seq).collect();
    assert!(
        seqs == expect,
        "collector has {} seqs, {}..={}",
        seqs.len(),
        seqs[0],
        seqs[seqs.len() - 1]
    );
    let repeated: Vec<_> = events
        .iter()
        .filter(|(_, v)| v.len() != 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(
        repeated.is_empty(),
        "seqs written more than once: {repeated:?}"
    );
    // The bytes are the canonical encodings, chained.
    let mut prev = chain::GENESIS;
    for (seq, v) in &events {
        let ev = Event::decode(v[0].as_slice()).unwrap();
        assert_eq!((ev.seq, ev.prev_hash.as_slice()), (*seq, &prev[..]));
        prev = chain::event_hash(&v[0]);
    }
}

/// The collector's own TLS settings (`--tls-cert/--tls-key/--client-ca`):
/// an agent with the collector's CA and a client certificate from the
/// agents' CA delivers; one without a client certificate is refused before
/// anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_collector_over_mtls() {
    let pki = Pki::new("real-mtls");
    let ca = Ca::new("collector ca");
    let agents = Ca::new("agents ca");
    let (cert, key) = ca.leaf(&["collector.test"], false);
    let (ccert, ckey) = agents.leaf(&["node-tls"], true);
    let tls = portcullis_collector::TlsFiles {
        cert: pki.write("collector.pem", &cert),
        key: pki.write("collector.key", &key),
        client_ca: Some(pki.write("agents-ca.pem", &agents.pem())),
    };
    let out = pki.dir().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let server =
        RealCollector::start_with(&out, "127.0.0.1:0".parse().unwrap(), Some(tls), true).await;

    let src = MemSource::new("node-tls");
    portcullis_collector::enroll::enroll(&out.join("keys"), "node-tls", src.public_key(), false)
        .unwrap();
    src.append(50, 8);
    let no_cert = tls_target(
        server.addr,
        pki.write("ca.pem", &ca.pem()),
        Some("collector.test"),
    );
    let run = Running::start(&src, no_cert.clone(), fast());
    run.wait_until("two refused attempts", |s| s.failures >= 2)
        .await;
    let snap = run.stop().await;
    assert_eq!(snap.acked_seq, 0, "{snap:?}");
    assert!(collector_output(&out, "node-tls").0.is_empty());

    let mut with_cert = no_cert;
    if let Some(t) = with_cert.tls.as_mut() {
        t.client_cert = Some(pki.write("agent.pem", &ccert));
        t.client_key = Some(pki.write("agent.key", &ckey));
    }
    // Bound to its certificate (--node-id-from-cert): another enrolled
    // node with node-tls's certificate is refused.
    let evil = MemSource::new("node-evil");
    evil.append(5, 8);
    portcullis_collector::enroll::enroll(&out.join("keys"), "node-evil", evil.public_key(), false)
        .unwrap();
    let run = Running::start(&evil, with_cert.clone(), fast());
    run.wait_until("refused: the certificate names node-tls", |s| {
        s.failures >= 1
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("does not name node node-evil"))
    })
    .await;
    let snap = run.stop().await;
    assert_eq!(snap.acked_seq, 0, "{snap:?}");

    let run = Running::start(&src, with_cert, fast());
    run.wait_until("all acked", |s| s.acked_seq == 50).await;
    run.stop().await;
    server.stop().await;
    assert!(collector_output(&out, "node-evil").0.is_empty());
    let (events, findings) = collector_output(&out, "node-tls");
    // The refused attempts are on record (bounded), none about node-tls's
    // own events.
    assert!(
        findings.iter().all(|f| !f.contains("node-tls seq")),
        "{findings:#?}"
    );
    assert_eq!(
        events.keys().copied().collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
}
