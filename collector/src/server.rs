//! The gRPC `Collector` service.
//!
//! Per stream: the first message must be `Hello` (protocol 2, a valid node
//! id, a 32-byte key; with `--node-id-from-cert`, the node id must be a DNS
//! name of the client certificate); the collector answers `Welcome` with 32
//! random bytes and nothing else; the next message must be `Proof`, an
//! Ed25519 signature by the Hello key over [`chain::hello_message`]. The key
//! must be the one on record for the node: pinned (`--keys`), enrolled
//! (`portcullis collector enroll`), or with `--trust tofu` the key first
//! seen. Only then does the collector say anything about the node:
//! `Accepted` with the highest seq it has persisted. Failed handshakes go
//! through the [`guard`](crate::guard), which bounds their findings. Then
//! each `EventBatch` is checked whole (size, decoding, node id) before any of
//! it is written, verified event by event ([`ChainVerifier`]), written as
//! JSON lines with a detection-finding record for every chain problem,
//! made durable, and only then acknowledged.
//!
//! Pipelining: a stream may have up to [`PIPELINE`] batches verified and not
//! yet acknowledged. Verification (under the verifier lock) fixes each
//! batch's place in one write queue; its lines are rendered outside the
//! lock; one writer thread writes the queue in that order, joining batches
//! that are ready into one write and fsync. So batch n+1 is decoded,
//! verified and rendered while batch n is being written, and acks still
//! name only persisted seqs, in order. When a batch cannot be persisted,
//! the node's verifier goes back to its persisted head and the batches
//! verified after it are dropped unwritten (the stream gets Unavailable).
//!
//! Anything else gets an error status (InvalidArgument for malformed or
//! out-of-order messages, Unauthenticated for a bad proof, PermissionDenied
//! for a key that is not trusted or another node's events), nothing from
//! that message is written, and the refusal is counted and logged; a bad
//! proof or an untrusted key also writes a detection finding.
//!
//! One writer per node: when a node connects again while an older stream
//! of it is open, the newer stream wins (a reconnecting agent must not wait
//! for a dead connection to time out); the older stream's next batch gets
//! `Aborted`.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use portcullis_proto::v1::{
    AgentMessage, CollectorMessage, Event,
    agent_message::Msg,
    collector_message,
    collector_server::{self, CollectorServer},
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tonic::{
    Request, Response, Status, Streaming, codegen::tokio_stream::wrappers::ReceiverStream,
};

mod handshake;

use crate::{
    guard::HandshakeGuard,
    options::{CollectorOptions, Output, TrustMode},
    store::Store,
};
use portcullis_trail::{
    chain::Head,
    keys::{NodeKeys, Provenance},
    ocsf,
    verify::{ChainVerifier, Disposition, Finding, FindingKind, Severity, Trust, Verdict},
};

/// The stream protocol this collector speaks (`Hello.protocol`).
pub const PROTOCOL: u32 = 2;

