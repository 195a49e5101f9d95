//! The auditor: the one writer of a node's chain.
//!
//! Everything that audits goes through an [`Auditor`] handle (cheap to
//! clone): `record` enqueues an event and returns at once, `record_durable`
//! waits until the event is on disk (admissions: the grant is durable before
//! the kernel changes). One writer thread drains the queue, seals each event
//! ([`chain::Sealer`]), appends the batch to the [`Spool`] with one fsync
//! (group commit), then publishes the durable seq and wakes the waiters.
//!
//! The writer is a dedicated std thread, not tokio: it spends its life
//! blocked in `fdatasync`, which would stall an async worker, and a
//! `spawn_blocking` per batch would add a thread hand-off per batch for no
//! gain. Sealing happens on that thread too, so the chain has exactly one
//! owner.
//!
//! Sequence numbers never burn: a batch is sealed once and, when its write
//! fails (ENOSPC, EIO), the spool cuts the files back and the very same
//! sealed bytes are retried later, ahead of anything newer. Waiters of a
//! failed batch get the error at once (an admission must not hang on a full
//! disk); their events are still written when the disk recovers.
//!
//! Spool bound (`audit.spool_max_bytes`): with `on_full =
//! "refuse_admissions"` the auditor goes full at the bound: it records a
//! `SpoolPressure{full}` event, `admissions_allowed()` turns false and
//! deferrable reports (drop summaries, cost reports) are refused with
//! [`AuditError::Full`] so their producers keep the counts for the next
//! interval. Other events still go in, into a reserve of one segment above
//! the bound; past that hard ceiling they fail too (counted, logged). When
//! acknowledgements bring the spool under 90 % of the bound, a
//! `SpoolPressure{full: false, refused_admissions}` event says how many
//! admissions were refused meanwhile. With `on_full = "drop_oldest"` the
//! oldest segment is deleted instead and a `Gap` event names the seqs lost:
//! from the first unacknowledged seq through the last one deleted, so the
//! newest gap event covers every earlier drop too (an older gap event may
//! itself have been dropped).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use portcullis_proto::v1::lifecycle::Phase;
use portcullis_proto::v1::{Gap, Lifecycle, SpoolPressure, event::Body};
use tokio::sync::{broadcast, oneshot, watch};

use super::spool::{Recovery, Spool, SpoolError};
use crate::config::{AuditSection, OnFull};
use crate::loader::clock::precise_monotonic_ns;
use portcullis_trail::chain::{self, Sealed, Sealer};
use portcullis_trail::node_key::NodeKey;

/// Most events sealed and written in one batch (one fsync).
pub const BATCH_CAP: usize = 4096;
/// Events accepted but not yet on disk beyond which everything is refused:
/// a bound on memory while the disk is failing.
pub const MAX_QUEUED: u64 = 1 << 20;
/// The spool leaves the full state below this share of the bound (per mille).
const UNFULL_PER_MILLE: u64 = 900;
/// Retry delays after a failed write.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Longest the writer sleeps with nothing to do.
const IDLE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit spool: {0}")]
    Spool(Arc<SpoolError>),
    /// The spool is full (refused deferrable event, or the hard ceiling).
    #[error("audit spool is full")]
    Full,
    /// The writer has stopped (shut down, or every handle dropped).
    #[error("the auditor has stopped")]
    Closed,
}

impl From<SpoolError> for AuditError {
    fn from(e: SpoolError) -> Self {
        AuditError::Spool(Arc::new(e))
    }
}

/// What the `Lifecycle STARTED` event says about this start.
#[derive(Debug, Clone, Default)]
pub struct StartInfo {
    pub agent_version: String,
    pub policy_version: String,
    pub reason: String,
    /// The pins die with the agent (`kernel.ephemeral_pins`).
    pub ephemeral_pins: bool,
    /// Why the pins outlive the agent, in words.
    pub pin_durability: String,
}

/// A snapshot of the auditor's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditStats {
    /// Highest seq sealed (it may not be on disk yet).
    pub sealed_seq: u64,
    /// Highest seq fsynced.
    pub durable_seq: u64,
    /// Highest seq the collector acknowledged.
    pub acked_seq: u64,
    /// Bytes of spool segment files.
    pub spool_bytes: u64,
    pub spool_limit: u64,
    /// The spool is at its bound (`refuse_admissions`).
    pub full: bool,
    /// The last write failed; events wait in memory for a retry.
    pub degraded: bool,
    /// Admissions refused because the spool was full, since start.
    pub refused_admissions: u64,
    /// Deferrable events refused (`Full`) so their producers report later.
    pub deferred_records: u64,
    /// Events refused past the hard ceiling: lost to the audit trail.
    pub rejected_records: u64,
    /// Unsent events deleted by `drop_oldest`.
    pub dropped_events: u64,
    /// Events accepted and not yet on disk.
    pub queued: u64,
}

type Waiter = oneshot::Sender<Result<u64, AuditError>>;

// Nearly every message is a `Record`: boxing the body would cost an
// allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Record(Body, Option<Waiter>),
    Ack(u64),
    Shutdown(String, oneshot::Sender<Result<(), AuditError>>),
}

/// State shared by the handles and the writer.
struct Shared {
    node_id: String,
    public_key: [u8; 32],
    on_full: OnFull,
    limit: u64,
    /// Non-deferrable events are refused at or above this many spool bytes.
    ceiling: u64,
    spool: Mutex<Spool>,
    durable: watch::Receiver<u64>,
    used: AtomicU64,
    sealed: AtomicU64,
    acked: AtomicU64,
    full: AtomicBool,
    degraded: AtomicBool,
    queued: AtomicU64,
    /// The writer has stopped: refuse rather than queue into the void.
    closed: AtomicBool,
    refused_total: AtomicU64,
    refused_while_full: AtomicU64,
    deferred: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    /// Durable events for `Watch` clients: each event's bytes are moved
    /// (not copied) into a shared buffer every subscriber reads. The
    /// sender never waits; a subscriber that falls behind learns it.
    watchers: broadcast::Sender<(u64, Bytes)>,
}

/// Durable events a lagging `Watch` forwarder may fall behind by before it
/// is told so.
const WATCH_BACKLOG: usize = 4096;

impl Shared {
    fn spool(&self) -> MutexGuard<'_, Spool> {
        // A panic while holding the lock leaves the spool's in-memory state
        // as consistent as the files: keep going.
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle on the node's audit chain. Clone freely.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// The writer; `run` it once (`tokio::spawn(task.run())`).
pub struct AuditorTask {
    writer: Writer,
}

/// Events whose producers can hold their counts and report them in the
/// next interval.
fn deferrable(body: &Body) -> bool {
    matches!(body, Body::DropSummary(_) | Body::CostReport(_))
}

impl Auditor {
    /// Opens (recovering) the spool, resumes the chain after the recovered
    /// head, and makes `Lifecycle STARTED` (plus a `Gap` for every range the
    /// recovery lost) durable before returning.
    pub fn open(
        cfg: &AuditSection,
        node_id: &str,
        key: Arc<NodeKey>,
        start: StartInfo,
    ) -> Result<(Auditor, AuditorTask), AuditError> {
        let (spool, rec) = Spool::open(&cfg.spool_dir, cfg.segment_bytes)?;
        let head = rec.head;
        let public_key = key.public_key();
        let (durable_tx, durable_rx) = watch::channel(rec.last_held_seq);
        let shared = Arc::new(Shared {
            node_id: node_id.to_string(),
            public_key,
            on_full: cfg.on_full,
            limit: cfg.spool_max_bytes,
            ceiling: cfg.spool_max_bytes.saturating_add(cfg.segment_bytes),
            used: AtomicU64::new(spool.used_bytes()),
            spool: Mutex::new(spool),
            durable: durable_rx,
            sealed: AtomicU64::new(head.seq),
            acked: AtomicU64::new(0),
            full: AtomicBool::new(false),
            degraded: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            refused_total: AtomicU64::new(0),
            refused_while_full: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            watchers: broadcast::channel(WATCH_BACKLOG).0,
        });
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            shared: Arc::clone(&shared),
            key,
            sealer: Sealer::resume(node_id, head),
            rx,
            durable_tx,
            start,
            checkpoint_events: cfg.checkpoint_events.max(1),
            checkpoint_interval: cfg.checkpoint_interval,
            pending: VecDeque::new(),
            batch: Vec::new(),
            batch_records: 0,
            waiters: Vec::new(),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            retry_at: None,
            backoff: RETRY_MIN,
            last_error: None,
            dropped_through: None,
        };
        writer.opened(&rec)?;
        Ok((Auditor { tx, shared }, AuditorTask { writer }))
    }

    fn admit(&self, body: &Body) -> Result<(), AuditError> {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        if s.on_full == OnFull::RefuseAdmissions
            && deferrable(body)
            && (s.full.load(Ordering::Relaxed) || s.degraded.load(Ordering::Relaxed))
        {
            s.deferred.fetch_add(1, Ordering::Relaxed);
            return Err(AuditError::Full);
        }
        if s.used.load(Ordering::Relaxed) >= s.ceiling
            || s.queued.load(Ordering::Relaxed) >= MAX_QUEUED
        {
            let n = s.rejected.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(
                    rejected = n,
                    spool_bytes = s.used.load(Ordering::Relaxed),
                    ceiling = s.ceiling,
                    queued = s.queued.load(Ordering::Relaxed),
                    "audit spool past its hard ceiling: event refused, lost to the audit trail"
                );
            }
            return Err(AuditError::Full);
        }
        Ok(())
    }

    fn send(&self, body: Body, waiter: Option<Waiter>) -> Result<(), AuditError> {
        self.admit(&body)?;
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Msg::Record(body, waiter)).map_err(|_| {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            AuditError::Closed
        })
    }

    /// Enqueues an event; never waits for I/O. `Err(Full)`: see the module
    /// doc.
    pub fn record(&self, body: Body) -> Result<(), AuditError> {
        self.send(body, None)
    }

    /// Enqueues an event and waits until it is fsynced; returns its seq.
    pub async fn record_durable(&self, body: Body) -> Result<u64, AuditError> {
        self.record_durable_started(body)?.await
    }

    /// Enqueues an event now and returns what resolves once it is fsynced
    /// (its seq), so that the caller can work while the writer syncs.
    pub fn record_durable_started(
        &self,
        body: Body,
    ) -> Result<impl Future<Output = Result<u64, AuditError>> + use<>, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.send(body, Some(tx))?;
        Ok(async move { rx.await.unwrap_or(Err(AuditError::Closed)) })
    }

    /// Every event made durable from now on: its seq and canonical bytes.
    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Bytes)> {
        self.shared.watchers.subscribe()
    }

    /// False while the spool is full (or failing) and `on_full =
    /// "refuse_admissions"`.
    pub fn admissions_allowed(&self) -> bool {
        let s = &self.shared;
        s.on_full != OnFull::RefuseAdmissions
            || !(s.full.load(Ordering::Relaxed) || s.degraded.load(Ordering::Relaxed))
    }

    /// Counts an admission refused because the spool is full.
    pub fn note_refused_admission(&self) {
        self.shared.refused_total.fetch_add(1, Ordering::Relaxed);
        self.shared
            .refused_while_full
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Highest fsynced seq.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.shared.durable.clone()
    }

    /// Canonical bytes of the durable events after `seq` (from the oldest
    /// held when `seq` is below it), at most `max_events`. Blocking (file
    /// reads; may wait for an fsync in progress): call it off the async
    /// workers.
    pub fn read_after(&self, seq: u64, max_events: usize) -> Result<Vec<Vec<u8>>, AuditError> {
        Ok(self.shared.spool().read_after(seq, max_events)?)
    }

    /// The collector persisted everything through `seq`: trim the spool.
    pub fn acknowledged(&self, seq: u64) {
        let _ = self.tx.send(Msg::Ack(seq));
    }

    pub fn stats(&self) -> AuditStats {
        let s = &self.shared;
        AuditStats {
            sealed_seq: s.sealed.load(Ordering::Relaxed),
            durable_seq: *s.durable.borrow(),
            acked_seq: s.acked.load(Ordering::Relaxed),
            spool_bytes: s.used.load(Ordering::Relaxed),
            spool_limit: s.limit,
            full: s.full.load(Ordering::Relaxed),
            degraded: s.degraded.load(Ordering::Relaxed),
            refused_admissions: s.refused_total.load(Ordering::Relaxed),
            deferred_records: s.deferred.load(Ordering::Relaxed),
            rejected_records: s.rejected.load(Ordering::Relaxed),
            dropped_events: s.dropped.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.shared.public_key
    }

    /// Writes what is queued, then `Lifecycle STOPPING` and a final
    /// checkpoint, fsyncs, and stops the writer. Other handles get
    /// `Closed` afterwards.
    pub async fn shutdown(self, reason: &str) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Shutdown(reason.to_string(), tx))
            .map_err(|_| AuditError::Closed)?;
        rx.await.unwrap_or(Err(AuditError::Closed))
    }
}