/// Counters, readable while serving.
#[derive(Debug, Default)]
pub struct Stats {
    /// Streams accepted (handshake completed).
    pub sessions: AtomicU64,
    /// Streams or messages refused with an error status.
    pub refused: AtomicU64,
    /// Event records written.
    pub events_written: AtomicU64,
    /// Events skipped because (node, seq) was already persisted.
    pub duplicates: AtomicU64,
    /// Detection-finding records written.
    pub findings_written: AtomicU64,
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What verifying needs (held while a batch is checked, never across I/O).
struct Inner {
    verifier: ChainVerifier,
    keys: NodeKeys,
    /// How each connected node's key is trusted (records of first-use
    /// nodes say so).
    provenance: HashMap<String, Provenance>,
    /// Current stream generation per node (newest wins).
    sessions: HashMap<String, u64>,
    next_generation: u64,
    /// Per node, bumped when the verifier is put back to the persisted
    /// head (a batch failed to persist); batches verified before are
    /// dropped by the writer. The same numbers as [`Persisted::epochs`].
    epochs: HashMap<String, u64>,
}

/// What writing needs (held across the write and fsync).
struct Persisted {
    store: Store,
    epochs: HashMap<String, u64>,
}

/// A verified batch on its way to the writer: its place in the write order
/// is taken while the verifier is held; its lines follow when rendered.
struct Job {
    node: String,
    epoch: u64,
    /// The node's persisted head seq once written, or why not.
    done: oneshot::Sender<Result<u64, Status>>,
}

/// A job and, to come, its lines.
type Queued = (Job, oneshot::Receiver<Rendered>);

/// A batch's output lines and what they add.
struct Rendered {
    buf: Vec<u8>,
    head: Option<Head>,
    written: u64,
    findings: u64,
    dups: u64,
}

/// Batches a stream may have verified and not yet acknowledged: while one
/// is written and fsynced, the next is decoded, verified and rendered.
const PIPELINE: usize = 4;
/// Batches the writer joins into one write and fsync, when they are ready.
const GROUP: usize = 8;

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    output: Mutex<Persisted>,
    /// To the writer thread, in verification order.
    jobs: Mutex<std_mpsc::Sender<Queued>>,
    pub(crate) stats: Stats,
    max_batch_events: usize,
    max_message_bytes: usize,
    handshake_timeout: Duration,
    rng: ring::rand::SystemRandom,
    shutdown: tokio::sync::watch::Sender<bool>,
    trust: TrustMode,
    node_id_from_cert: bool,
    guard: Mutex<HandshakeGuard>,
    guard_window: Duration,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn line(v: &serde_json::Value, out: &mut Vec<u8>) {
    // serde_json never fails on a Value.
    let _ = serde_json::to_writer(&mut *out, v);
    out.push(b'\n');
}

impl Shared {
    /// Opens the output and starts the writer thread (it ends when the
    /// returned value is dropped).
    pub(crate) fn open(opts: CollectorOptions) -> anyhow::Result<Arc<Shared>> {
        let mut short = Vec::new();
        let (store, keys_dir) = match opts.output {
            Output::Dir { dir, rotate_bytes } => {
                let (store, rec) = Store::open_dir(&dir, rotate_bytes)
                    .map_err(|e| anyhow::anyhow!("--out {}: {e}", dir.display()))?;
                if let Some((file, cut)) = &rec.torn {
                    tracing::warn!(file = %file.display(), bytes_cut = cut, "cut a torn last record (a crash mid-write; it was never acknowledged)");
                }
                for (file, line) in &rec.bad_lines {
                    tracing::error!(file = %file.display(), line, "skipped a line that is not a JSON record");
                }
                tracing::info!(
                    files = rec.files_scanned,
                    records = rec.records_scanned,
                    nodes = store.heads().len(),
                    "recovered output state"
                );
                short = rec.short.clone();
                (store, Some(dir.join("keys")))
            }
            Output::Writer { writer, state_dir } => {
                let store = Store::writer(writer, state_dir.as_deref())?;
                (store, state_dir.map(|d| d.join("keys")))
            }
        };
        let mut keys = NodeKeys::open(keys_dir.as_deref())?;
        // The operator's pinned keys go on record too, so `audit verify`
        // on the output directory checks against what the collector used.
        for (node, key) in &opts.pinned {
            if keys.get(node) != Some((*key, Provenance::Pinned)) {
                keys.record(node, *key, Provenance::Pinned)?;
            }
        }
        // Keys are set per node at each handshake; the chain verifier never
        // learns one from the events.
        let mut verifier = ChainVerifier::new(Trust::Pinned, HashMap::new());
        for (node, head) in store.heads() {
            verifier.resume(node, *head);
        }
        let (tx, rx) = std_mpsc::channel::<Queued>();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                verifier,
                keys,
                provenance: HashMap::new(),
                sessions: Default::default(),
                next_generation: 0,
                epochs: Default::default(),
            }),
            output: Mutex::new(Persisted {
                store,
                epochs: Default::default(),
            }),
            jobs: Mutex::new(tx),
            stats: Stats::default(),
            max_batch_events: opts.max_batch_events,
            max_message_bytes: opts.max_message_bytes,
            handshake_timeout: Duration::from_secs(opts.handshake_timeout_secs.max(1)),
            rng: ring::rand::SystemRandom::new(),
            shutdown: tokio::sync::watch::channel(false).0,
            trust: opts.trust,
            node_id_from_cert: opts.node_id_from_cert,
            guard: Mutex::new(HandshakeGuard::new(opts.guard)),
            guard_window: opts.guard.window,
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("collector-writer".into())
            .spawn(move || writer(&weak, &rx))
            .context("starting the collector's writer thread")?;
        // Acknowledged records the files no longer hold: said at once, in
        // the output itself.
        for (node, acked, held) in short {
            let f = Finding {
                kind: FindingKind::Gap,
                node_id: node,
                seq: held + 1,
                message: format!(
                    "seqs {}..={acked} were acknowledged but the output files hold this node only through seq {held}: records lost or removed while the collector was down",
                    held + 1
                ),
            };
            tracing::error!(finding = %f, "acknowledged records missing from the output");
            shared.write_finding(&f, None, None);
        }
        Ok(shared)
    }

    /// Ends every open stream (UNAVAILABLE) and refuses new ones.
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock order: [`Shared::lock`] first when both are held.
    fn lock_output(&self) -> MutexGuard<'_, Persisted> {
        // A panic while holding the lock cannot leave output half-written
        // (append cuts back on error), so a poisoned lock is still usable.
        self.output.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn save_state(&self) {
        if let Err(e) = self.lock_output().store.save_state() {
            tracing::warn!(error = %e, "could not save collector state at shutdown");
        }
    }

    /// Counts a failed handshake and writes the finding the guard lets
    /// through (blocking).
    fn handshake_failed(&self, peer: Option<IpAddr>, f: Finding) {
        let report = self
            .guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed(peer, f);
        if let Some((f, peer)) = report {
            self.write_finding(&f, peer, None);
        }
    }

    /// Writes the findings of a finished guard window, or of the current
    /// one when `all` (at shutdown) (blocking).
    pub(crate) fn flush_guard(&self, all: bool) {
        let now = std::time::Instant::now();
        let reports = {
            let mut g = self.guard.lock().unwrap_or_else(|e| e.into_inner());
            if all { g.flush_all(now) } else { g.flush(now) }
        };
        for (f, peer) in reports {
            self.write_finding(&f, peer, None);
        }
    }

    fn throttled(&self, peer: Option<IpAddr>) -> bool {
        self.guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .throttled(peer)
    }

    /// Writes one finding record (blocking).
    fn write_finding(&self, f: &Finding, peer: Option<IpAddr>, evidence: Option<&[u8]>) {
        let mut buf = Vec::new();
        line(&ocsf::finding_record(f, now_ms(), peer, evidence), &mut buf);
        let mut out = self.lock_output();
        match out.store.append(&buf, &[]) {
            Ok(()) => {
                self.stats.findings_written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, finding = %f, "could not write a finding"),
        }
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct CollectorService {
    shared: Arc<Shared>,
}

impl CollectorService {
    pub(crate) fn new(shared: Arc<Shared>) -> CollectorService {
        CollectorService { shared }
    }

    pub fn into_server(self) -> CollectorServer<CollectorService> {
        let max = self.shared.max_message_bytes;
        CollectorServer::new(self).max_decoding_message_size(max)
    }
}

#[tonic::async_trait]
impl collector_server::Collector for CollectorService {
    type StreamStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let peer_cert = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut s = Session {
                shared,
                peer,
                peer_cert,
                inbound,
                tx: tx.clone(),
                node: String::new(),
                generation: 0,
                epoch: 0,
            };
            if let Err(status) = s.run().await {
                s.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    peer = ?peer,
                    node = %s.node,
                    code = ?status.code(),
                    message = status.message(),
                    "collector refused a client message"
                );
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Why a batch verified after a lost one is refused.
const RESEND: &str =
    "an earlier batch of this node was not persisted; resend from the last acknowledged event";

struct Session {
    shared: Arc<Shared>,
    peer: Option<IpAddr>,
    /// The client certificate (DER), over mTLS.
    peer_cert: Option<Vec<u8>>,
    inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<CollectorMessage, Status>>,
    node: String,
    generation: u64,
    /// The node's epoch when this stream was accepted: a rollback since
    /// (a batch failed to persist) ends the stream, which must resume from
    /// the persisted head rather than verify more against it.
    epoch: u64,
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

impl Session {
    async fn next(&mut self, what: &str) -> Result<Option<Msg>, Status> {
        let mut stop = self.shared.shutdown.subscribe();
        let msg = tokio::select! {
            m = self.inbound.message() => m,
            _ = stop.wait_for(|s| *s) => {
                return Err(Status::unavailable("the collector is shutting down"));
            }
        };
        match msg {
            Ok(Some(AgentMessage { msg: Some(m) })) => Ok(Some(m)),
            Ok(Some(AgentMessage { msg: None })) => Err(invalid(format!(
                "expected {what}, got an empty AgentMessage"
            ))),
            Ok(None) => Ok(None),
            Err(s) => Err(invalid(format!(
                "expected {what}, got an unreadable message: {}",
                s.message()
            ))),
        }
    }

    async fn send(&self, m: collector_message::Msg) -> Result<(), Status> {
        self.tx
            .send(Ok(CollectorMessage { msg: Some(m) }))
            .await
            .map_err(|_| Status::cancelled("client went away"))
    }

    /// Runs `f` on the blocking pool (verifying, rendering, file I/O).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| Status::internal(format!("collector task failed: {e}")))
    }

    fn refuse_finding(&self, kind: FindingKind, message: String) -> Finding {
        Finding {
            kind,
            node_id: self.node.clone(),
            seq: 0,
            message,
        }
    }

    async fn run(&mut self) -> Result<(), Status> {
        if self.shared.throttled(self.peer) {
            return Err(Status::resource_exhausted(
                "too many failed handshakes from this address; try again later",
            ));
        }
        match self.handshake().await {
            Ok(Some(admitted)) => self.stream_batches(admitted).await,
            Ok(None) => Ok(()),
            Err((status, finding)) => {
                if let Some(f) = finding {
                    let peer = self.peer;
                    self.blocking(move |s| s.handshake_failed(peer, f)).await?;
                }
                Err(status)
            }
        }
    }

    async fn stream_batches(&mut self, admitted: (u64, u64, Provenance)) -> Result<(), Status> {
        let (generation, resume_after, provenance) = admitted;
        self.generation = generation;
        self.shared.stats.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %self.node, peer = ?self.peer, resume_after, trust = provenance.as_str(), "agent stream accepted");

        // Batches verified and queued for writing, oldest first; each is
        // acknowledged once persisted, in order.
        let mut pending: VecDeque<oneshot::Receiver<Result<u64, Status>>> = VecDeque::new();
        loop {
            tokio::select! {
                biased;
                done = async { pending.front_mut().expect("guarded").await }, if !pending.is_empty() => {
                    pending.pop_front();
                    self.ack(done).await?;
                }
                msg = self.next("EventBatch"), if pending.len() < PIPELINE => {
                    match self.take_batch(msg).await {
                        Ok(Some(done)) => pending.push_back(done),
                        Ok(None) => break,
                        Err(status) => {
                            // Acknowledge the batches before the refused
                            // one (they are written), then refuse.
                            while let Some(done) = pending.pop_front() {
                                if self.ack(done.await).await.is_err() {
                                    break;
                                }
                            }
                            return Err(status);
                        }
                    }
                }
            }
        }
        // The stream ended: acknowledge what is still being written.
        while let Some(done) = pending.pop_front() {
            self.ack(done.await).await?;
        }
        Ok(())
    }

    /// Checks and verifies the next message's batch and queues it for
    /// writing; `None` when the stream ended.
    async fn take_batch(
        &self,
        msg: Result<Option<Msg>, Status>,
    ) -> Result<Option<oneshot::Receiver<Result<u64, Status>>>, Status> {
        let batch = match msg? {
            None => return Ok(None),
            Some(Msg::Batch(b)) => b,
            Some(_) => {
                return Err(invalid(
                    "after the handshake only EventBatch messages are accepted",
                ));
            }
        };
        if batch.events.len() > self.shared.max_batch_events {
            return Err(invalid(format!(
                "a batch of {} events is over the limit of {}",
                batch.events.len(),
                self.shared.max_batch_events
            )));
        }
        let node = self.node.clone();
        let generation = self.generation;
        let epoch = self.epoch;
        let peer = self.peer;
        tracing::debug!(node = %self.node, events = batch.events.len(), "batch received");
        let done = self
            .blocking(move |s| s.stage_batch(&node, (generation, epoch), peer, batch.events))
            .await??;
        tracing::debug!(node = %self.node, "batch staged");
        Ok(Some(done))
    }

    async fn ack(
        &self,
        done: Result<Result<u64, Status>, oneshot::error::RecvError>,
    ) -> Result<(), Status> {
        let through = done.map_err(|_| Status::internal("the collector's writer stopped"))??;
        tracing::debug!(node = %self.node, persisted_through = through, "batch persisted; acknowledging");
        self.send(collector_message::Msg::Ack(portcullis_proto::v1::Ack {
            persisted_through: through,
        }))
        .await
    }
}

/// Checks that a batch is well-formed as a whole (before any of it is
/// verified or written).
fn check_batch(node: &str, events: &[Vec<u8>]) -> Result<(), Status> {
    for (i, bytes) in events.iter().enumerate() {
        let ev = Event::decode(bytes.as_slice())
            .map_err(|e| invalid(format!("batch event {i} is not an Event: {e}")))?;
        if ev.node_id != node {
            return Err(Status::permission_denied(format!(
                "batch event {i} belongs to node {:?}, not {:?}",
                ev.node_id, node
            )));
        }
        if ev.seq == 0 || ev.prev_hash.len() != 32 || ev.body.is_none() {
            return Err(invalid(format!(
                "batch event {i} has an invalid envelope (seq {}, prev_hash {} bytes, body {})",
                ev.seq,
                ev.prev_hash.len(),
                if ev.body.is_some() {
                    "present"
                } else {
                    "missing"
                }
            )));
        }
    }
    Ok(())
}

impl Shared {
    /// Checks, verifies and queues one batch for writing, then renders its
    /// lines (outside the lock). The receiver gets the node's persisted head
    /// seq once the batch is durable.
    fn stage_batch(
        &self,
        node: &str,
        (generation, session_epoch): (u64, u64),
        peer: Option<IpAddr>,
        events: Vec<Vec<u8>>,
    ) -> Result<oneshot::Receiver<Result<u64, Status>>, Status> {
        check_batch(node, &events)?;
        let (lines_tx, lines) = oneshot::channel();
        let (done, done_rx) = oneshot::channel();
        let (verdicts, tofu): (Vec<Verdict>, bool) = {
            let mut inner = self.lock();
            let tofu = inner.provenance.get(node) == Some(&Provenance::Tofu);
            if inner.sessions.get(node) != Some(&generation) {
                return Err(Status::aborted(
                    "a newer stream of this node took over; this one is closed",
                ));
            }
            let epoch = inner.epochs.get(node).copied().unwrap_or(0);
            if epoch != session_epoch {
                // Put back at the persisted head since this stream began:
                // verifying on from there would take this stream's later
                // batches as a gap. The agent resumes from the head.
                return Err(Status::unavailable(RESEND));
            }
            let verdicts = events
                .iter()
                .map(|bytes| inner.verifier.accept_for(node, bytes))
                .collect();
            // Queued while the verifier is held: the write order is the
            // verification order.
            let job = Job {
                node: node.to_owned(),
                epoch,
                done,
            };
            let sent = self
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send((job, lines));
            if sent.is_err() {
                drop(inner);
                self.rollback(&[node.to_owned()]);
                return Err(Status::internal("the collector's writer stopped"));
            }
            (verdicts, tofu)
        };
        let trust = tofu.then_some(Provenance::Tofu.as_str());
        let time = now_ms();
        let mut r = Rendered {
            buf: Vec::with_capacity(events.len() * 2800),
            head: None,
            written: 0,
            findings: 0,
            dups: 0,
        };
        for (v, bytes) in verdicts.iter().zip(&events) {
            for f in &v.findings {
                if f.kind.severity() >= Severity::Warning {
                    tracing::warn!(finding = %f, "chain finding");
                    line(
                        &ocsf::finding_record(f, time, peer, Some(bytes)),
                        &mut r.buf,
                    );
                    r.findings += 1;
                }
            }
            match (v.disposition, &v.event) {
                (Disposition::New, Some(ev)) => {
                    ocsf::write_event_record(ev, bytes, &v.hash, trust, &mut r.buf);
                    r.buf.push(b'\n');
                    r.written += 1;
                    let h = Head {
                        seq: ev.seq,
                        hash: v.hash,
                    };
                    if r.head.is_none_or(|old| h.seq > old.seq) {
                        r.head = Some(h);
                    }
                }
                (Disposition::Duplicate, _) => r.dups += 1,
                _ => {}
            }
        }
        // The writer waits for these lines; if they never come (a panic
        // above), it rolls the node back.
        let _ = lines_tx.send(r);
        Ok(done_rx)
    }

    /// Puts each node's verifier back at its persisted head after batches
    /// verified for it could not be persisted, and drops the batches still
    /// queued for it (they were verified after the lost ones).
    fn rollback(&self, nodes: &[String]) {
        let mut inner = self.lock();
        let mut out = self.lock_output();
        for node in nodes {
            let persisted = out.store.head(node);
            let key = inner.verifier.node(node).and_then(|s| s.key);
            inner.verifier.reset(node, persisted);
            if let Some(k) = key {
                inner.verifier.set_key(node, k);
            }
            let epoch = out.epochs.get(node).copied().unwrap_or(0) + 1;
            out.epochs.insert(node.clone(), epoch);
            inner.epochs.insert(node.clone(), epoch);
        }
    }

    /// Writes a group of batches (in order) with one write and fsync;
    /// tells each job the outcome.
    fn persist(&self, group: Vec<(Job, Option<Rendered>)>) {
        // Nodes whose verifier is ahead of what will be persisted.
        let mut lost: Vec<String> = Vec::new();
        let mut data = Vec::new();
        let mut heads: Vec<(String, Head)> = Vec::new();
        let mut batches: Vec<(Job, Rendered)> = Vec::new();
        let mut out = self.lock_output();
        for (job, rendered) in group {
            let current = out.epochs.get(&job.node).copied().unwrap_or(0) == job.epoch
                && !lost.contains(&job.node);
            match rendered {
                Some(mut r) if current => {
                    if data.is_empty() {
                        data = std::mem::take(&mut r.buf);
                    } else {
                        data.extend_from_slice(&r.buf);
                        r.buf = Vec::new();
                    }
                    if let Some(h) = r.head {
                        match heads.iter_mut().find(|(n, _)| *n == job.node) {
                            Some((_, old)) => {
                                if h.seq > old.seq {
                                    *old = h;
                                }
                            }
                            None => heads.push((job.node.clone(), h)),
                        }
                    }
                    batches.push((job, r));
                }
                Some(_) => {
                    let _ = job.done.send(Err(Status::unavailable(RESEND)));
                }
                None => {
                    // Verified but never rendered (a panic): the verifier
                    // is ahead; this and later batches of the node go.
                    if current {
                        lost.push(job.node.clone());
                    }
                    let _ = job.done.send(Err(Status::internal(
                        "the collector failed to render a batch",
                    )));
                }
            }
        }
        match out.store.append(&data, &heads) {
            Ok(()) => {
                // Counted before any ack goes out.
                for (_, r) in &batches {
                    let st = &self.stats;
                    st.events_written.fetch_add(r.written, Ordering::Relaxed);
                    st.findings_written.fetch_add(r.findings, Ordering::Relaxed);
                    st.duplicates.fetch_add(r.dups, Ordering::Relaxed);
                }
                for (job, _) in batches {
                    let _ = job.done.send(Ok(out.store.head(&job.node).seq));
                }
                drop(out);
            }
            Err(e) => {
                drop(out);
                // Nothing of the group is persisted: put the verifiers back
                // at the persisted heads so a retry is checked afresh.
                for (job, _) in &batches {
                    if !lost.contains(&job.node) {
                        lost.push(job.node.clone());
                    }
                }
                tracing::error!(error = %e, nodes = ?lost, "could not persist a batch");
                // Rolled back before anyone hears of the failure: an agent
                // that reconnects at once must meet the node already back
                // at its persisted head, or its new stream would be
                // verified against the lost batches and told to resend.
                self.rollback(&lost);
                lost.clear();
                for (job, _) in batches {
                    let _ = job.done.send(Err(Status::unavailable(format!(
                        "the collector could not persist the batch: {e}"
                    ))));
                }
            }
        }
        if !lost.is_empty() {
            self.rollback(&lost);
        }
    }
}

/// The writer thread: takes verified batches in order, joins those whose
/// lines are ready, writes and fsyncs them, and reports back. Ends when the
/// collector is dropped.
fn writer(shared: &Weak<Shared>, jobs: &std_mpsc::Receiver<Queued>) {
    let mut next: Option<Queued> = None;
    loop {
        let (job, lines) = match next.take() {
            Some(q) => q,
            None => match jobs.recv() {
                Ok(q) => q,
                Err(_) => return,
            },
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut group = vec![(job, lines.blocking_recv().ok())];
        while group.len() < GROUP {
            let Ok((job, mut lines)) = jobs.try_recv() else {
                break;
            };
            match lines.try_recv() {
                Ok(r) => group.push((job, Some(r))),
                Err(oneshot::error::TryRecvError::Closed) => group.push((job, None)),
                Err(oneshot::error::TryRecvError::Empty) => {
                    next = Some((job, lines));
                    break;
                }
            }
        }
        let nodes: Vec<String> = group.iter().map(|(j, _)| j.node.clone()).collect();
        let persisted =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.persist(group)));
        if persisted.is_err() {
            // The jobs' senders are gone (their streams fail); whatever
            // was verified for these nodes is not known to be persisted.
            tracing::error!(nodes = ?nodes, "the collector's writer panicked on a batch");
            shared.rollback(&nodes);
        }
    }
}