impl AuditorTask {
    /// Runs the writer on its own thread until shutdown, or until every
    /// `Auditor` handle is dropped (then it writes what is queued and stops
    /// without a STOPPING event, as a crash would). The spool directory
    /// stays locked (flock) until this returns and every handle is gone.
    pub async fn run(self) {
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let mut writer = self.writer;
        let spawned = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                writer.run();
                // Release the spool (and its lock) before saying done, so
                // whoever awaited `run` can reopen it.
                drop(writer);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => {
                let _ = done_rx.await;
            }
            Err(e) => tracing::error!(error = %e, "cannot start the audit writer thread"),
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    key: Arc<NodeKey>,
    sealer: Sealer,
    rx: mpsc::Receiver<Msg>,
    durable_tx: watch::Sender<u64>,
    start: StartInfo,
    checkpoint_events: u64,
    checkpoint_interval: Duration,
    /// Accepted, not sealed. Internal events (pressure, gaps) go first.
    pending: VecDeque<Pending>,
    /// Sealed, not yet written (a failed write keeps them for the retry).
    batch: Vec<Sealed>,
    /// How many of `batch` came from `record*` (for the `queued` count).
    batch_records: u64,
    waiters: Vec<(u64, Waiter)>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: Option<AuditError>,
    /// Highest seq `drop_oldest` deleted.
    dropped_through: Option<u64>,
}

enum Stop {
    No,
    Requested(String, oneshot::Sender<Result<(), AuditError>>),
    Disconnected,
}

impl Writer {
    fn lifecycle(&self, phase: Phase, reason: String, recovery: Option<&Recovery>) -> Body {
        Body::Lifecycle(Lifecycle {
            phase: phase as i32,
            agent_version: self.start.agent_version.clone(),
            public_key: self.shared.public_key.to_vec(),
            key_id: chain::key_id(&self.shared.public_key),
            reason,
            recovered_seq: recovery.map_or(0, |r| r.head.seq),
            recovered_torn_bytes: recovery.map_or(0, |r| r.torn_bytes()),
            policy_version: self.start.policy_version.clone(),
            ephemeral_pins: self.start.ephemeral_pins,
            pin_durability: self.start.pin_durability.clone(),
        })
    }

    /// At open: STARTED and the recovery's gaps, durable before `open`
    /// returns.
    fn opened(&mut self, rec: &Recovery) -> Result<(), AuditError> {
        let started = self.lifecycle(Phase::Started, self.start.reason.clone(), Some(rec));
        self.push(started);
        for &(first_seq, last_seq) in &rec.lost {
            let what: Vec<String> = rec
                .corrupt
                .iter()
                .filter(|c| c.first_seq >= first_seq && c.first_seq <= last_seq)
                .map(|c| {
                    format!(
                        "{} ({} at byte {})",
                        c.moved_to.display(),
                        c.bad.reason,
                        c.bad.offset
                    )
                })
                .collect();
            let reason = if what.is_empty() {
                "spool recovery: segment files missing".to_string()
            } else {
                format!(
                    "spool recovery: corrupt segments moved aside: {}",
                    what.join(", ")
                )
            };
            tracing::error!(first_seq, last_seq, %reason, "audit events lost at start");
            self.push(Body::Gap(Gap {
                first_seq,
                last_seq,
                reason,
            }));
        }
        self.write();
        match self.last_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn push(&mut self, body: Body) {
        self.pending.push_back(Pending {
            body,
            waiter: None,
            counted: false,
        });
    }

    /// Internal events (pressure, gaps) go ahead of what is queued.
    fn push_front(&mut self, body: Body) {
        self.pending.push_front(Pending {
            body,
            waiter: None,
            counted: false,
        });
    }

    fn checkpoint_due(&self, now: Instant) -> bool {
        self.since_checkpoint > 0
            && now.duration_since(self.last_checkpoint) >= self.checkpoint_interval
    }

    fn run(&mut self) {
        let mut stop = Stop::No;
        while matches!(stop, Stop::No) {
            let now = Instant::now();
            let ready = self.retry_at.is_none_or(|t| now >= t);
            let work =
                !self.batch.is_empty() || !self.pending.is_empty() || self.checkpoint_due(now);
            if !(ready && work) {
                let mut wait = IDLE_WAIT;
                if let Some(t) = self.retry_at {
                    wait = wait.min(t.saturating_duration_since(now));
                }
                if self.since_checkpoint > 0 {
                    let due = self.last_checkpoint + self.checkpoint_interval;
                    wait = wait.min(due.saturating_duration_since(now));
                }
                match self.rx.recv_timeout(wait) {
                    Ok(m) => self.handle(m, &mut stop),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => stop = Stop::Disconnected,
                }
            }
            // Group commit: take what is queued. While writes fail, take
            // everything, so acknowledgements (which free space) get through.
            let cap = if self.retry_at.is_some() {
                usize::MAX
            } else {
                BATCH_CAP
            };
            while matches!(stop, Stop::No) && self.pending.len() < cap {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m, &mut stop),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => stop = Stop::Disconnected,
                }
            }
            if matches!(stop, Stop::No) && self.retry_at.is_none_or(|t| Instant::now() >= t) {
                self.write();
            }
        }
        self.finish(stop);
    }

    fn handle(&mut self, m: Msg, stop: &mut Stop) {
        match m {
            Msg::Record(body, waiter) => self.pending.push_back(Pending {
                body,
                waiter,
                counted: true,
            }),
            Msg::Ack(seq) => self.acknowledged(seq),
            Msg::Shutdown(reason, done) => *stop = Stop::Requested(reason, done),
        }
    }

    /// Writes everything queued before the stop; on a requested stop,
    /// `Lifecycle STOPPING` and a final checkpoint after it.
    fn finish(&mut self, stop: Stop) {
        let stopping = matches!(stop, Stop::Requested(..));
        if let Stop::Requested(reason, _) = &stop {
            let body = self.lifecycle(Phase::Stopping, reason.clone(), None);
            self.push(body);
        }
        let mut result = Ok(());
        loop {
            if self.batch.is_empty() {
                self.seal_pending();
                if self.batch.is_empty() && stopping && self.since_checkpoint > 0 {
                    let (wall, mono) = (SystemTime::now(), precise_monotonic_ns());
                    self.seal_checkpoint(wall, mono);
                }
            }
            if self.batch.is_empty() {
                break;
            }
            self.write_batch();
            if let Some(e) = self.last_error.take() {
                let lost = self.batch.len() + self.pending.len();
                tracing::error!(error = %e, lost, "audit writer stopping with events not on disk");
                result = Err(e);
                break;
            }
        }
        // Anything that slipped in after the stop is not audited: say so.
        self.shared.closed.store(true, Ordering::Release);
        let mut late = 0u64;
        while let Ok(m) = self.rx.try_recv() {
            if let Msg::Record(..) = m {
                late += 1;
            }
        }
        if late > 0 {
            tracing::error!(
                events = late,
                "audit events recorded after shutdown were not written"
            );
        }
        if let Stop::Requested(_, done) = stop {
            let _ = done.send(result);
        }
        tracing::debug!(seq = self.sealer.head().seq, "audit writer stopped");
    }

    /// Seals what is pending, unless a failed batch waits for its retry,
    /// and writes one batch.
    fn write(&mut self) {
        if self.batch.is_empty() {
            self.seal_pending();
        }
        if !self.batch.is_empty() {
            self.write_batch();
        }
    }

    fn seal_pending(&mut self) {
        let wall = SystemTime::now();
        let mono = precise_monotonic_ns();
        while self.batch.len() < BATCH_CAP {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let sealed = self.sealer.seal(p.body, wall, mono);
            if let Some(w) = p.waiter {
                self.waiters.push((sealed.seq, w));
            }
            self.batch_records += u64::from(p.counted);
            self.batch.push(sealed);
            self.since_checkpoint += 1;
            if self.since_checkpoint >= self.checkpoint_events {
                self.seal_checkpoint(wall, mono);
            }
        }
        if self.checkpoint_due(Instant::now()) {
            self.seal_checkpoint(wall, mono);
        }
        self.shared
            .sealed
            .store(self.sealer.head().seq, Ordering::Relaxed);
    }

    fn seal_checkpoint(&mut self, wall: SystemTime, mono: u64) {
        let c = self
            .sealer
            .seal_checkpoint(&self.key, self.since_checkpoint, wall, mono);
        self.batch.push(c);
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.shared
            .sealed
            .store(self.sealer.head().seq, Ordering::Relaxed);
    }

    /// Appends `batch` with one fsync; on failure keeps it for a retry.
    fn write_batch(&mut self) {
        let res = {
            let mut sp = self.shared.spool();
            let r = sp.append_batch(&self.batch);
            self.shared.used.store(sp.used_bytes(), Ordering::Relaxed);
            r
        };
        match res {
            Ok(()) => {
                let last = self.batch.last().map_or(0, |s| s.seq);
                if self.shared.watchers.receiver_count() > 0 {
                    for sealed in self.batch.drain(..) {
                        let _ = self
                            .shared
                            .watchers
                            .send((sealed.seq, Bytes::from(sealed.bytes)));
                    }
                }
                self.batch.clear();
                self.shared
                    .queued
                    .fetch_sub(self.batch_records, Ordering::Relaxed);
                self.batch_records = 0;
                self.durable_tx.send_replace(last);
                for (seq, w) in self.waiters.drain(..) {
                    let _ = w.send(Ok(seq));
                }
                if self.shared.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!(seq = last, "audit spool writable again");
                }
                self.retry_at = None;
                self.backoff = RETRY_MIN;
                self.last_error = None;
                self.after_append();
            }
            Err(e) => {
                let e = AuditError::from(e);
                tracing::error!(error = %e, events = self.batch.len(), retry_in_ms = self.backoff.as_millis() as u64,
                    "audit spool write failed; events kept in memory for a retry");
                self.shared.degraded.store(true, Ordering::Relaxed);
                for (_, w) in self.waiters.drain(..) {
                    let _ = w.send(Err(e.clone()));
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                self.last_error = Some(e);
            }
        }
    }

    fn pressure(&self, full: bool, used: u64, refused_admissions: u64) -> Body {
        Body::SpoolPressure(SpoolPressure {
            full,
            bytes_used: used,
            bytes_limit: self.shared.limit,
            refused_admissions,
            on_full: self.shared.on_full.as_str().to_string(),
        })
    }

    /// The bound, after the spool grew.
    fn after_append(&mut self) {
        let s = Arc::clone(&self.shared);
        match s.on_full {
            OnFull::RefuseAdmissions => {
                let used = s.used.load(Ordering::Relaxed);
                if used >= s.limit && !s.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        spool_bytes = used,
                        limit = s.limit,
                        "audit spool full: refusing new admissions until the collector acknowledges"
                    );
                    let body = self.pressure(true, used, 0);
                    self.push_front(body);
                }
            }
            OnFull::DropOldest => {
                let mut dropped_through = None;
                {
                    let mut sp = s.spool();
                    while sp.used_bytes() >= s.limit {
                        match sp.drop_oldest() {
                            Ok(Some((_, last))) => dropped_through = Some(last),
                            Ok(None) => break,
                            Err(e) => {
                                tracing::error!(error = %e, "audit spool: cannot drop the oldest segment");
                                break;
                            }
                        }
                    }
                    s.used.store(sp.used_bytes(), Ordering::Relaxed);
                }
                // One gap from the first unacknowledged seq: it covers what
                // earlier drops declared too, so the newest gap event alone
                // explains everything missing even when older gap events
                // were themselves dropped.
                let acked = s.acked.load(Ordering::Relaxed);
                if let Some(last_seq) = dropped_through
                    && last_seq > acked
                {
                    let first_seq = acked + 1;
                    let before = self.dropped_through.replace(last_seq).unwrap_or(acked);
                    s.dropped
                        .fetch_add(last_seq - before.max(acked), Ordering::Relaxed);
                    tracing::warn!(
                        first_seq,
                        last_seq,
                        "audit spool full: oldest unsent events dropped"
                    );
                    self.push_front(Body::Gap(Gap {
                        first_seq,
                        last_seq,
                        reason: "spool full: oldest unsent events dropped".to_string(),
                    }));
                }
            }
        }
    }

    /// The collector persisted everything through `seq`.
    fn acknowledged(&mut self, seq: u64) {
        let s = Arc::clone(&self.shared);
        let seq = seq.min(*self.durable_tx.borrow());
        let acked = s.acked.fetch_max(seq, Ordering::Relaxed).max(seq);
        let res = {
            let mut sp = s.spool();
            let r = sp.trim_through(acked);
            s.used.store(sp.used_bytes(), Ordering::Relaxed);
            r
        };
        match res {
            Ok(freed) if freed > 0 && self.retry_at.is_some() => {
                // Space came back: retry a failed write now.
                self.retry_at = Some(Instant::now());
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "audit spool: cannot trim acknowledged segments"),
        }
        let used = s.used.load(Ordering::Relaxed);
        if s.on_full == OnFull::RefuseAdmissions
            && s.full.load(Ordering::Relaxed)
            && u128::from(used) * 1000 < u128::from(s.limit) * u128::from(UNFULL_PER_MILLE)
        {
            s.full.store(false, Ordering::Relaxed);
            let refused = s.refused_while_full.swap(0, Ordering::Relaxed);
            tracing::info!(
                spool_bytes = used,
                refused_admissions = refused,
                "audit spool has room again"
            );
            let body = self.pressure(false, used, refused);
            self.push_front(body);
        }
    }
}

struct Pending {
    body: Body,
    waiter: Option<Waiter>,
    /// Came through `record*` (counted in `queued`).
    counted: bool,
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use portcullis_proto::v1::{ControlCall, CostReport, Event};
    use prost::Message as _;
    use tokio::task::JoinHandle;

    use super::*;
    use portcullis_testkit::TempDir;
    use portcullis_trail::chain::{GENESIS, checkpoint_message, event_hash, verify_signature};
    use portcullis_trail::frame::read_segment_file;

    fn cfg(dir: &Path, max: u64, segment: u64, on_full: OnFull) -> AuditSection {
        AuditSection {
            spool_dir: dir.to_path_buf(),
            spool_max_bytes: max,
            segment_bytes: segment,
            on_full,
            checkpoint_events: 1000,
            checkpoint_interval: Duration::from_secs(3600),
            report_interval: Duration::from_secs(60),
            collector: None,
        }
    }

    fn start(reason: &str) -> StartInfo {
        StartInfo {
            agent_version: "0.1.0-test".into(),
            policy_version: "p1".into(),
            reason: reason.into(),
            ..StartInfo::default()
        }
    }

    fn open(cfg: &AuditSection, key: &Arc<NodeKey>, reason: &str) -> (Auditor, JoinHandle<()>) {
        let (a, task) = Auditor::open(cfg, "node-1", Arc::clone(key), start(reason)).unwrap();
        (a, tokio::spawn(task.run()))
    }

    fn call(i: usize, pad: usize) -> Body {
        Body::ControlCall(ControlCall {
            caller: "test".into(),
            role: "operator".into(),
            method: format!("m{i}"),
            request: "r".repeat(pad),
            allowed: true,
            outcome: "ok".into(),
        })
    }

    fn cost() -> Body {
        Body::CostReport(CostReport::default())
    }

    /// Every event the spool holds, with its canonical bytes.
    fn held(a: &Auditor) -> Vec<(Event, Vec<u8>)> {
        a.read_after(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|b| (Event::decode(b.as_slice()).unwrap(), b))
            .collect()
    }

    /// Awaits `cond` with a bounded poll (10 s).
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Checks seqs are consecutive and each event links to the one before.
    fn assert_chained(events: &[(Event, Vec<u8>)], from: u64, prev: [u8; 32]) {
        let mut prev = prev;
        for (i, (e, b)) in events.iter().enumerate() {
            assert_eq!(e.seq, from + i as u64, "consecutive seqs");
            assert_eq!(
                e.prev_hash,
                prev.to_vec(),
                "seq {} links to the previous event",
                e.seq
            );
            assert_eq!(e.node_id, "node-1");
            prev = event_hash(b);
        }
    }

    fn verify_checkpoint(key: &NodeKey, e: &Event) -> u64 {
        let Some(Body::Checkpoint(cp)) = &e.body else {
            panic!("seq {} is not a checkpoint", e.seq)
        };
        let msg = checkpoint_message("node-1", e.seq, &e.prev_hash);
        assert!(
            verify_signature(&key.public_key(), &msg, &cp.signature),
            "checkpoint {} verifies",
            e.seq
        );
        assert_eq!(cp.key_id, chain::key_id(&key.public_key()));
        cp.events_since_last
    }

    fn lifecycle(e: &Event) -> &Lifecycle {
        match &e.body {
            Some(Body::Lifecycle(l)) => l,
            other => panic!("seq {} is not a lifecycle event: {other:?}", e.seq),
        }
    }

    #[tokio::test]
    async fn events_are_sealed_in_order_on_one_chain() {
        let tmp = TempDir::new("auditor-order").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let (a, task) = open(
            &cfg(tmp.path(), 1 << 20, 64 << 10, OnFull::RefuseAdmissions),
            &key,
            "start",
        );
        // STARTED is durable before open returns.
        assert_eq!(*a.durable().borrow(), 1);
        let started = &held(&a)[0].0;
        let l = lifecycle(started);
        assert_eq!(l.phase, Phase::Started as i32);
        assert_eq!(l.public_key, key.public_key().to_vec());
        assert_eq!(l.key_id, chain::key_id(&key.public_key()));
        assert_eq!((l.recovered_seq, l.recovered_torn_bytes), (0, 0));
        assert_eq!(
            (l.reason.as_str(), l.policy_version.as_str()),
            ("start", "p1")
        );

        // Many producers at once: each one's events stay in its order.
        let mut joins = Vec::new();
        for p in 0..4 {
            let a = a.clone();
            joins.push(tokio::spawn(async move {
                for i in 0..500 {
                    a.record(call(p * 1000 + i, 10)).unwrap();
                }
                a.record_durable(call(p * 1000 + 999, 10)).await.unwrap()
            }));
        }
        for j in joins {
            j.await.unwrap();
        }
        let all = held(&a);
        // Two checkpoints (every 1000 events) among them.
        assert_eq!(all.len(), 1 + 4 * 501 + 2);
        assert_chained(&all, 1, GENESIS);
        for p in 0..4 {
            let mine: Vec<usize> = all
                .iter()
                .filter_map(|(e, _)| match &e.body {
                    Some(Body::ControlCall(c)) => c.method[1..].parse::<usize>().ok(),
                    _ => None,
                })
                .filter(|m| m / 1000 == p)
                .collect();
            let want: Vec<usize> = (0..500).chain([999]).map(|i| p * 1000 + i).collect();
            assert_eq!(mine, want, "producer {p} in order");
        }
        let st = a.stats();
        assert_eq!((st.sealed_seq, st.durable_seq, st.queued), (2007, 2007, 0));
        assert_eq!(a.node_id(), "node-1");
        assert_eq!(a.public_key(), key.public_key());
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn record_durable_returns_after_the_bytes_are_in_the_spool_file() {
        let tmp = TempDir::new("auditor-durable").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let (a, task) = open(
            &cfg(tmp.path(), 1 << 20, 64 << 10, OnFull::RefuseAdmissions),
            &key,
            "start",
        );
        for i in 0..20 {
            a.record(call(i, 10)).unwrap();
        }
        let seq = a.record_durable(call(777, 10)).await.unwrap();
        assert_eq!(seq, 22);
        assert!(*a.durable().borrow() >= seq);
        // Straight from the files, not through the auditor.
        let mut found = None;
        for entry in std::fs::read_dir(tmp.path()).unwrap() {
            let read = read_segment_file(entry.unwrap().path()).unwrap();
            assert_eq!(read.bad, None);
            for f in read.frames {
                let e = Event::decode(f.as_slice()).unwrap();
                if e.seq == seq {
                    found = Some(e);
                }
            }
        }
        let e = found.expect("the event is in a spool file");
        assert!(matches!(e.body, Some(Body::ControlCall(c)) if c.method == "m777"));
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn checkpoints_every_n_events_and_after_the_interval() {
        let tmp = TempDir::new("auditor-ckpt").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let mut c = cfg(tmp.path(), 1 << 20, 64 << 10, OnFull::RefuseAdmissions);
        c.checkpoint_events = 10;
        c.checkpoint_interval = Duration::from_secs(1);
        let (a, task) = open(&c, &key, "start");
        for i in 0..34 {
            a.record(call(i, 10)).unwrap();
        }
        a.record_durable(call(34, 10)).await.unwrap();
        // 1 STARTED + 35 calls = 36 events: checkpoints after 10, 20, 30.
        let all = held(&a);
        assert_chained(&all, 1, GENESIS);
        let cps: Vec<usize> = (0..all.len())
            .filter(|&i| matches!(all[i].0.body, Some(Body::Checkpoint(_))))
            .collect();
        assert_eq!(cps, vec![10, 21, 32]);
        for &i in &cps {
            assert_eq!(verify_checkpoint(&key, &all[i].0), 10);
        }
        assert_eq!(all.len(), 39);
        // Six events after the last checkpoint: the interval brings one.
        let before = Instant::now();
        eventually("a timed checkpoint", || held(&a).len() == 40).await;
        assert!(before.elapsed() < Duration::from_secs(5));
        let all = held(&a);
        assert_chained(&all, 1, GENESIS);
        assert_eq!(verify_checkpoint(&key, &all[39].0), 6);
        // The spool holds it before the writer publishes its new head.
        eventually("the timed checkpoint reported durable", || {
            a.stats().durable_seq == 40
        })
        .await;
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_restart_continues_the_chain_with_started() {
        let tmp = TempDir::new("auditor-restart").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let c = cfg(tmp.path(), 1 << 20, 4096, OnFull::RefuseAdmissions);
        let (a, task) = open(&c, &key, "start");
        for i in 0..99 {
            a.record(call(i, 50)).unwrap();
        }
        let last = a.record_durable(call(99, 50)).await.unwrap();
        let before = held(&a);
        // A crash-like stop: every handle dropped, no STOPPING.
        drop(a);
        task.await.unwrap();

        let (a, task) = open(&c, &key, "restart after crash");
        let all = held(&a);
        assert_eq!(all[..before.len()], before[..]);
        assert_chained(&all, 1, GENESIS);
        let (started, _) = &all[before.len()];
        assert_eq!(started.seq, last + 1);
        let l = lifecycle(started);
        assert_eq!(l.phase, Phase::Started as i32);
        assert_eq!(l.recovered_seq, last);
        assert_eq!(l.recovered_torn_bytes, 0);
        assert_eq!(l.reason, "restart after crash");
        let seq = a.record_durable(call(100, 5)).await.unwrap();
        assert_eq!(seq, last + 2);
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_torn_tail_is_reported_in_started() {
        let tmp = TempDir::new("auditor-torn").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let c = cfg(tmp.path(), 1 << 20, 1 << 20, OnFull::RefuseAdmissions);
        let (a, task) = open(&c, &key, "start");
        let last = a.record_durable(call(1, 5)).await.unwrap();
        drop(a);
        task.await.unwrap();
        let seg: PathBuf = std::fs::read_dir(tmp.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
            f.write_all(&[1, 2, 3, 4, 5, 6, 7]).unwrap();
        }
        let (a, task) = open(&c, &key, "restart");
        let all = held(&a);
        let l = lifecycle(&all.last().unwrap().0);
        assert_eq!((l.recovered_seq, l.recovered_torn_bytes), (last, 7));
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_writes_stopping_and_a_final_checkpoint() {
        let tmp = TempDir::new("auditor-stop").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let c = cfg(tmp.path(), 1 << 20, 64 << 10, OnFull::RefuseAdmissions);
        let (a, task) = open(&c, &key, "start");
        for i in 0..5 {
            a.record(call(i, 5)).unwrap();
        }
        let other = a.clone();
        a.shutdown("SIGTERM").await.unwrap();
        task.await.unwrap();
        // Everything queued was written, then STOPPING, then a checkpoint
        // over all of it.
        let all = held(&other);
        assert_eq!(all.len(), 1 + 5 + 2);
        assert_chained(&all, 1, GENESIS);
        let l = lifecycle(&all[6].0);
        assert_eq!(
            (l.phase, l.reason.as_str()),
            (Phase::Stopping as i32, "SIGTERM")
        );
        assert_eq!(verify_checkpoint(&key, &all[7].0), 7);
        assert_eq!(*other.durable().borrow(), 8);
        assert!(matches!(other.record(call(9, 1)), Err(AuditError::Closed)));
        assert!(matches!(
            other.record_durable(call(9, 1)).await,
            Err(AuditError::Closed)
        ));
    }

    fn pressure_events(a: &Auditor) -> Vec<SpoolPressure> {
        held(a)
            .into_iter()
            .filter_map(|(e, _)| match e.body {
                Some(Body::SpoolPressure(p)) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn refuse_mode_goes_full_then_recovers_after_acknowledgements() {
        let tmp = TempDir::new("auditor-refuse").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let c = cfg(tmp.path(), 64 << 10, 4096, OnFull::RefuseAdmissions);
        let (a, task) = open(&c, &key, "start");
        let mut i = 0;
        while a.admissions_allowed() {
            assert!(
                a.record(cost()).is_ok(),
                "reports go in while there is room"
            );
            for _ in 0..9 {
                a.record(call(i, 200)).unwrap();
                i += 1;
            }
            a.record_durable(call(i, 200)).await.unwrap();
            assert!(i < 10_000, "the spool never filled");
        }
        let st = a.stats();
        assert!(st.full && st.spool_bytes >= 64 << 10, "{st:?}");
        // Deferrable reports are refused; their producers report later.
        assert!(matches!(a.record(cost()), Err(AuditError::Full)));
        assert_eq!(a.stats().deferred_records, 1);
        for _ in 0..3 {
            a.note_refused_admission();
        }
        eventually("SpoolPressure{full}", || {
            pressure_events(&a).iter().any(|p| p.full)
        })
        .await;
        let p = pressure_events(&a).into_iter().find(|p| p.full).unwrap();
        assert_eq!(
            (p.bytes_limit, p.on_full.as_str()),
            (64 << 10, "refuse_admissions")
        );
        assert!(p.bytes_used >= 64 << 10);
        // Other events still go in, into the reserve, up to the hard ceiling.
        let mut accepted = 0;
        loop {
            match a.record_durable(call(i, 200)).await {
                Ok(_) => accepted += 1,
                Err(AuditError::Full) => break,
                Err(e) => panic!("{e}"),
            }
            i += 1;
            assert!(accepted < 10_000, "no hard ceiling");
        }
        assert!(accepted > 0);
        let st = a.stats();
        assert!(
            st.spool_bytes >= (64 << 10) + 4096 && st.spool_bytes < (64 << 10) + 3 * 4096,
            "{st:?}"
        );
        assert_eq!(st.rejected_records, 1);

        // The collector catches up: trimmed, room again, and the refusals
        // are reported.
        let durable = *a.durable().borrow();
        a.acknowledged(durable);
        eventually("admissions allowed again", || a.admissions_allowed()).await;
        let st = a.stats();
        assert!(!st.full && st.spool_bytes < 64 << 10, "{st:?}");
        assert_eq!((st.acked_seq, st.refused_admissions), (durable, 3));
        eventually("SpoolPressure{full: false}", || {
            pressure_events(&a).iter().any(|p| !p.full)
        })
        .await;
        let p = pressure_events(&a).into_iter().find(|p| !p.full).unwrap();
        assert_eq!(p.refused_admissions, 3);
        assert!(a.record(cost()).is_ok());
        assert_chained(&held(&a), held(&a)[0].0.seq, {
            let first = &held(&a)[0].0;
            first.prev_hash.clone().try_into().unwrap()
        });
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drop_oldest_mode_declares_what_it_dropped() {
        let tmp = TempDir::new("auditor-dropold").unwrap();
        let key = Arc::new(NodeKey::generate().unwrap());
        let c = cfg(tmp.path(), 64 << 10, 4096, OnFull::DropOldest);
        let (a, task) = open(&c, &key, "start");
        let mut last = 0;
        for i in 0..400 {
            // ~300 bytes each: about 120 KiB in all, twice the bound.
            last = a.record_durable(call(i, 250)).await.unwrap();
            assert!(a.admissions_allowed());
        }
        // Let the gap events of the last drops be written.
        let last = a.record_durable(call(9999, 1)).await.unwrap().max(last);
        let all = held(&a);
        let st = a.stats();
        assert!(st.spool_bytes < 64 << 10, "{st:?}");
        assert!(st.dropped_events > 0 && !st.full);
        let first_held = all[0].0.seq;
        assert!(first_held > 1);
        let gaps: Vec<Gap> = all
            .iter()
            .filter_map(|(e, _)| match &e.body {
                Some(Body::Gap(g)) => Some(g.clone()),
                _ => None,
            })
            .collect();
        assert!(!gaps.is_empty());
        for g in &gaps {
            assert_eq!(g.reason, "spool full: oldest unsent events dropped");
            assert!(g.first_seq <= g.last_seq && g.last_seq < first_held);
        }
        // Every seq up to the last is either held or declared dropped.
        let held_seqs: std::collections::HashSet<u64> = all.iter().map(|(e, _)| e.seq).collect();
        for seq in 1..=last {
            assert!(
                held_seqs.contains(&seq)
                    || gaps.iter().any(|g| g.first_seq <= seq && seq <= g.last_seq),
                "seq {seq} neither held nor declared dropped"
            );
        }
        // The newest gap ends right before what the spool holds.
        assert_eq!(
            gaps.iter().map(|g| g.last_seq).max().unwrap() + 1,
            first_held
        );
        assert_chained(
            &all,
            first_held,
            all[0].0.prev_hash.clone().try_into().unwrap(),
        );
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_full_disk_degrades_then_the_same_events_are_written() {
        let disk = portcullis_testkit::TmpfsMount::new(64 << 10)
            .expect("mount a tmpfs (tests run as root)");
        let mnt = disk.path().to_path_buf();
        let key = Arc::new(NodeKey::generate().unwrap());
        // The bound is far above the disk: the disk fills first.
        let c = cfg(&mnt.join("spool"), 1 << 30, 8192, OnFull::RefuseAdmissions);
        let (a, task) = open(&c, &key, "start");
        let mut i = 0;
        let err = loop {
            match a.record_durable(call(i, 500)).await {
                Ok(_) => i += 1,
                Err(e) => break e,
            }
            assert!(i < 10_000, "the tmpfs never filled");
        };
        assert!(
            matches!(&err, AuditError::Spool(e) if e.is_disk_full()),
            "{err}"
        );
        assert!(!a.admissions_allowed());
        assert!(a.stats().degraded);
        assert!(matches!(a.record(cost()), Err(AuditError::Full)));
        let durable = *a.durable().borrow();
        // More events wait in memory meanwhile.
        a.record(call(50_000, 5)).unwrap();
        // The collector acknowledges: old segments go, the writer retries.
        a.acknowledged(durable);
        eventually("the failed events are written", || {
            !a.stats().degraded && a.stats().queued == 0
        })
        .await;
        assert!(a.admissions_allowed());
        let all = held(&a);
        assert_chained(
            &all,
            all[0].0.seq,
            all[0].0.prev_hash.clone().try_into().unwrap(),
        );
        let methods: Vec<String> = all
            .iter()
            .filter_map(|(e, _)| match &e.body {
                Some(Body::ControlCall(c)) if e.seq > durable => Some(c.method.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(methods, vec![format!("m{i}"), "m50000".to_string()]);
        a.shutdown("test").await.unwrap();
        task.await.unwrap();
    }
}
