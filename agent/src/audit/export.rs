//! Delivery of the audit trail to the collector (`portcullis.v1.Collector`).
//!
//! One task streams the spool to the collector over one gRPC stream at a
//! time: `Hello` → `Welcome{challenge}` → `Proof` (the node key signs the
//! challenge) → `Accepted{resume_after}` (the collector says nothing about
//! the node before it has proved its key) → `EventBatch`es of canonical
//! event bytes, while the
//! collector answers `Ack{persisted_through}` once a batch is durable on its
//! side. Up to `window_batches` batches are in flight unacknowledged, so
//! throughput is not bound by the round trip.
//!
//! What the exporter guarantees:
//! - the spool is trimmed (`EventSource::acknowledged`) only by an ack that
//!   covers events actually sent on the current stream and never goes
//!   backwards; anything else is a protocol violation: logged, counted, the
//!   stream dropped and retried after a backoff, nothing trimmed;
//! - after any disconnect or restart the exporter sends from the collector's
//!   `resume_after` (what the collector says it holds) again, so unacked
//!   events are re-sent and the collector de-duplicates by (node, seq);
//! - a collector that is unreachable, refuses, stalls (no ack for
//!   `ack_timeout` while batches are in flight) or breaks the protocol is
//!   retried with exponential backoff and full jitter (`Backoff`);
//! - plaintext (`http://`) goes only to loopback addresses unless
//!   `allow_plaintext`: checked in the config and again here on the resolved
//!   addresses, and the connection is made to the checked address itself;
//! - TLS is rustls with the ring provider (tonic's `tls-ring`), trusting only
//!   the configured CA; mTLS when a client certificate is configured.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use portcullis_proto::v1::{
    AgentMessage, CollectorMessage, Event, EventBatch, Hello, Proof, agent_message,
    collector_client::CollectorClient, collector_message,
};
use portcullis_trail::{chain, node_key::NodeKey};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tonic::{
    codegen::tokio_stream::wrappers::ReceiverStream,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri},
};

use crate::{
    audit::auditor::{AuditError, Auditor},
    config::{CollectorTarget, CollectorTls},
};

/// Stream protocol version sent in `Hello`.
pub const PROTOCOL: u32 = 2;
/// Largest canonical event the exporter sends. A larger event in the spool
/// is an error (logged, retried): it would not fit a collector's message
/// limit either.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Default soft bound on the event bytes in one batch (a batch always
/// carries at least one event).
pub const DEFAULT_BATCH_BYTES: usize = 1 << 20;
/// Largest message accepted from the collector (a Welcome or an Ack is a few
/// dozen bytes); anything bigger ends the stream as a protocol error.
pub const MAX_COLLECTOR_MESSAGE: usize = 64 * 1024;
/// Length of the collector's challenge (audit.proto: 32 random bytes).
const CHALLENGE_LEN: usize = 32;
/// Largest CA / certificate / key file read for TLS.
const MAX_PEM_FILE: u64 = 1 << 20;

/// The encoded size bound of an `AgentMessage` carrying one batch: what a
/// collector must accept (its max decoding message size) for batches built
/// with these limits.
pub fn max_batch_message_bytes(batch_max_events: usize, batch_bytes: usize) -> usize {
    // Each event costs its bytes plus a tag and a length varint (≤ 1 + 10),
    // the batch itself a tag and a length in the AgentMessage.
    batch_bytes + MAX_EVENT_BYTES + batch_max_events.saturating_mul(11) + 16
}

/// Where the exporter takes events from and reports acknowledgements to:
/// the auditor (spool). Methods are called from the exporter task;
/// `read_after` runs on a blocking thread.
pub trait EventSource: Send + Sync + 'static {
    type Error: std::fmt::Display + Send + 'static;
    /// Highest sequence number that is durable (fsynced) in the spool.
    fn durable(&self) -> watch::Receiver<u64>;
    /// Canonical encodings of the events after `seq`, in sequence order, at
    /// most `max_events`; from the oldest held event when `seq` is below it.
    fn read_after(&self, seq: u64, max_events: usize) -> Result<Vec<Vec<u8>>, Self::Error>;
    /// The collector has persisted every event through `seq`: trim.
    fn acknowledged(&self, seq: u64);
    fn node_id(&self) -> &str;
    fn public_key(&self) -> [u8; 32];
}

impl EventSource for Auditor {
    type Error = AuditError;
    fn durable(&self) -> watch::Receiver<u64> {
        Auditor::durable(self)
    }
    fn read_after(&self, seq: u64, max_events: usize) -> Result<Vec<Vec<u8>>, AuditError> {
        Auditor::read_after(self, seq, max_events)
    }
    fn acknowledged(&self, seq: u64) {
        Auditor::acknowledged(self, seq)
    }
    fn node_id(&self) -> &str {
        Auditor::node_id(self)
    }
    fn public_key(&self) -> [u8; 32] {
        Auditor::public_key(self)
    }
}

/// Reconnect delays: exponential growth with full jitter above a small
/// floor. Attempt `n` (0 after a healthy connection) waits
/// `floor + uniform(0, min(cap, base * 2^n))`, so many agents cut off by one
/// collector restart do not come back in step, and no agent retries faster
/// than once per `floor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub floor: Duration,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            floor: Duration::from_millis(50),
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The jitter range of attempt `n`: `min(cap, base * 2^n)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before attempt `n` for a uniformly random `random`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let span = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == u64::MAX {
            random
        } else {
            random % (span + 1)
        };
        self.floor + Duration::from_nanos(jitter)
    }

    /// The delay before attempt `n`, drawn from the system random generator.
    pub fn next_delay(&self, attempt: u32, rng: &ring::rand::SystemRandom) -> Duration {
        // If the generator fails (it does not on Linux), the middle of the
        // range still backs off.
        let random = ring::rand::generate::<[u8; 8]>(rng)
            .map(|r| u64::from_le_bytes(r.expose()))
            .unwrap_or(u64::MAX / 2);
        self.delay(attempt, random)
    }
}

/// Tuning of the exporter; `Default` is what the agent uses.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub backoff: Backoff,
    /// A connection that lasted this long, or on which the collector
    /// acknowledged something, resets the backoff.
    pub healthy_after: Duration,
    /// TCP connect and TLS handshake.
    pub connect_timeout: Duration,
    /// From opening the stream to the collector's `Welcome`.
    pub handshake_timeout: Duration,
    /// Batches in flight with no ack progress for this long: the collector
    /// is stalled; drop the stream and reconnect.
    pub ack_timeout: Duration,
    /// Unacknowledged batches in flight at most.
    pub window_batches: usize,
    /// Soft bound on the event bytes per batch.
    pub batch_bytes: usize,
    /// HTTP/2 keepalive ping interval (a dead peer is noticed while idle).
    pub keepalive: Duration,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            backoff: Backoff::default(),
            healthy_after: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(60),
            window_batches: 8,
            batch_bytes: DEFAULT_BATCH_BYTES,
            keepalive: Duration::from_secs(30),
        }
    }
}

/// Why a stream to the collector ended (every one is retried after a
/// backoff).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("collector endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error(
        "collector endpoint {endpoint:?} resolves to {addrs} only, none of them loopback: \
         refusing to send audit events unencrypted off this host (use https://, or set \
         allow_plaintext = true if the network is trusted)"
    )]
    PlaintextRefused { endpoint: String, addrs: String },
    #[error("collector TLS: {0}")]
    Tls(String),
    #[error("connecting to the collector: {0}")]
    Connect(String),
    #[error("collector stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("collector broke the protocol: {0}")]
    Protocol(String),
    #[error("collector stalled: no acknowledgement for {0:?} with batches in flight")]
    Stalled(Duration),
    #[error("collector did not answer Hello within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("collector closed the stream")]
    Closed,
    #[error("reading the audit spool: {0}")]
    Source(String),
}

/// What the exporter is doing, for `agent status` and logs. Shared with the
/// exporter task; read it any time.
#[derive(Debug, Default)]
pub struct ExportStatus {
    connected: AtomicBool,
    /// Highest seq the collector acknowledged (this process's lifetime).
    acked_seq: AtomicU64,
    /// Highest seq sent on any stream.
    sent_seq: AtomicU64,
    /// Streams that completed the handshake.
    sessions: AtomicU64,
    /// Connection attempts after the first.
    reconnects: AtomicU64,
    /// Streams or attempts that ended in an error.
    failures: AtomicU64,
    /// Of those, protocol violations by the collector (bogus acks, messages
    /// out of order, oversize messages).
    protocol_errors: AtomicU64,
    /// The delay chosen before the latest reconnect, milliseconds.
    last_backoff_ms: AtomicU64,
    /// Events per batch in force (the configured bound unless the collector
    /// refused batches that large).
    batch_events: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A consistent-enough copy of `ExportStatus`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportSnapshot {
    pub connected: bool,
    pub acked_seq: u64,
    pub sent_seq: u64,
    pub sessions: u64,
    pub reconnects: u64,
    pub failures: u64,
    pub protocol_errors: u64,
    pub last_backoff_ms: u64,
    pub batch_events: u64,
    pub last_error: Option<String>,
}

impl ExportStatus {
    pub fn new() -> Arc<ExportStatus> {
        Arc::new(ExportStatus::default())
    }

    pub fn snapshot(&self) -> ExportSnapshot {
        ExportSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            acked_seq: self.acked_seq.load(Ordering::Relaxed),
            sent_seq: self.sent_seq.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            protocol_errors: self.protocol_errors.load(Ordering::Relaxed),
            last_backoff_ms: self.last_backoff_ms.load(Ordering::Relaxed),
            batch_events: self.batch_events.load(Ordering::Relaxed),
            last_error: self.last_error.lock().map(|e| e.clone()).unwrap_or(None),
        }
    }

    fn record_error(&self, e: &ExportError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if matches!(e, ExportError::Protocol(_)) {
            self.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(e.to_string());
        }
    }
}

/// The batch bounds in force: the configured ones, halved each time the
/// collector refuses a batch as too large (a collector configured with a
/// lower limit than the agent must not stall delivery for good).
#[derive(Clone, Copy, Debug)]
struct BatchLimits {
    events: usize,
    bytes: usize,
}

impl BatchLimits {
    /// Smallest byte bound shrinking goes to (a batch still carries at least
    /// one event whatever its size).
    const MIN_BYTES: usize = 4096;

    /// Halves both bounds; false when already at the minimum.
    fn shrink(&mut self) -> bool {
        let before = (self.events, self.bytes);
        self.events = (self.events / 2).max(1);
        self.bytes = (self.bytes / 2).max(Self::MIN_BYTES.min(self.bytes));
        (self.events, self.bytes) != before
    }
}

/// The collector ended the stream saying a message was invalid or too big:
/// the likely cause is a batch over its limits.
fn refused_batch(e: &ExportError) -> bool {
    matches!(
        e,
        ExportError::Status(s) if matches!(
            s.code(),
            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        )
    )
}

/// How a stream ended without an error.
enum End {
    Shutdown,
    /// The event source is gone (its durable watch closed) and everything
    /// it made durable was acknowledged.
    SourceClosed,
}

/// Streams `source` to the collector at `target` until `shutdown` turns
/// true (or its sender is dropped), or until the source has closed (the
/// auditor shut down) and everything it made durable was acknowledged.
/// Never returns early on errors: each is logged, counted in `status`, and
/// retried after a backoff. Dropping the future at any await point is also
/// safe: unacknowledged events stay in the spool and are sent by the next
/// run.
///
/// Agent stop: `auditor.shutdown(..)` (STOPPING and a final checkpoint
/// become durable), then give this task a bounded time to drain
/// (`tokio::time::timeout(d, handle)`), then send `true` on `shutdown` and
/// await it; it returns promptly.
pub async fn run<S: EventSource>(
    source: Arc<S>,
    key: Arc<NodeKey>,
    target: CollectorTarget,
    shutdown: watch::Receiver<bool>,
    status: Arc<ExportStatus>,
) {
    run_with(
        source,
        key,
        target,
        shutdown,
        status,
        ExportOptions::default(),
    )
    .await
}

/// `run` with explicit tuning (tests use short timeouts and backoffs).
pub async fn run_with<S: EventSource>(
    source: Arc<S>,
    key: Arc<NodeKey>,
    target: CollectorTarget,
    mut shutdown: watch::Receiver<bool>,
    status: Arc<ExportStatus>,
    opts: ExportOptions,
) {
    let rng = ring::rand::SystemRandom::new();
    let mut attempt: u32 = 0;
    let mut limits = BatchLimits {
        events: target.batch_max_events.max(1),
        bytes: opts.batch_bytes.max(1),
    };
    status
        .batch_events
        .store(limits.events as u64, Ordering::Relaxed);
    let mut first = true;
    if key.public_key() != source.public_key() {
        tracing::error!(
            event = "audit_export_key_mismatch",
            "the key given to the exporter is not the audit source's node key; \
             the collector will refuse every Proof"
        );
    }
    tracing::info!(
        event = "audit_export_start",
        endpoint = %target.endpoint,
        tls = target.tls.is_some(),
        "streaming audit events to the collector"
    );
    loop {
        if *shutdown.borrow() {
            break;
        }
        if !first {
            status.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let started = Instant::now();
        let mut progressed = false;
        let outcome = tokio::select! {
            r = session(&source, &key, &target, &opts, limits, &status, &mut progressed) => r,
            _ = stopped(&mut shutdown) => Ok(End::Shutdown),
        };
        status.connected.store(false, Ordering::Relaxed);
        match outcome {
            Ok(End::Shutdown) => break,
            Ok(End::SourceClosed) => {
                tracing::info!(
                    event = "audit_export_drained",
                    acked = status.acked_seq.load(Ordering::Relaxed),
                    "audit source closed and everything durable was acknowledged; exporter stops"
                );
                return;
            }
            Err(e) => {
                status.record_error(&e);
                if refused_batch(&e) && limits.shrink() {
                    status
                        .batch_events
                        .store(limits.events as u64, Ordering::Relaxed);
                    tracing::warn!(
                        event = "audit_export_batch_shrunk",
                        batch_events = limits.events,
                        batch_bytes = limits.bytes,
                        error = %e,
                        "the collector refused a batch; sending smaller batches \
                         (align audit.collector.batch_max_events with the collector's limit)"
                    );
                }
                if progressed || started.elapsed() >= opts.healthy_after {
                    attempt = 0;
                }
                let delay = opts.backoff.next_delay(attempt, &rng);
                attempt = attempt.saturating_add(1);
                status.last_backoff_ms.store(
                    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                if matches!(e, ExportError::Protocol(_)) {
                    tracing::error!(
                        event = "audit_export_protocol_error",
                        endpoint = %target.endpoint,
                        error = %e,
                        retry_ms = delay.as_millis() as u64,
                        "collector broke the stream protocol; nothing trimmed, reconnecting"
                    );
                } else {
                    tracing::warn!(
                        event = "audit_export_disconnected",
                        endpoint = %target.endpoint,
                        error = %e,
                        retry_ms = delay.as_millis() as u64,
                        "audit stream to the collector ended; reconnecting"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut shutdown) => break,
                }
            }
        }
    }
    tracing::info!(event = "audit_export_stop", "audit exporter stopped");
}

/// Resolves when shutdown is requested or its sender is gone.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&v| v).await;
}

/// One connection: connect, handshake, stream until an error or the source
/// closes.
async fn session<S: EventSource>(
    source: &Arc<S>,
    key: &NodeKey,
    target: &CollectorTarget,
    opts: &ExportOptions,
    limits: BatchLimits,
    status: &ExportStatus,
    progressed: &mut bool,
) -> Result<End, ExportError> {
    let channel = connect(target, opts).await?;
    let mut client = CollectorClient::new(channel)
        .max_decoding_message_size(MAX_COLLECTOR_MESSAGE)
        .max_encoding_message_size(max_batch_message_bytes(limits.events, limits.bytes));

    let window = opts.window_batches.max(1);
    // Room for Hello, Proof and a full window: sends never wait on the
    // channel, so flow control shows up as missing acks (ack_timeout).
    let (tx, rx) = mpsc::channel::<AgentMessage>(window + 2);
    let send = |msg: agent_message::Msg| {
        tx.try_send(AgentMessage { msg: Some(msg) })
            .map_err(|_| ExportError::Closed)
    };
    send(agent_message::Msg::Hello(Hello {
        protocol: PROTOCOL,
        node_id: source.node_id().to_owned(),
        public_key: source.public_key().to_vec(),
    }))?;

    let hs = opts.handshake_timeout;
    let welcome = tokio::time::timeout(hs, async {
        let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?;
        Ok::<_, tonic::Status>((inbound, first))
    })
    .await
    .map_err(|_| ExportError::HandshakeTimeout(hs))?;
    let (mut inbound, first) = welcome.map_err(classify)?;
    let Some(first) = first else {
        return Err(ExportError::Closed);
    };
    let welcome = match first.msg {
        Some(collector_message::Msg::Welcome(w)) => w,
        Some(collector_message::Msg::Ack(a)) => {
            return Err(ExportError::Protocol(format!(
                "Ack(persisted_through {}) before Welcome",
                a.persisted_through
            )));
        }
        Some(collector_message::Msg::Accepted(_)) => {
            return Err(ExportError::Protocol("Accepted before Welcome".into()));
        }
        None => {
            return Err(ExportError::Protocol(
                "an empty CollectorMessage instead of Welcome".into(),
            ));
        }
    };
    if welcome.challenge.len() != CHALLENGE_LEN {
        return Err(ExportError::Protocol(format!(
            "Welcome challenge is {} bytes, not {CHALLENGE_LEN}",
            welcome.challenge.len()
        )));
    }
    let sig = key.sign(&chain::hello_message(source.node_id(), &welcome.challenge));
    if send(agent_message::Msg::Proof(Proof {
        signature: sig.to_vec(),
    }))
    .is_err()
    {
        return Err(why_closed(&mut inbound).await);
    }
    // Only once the proof is accepted does the collector say what it holds.
    let accepted = tokio::time::timeout(hs, inbound.message())
        .await
        .map_err(|_| ExportError::HandshakeTimeout(hs))?
        .map_err(classify)?;
    let accepted = match accepted.and_then(|m| m.msg) {
        Some(collector_message::Msg::Accepted(a)) => a,
        Some(other) => {
            return Err(ExportError::Protocol(format!(
                "expected Accepted after the Proof, got {other:?}"
            )));
        }
        None => return Err(ExportError::Closed),
    };
    let mut durable = source.durable();
    let durable_now = *durable.borrow_and_update();
    let resume_after = accepted.resume_after;
    if resume_after > durable_now {
        return Err(ExportError::Protocol(format!(
            "the collector says it holds events through seq {resume_after}, but this \
             node has sealed only through {durable_now}"
        )));
    }
    if accepted.trust == "tofu" {
        tracing::warn!(
            event = "audit_export_tofu",
            "the collector trusts this node's key on first use only; enroll it on the collector (portcullis collector enroll)"
        );
    }
    status.connected.store(true, Ordering::Relaxed);
    status.sessions.fetch_add(1, Ordering::Relaxed);
    let acked_before = status.acked_seq.load(Ordering::Relaxed);
    if resume_after < acked_before {
        tracing::warn!(
            event = "audit_export_collector_behind",
            resume_after,
            acked = acked_before,
            "the collector holds less than it acknowledged before (restored or replaced?); \
             re-sending what the spool still holds"
        );
    }
    tracing::info!(
        event = "audit_export_connected",
        endpoint = %target.endpoint,
        resume_after,
        durable = durable_now,
        "connected to the collector"
    );

    // Acks are valid in acked..=sent; both start at what the collector holds.
    let mut acked = resume_after;
    let mut sent = resume_after;
    let mut inflight: VecDeque<u64> = VecDeque::new();
    let mut pending: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut last_progress = Instant::now();
    let mut caught_up;
    // The source stopped (auditor shut down): deliver what is durable, wait
    // for its acks, then end.
    let mut source_closed = false;

    loop {
        // Fill the window.
        caught_up = false;
        while inflight.len() < window {
            if pending.is_empty() {
                let limit = *durable.borrow_and_update();
                if limit <= sent {
                    caught_up = true;
                    break;
                }
                let events = read(source, sent, limits.events).await?;
                let mut prev = sent;
                for bytes in events {
                    let seq = event_seq(&bytes).ok_or_else(|| {
                        ExportError::Source(format!(
                            "an event after seq {prev} does not decode as an Event"
                        ))
                    })?;
                    if seq <= prev {
                        return Err(ExportError::Source(format!(
                            "events out of order: seq {seq} after {prev}"
                        )));
                    }
                    if seq > limit {
                        break;
                    }
                    if bytes.len() > MAX_EVENT_BYTES {
                        return Err(ExportError::Source(format!(
                            "event seq {seq} is {} bytes, over the {MAX_EVENT_BYTES}-byte limit",
                            bytes.len()
                        )));
                    }
                    prev = seq;
                    pending.push_back((seq, bytes));
                }
                if pending.is_empty() {
                    caught_up = true;
                    break;
                }
            }
            let mut batch = Vec::new();
            let mut bytes_in = 0usize;
            let mut last = sent;
            while let Some((seq, ev)) = pending.front() {
                if !batch.is_empty()
                    && (batch.len() >= limits.events || bytes_in + ev.len() > limits.bytes)
                {
                    break;
                }
                bytes_in += ev.len();
                last = *seq;
                let (_, ev) = pending.pop_front().unwrap_or_default();
                batch.push(ev);
            }
            if inflight.is_empty() {
                last_progress = Instant::now();
            }
            tracing::debug!(
                first = sent + 1,
                last,
                events = batch.len(),
                "audit batch sent"
            );
            if send(agent_message::Msg::Batch(EventBatch { events: batch })).is_err() {
                return Err(why_closed(&mut inbound).await);
            }
            inflight.push_back(last);
            sent = last;
            status.sent_seq.fetch_max(sent, Ordering::Relaxed);
        }

        if caught_up && source_closed && inflight.is_empty() {
            return Ok(End::SourceClosed);
        }
        let deadline = last_progress + opts.ack_timeout;
        tokio::select! {
            msg = inbound.message() => {
                let msg = msg.map_err(classify)?.ok_or(ExportError::Closed)?;
                match msg.msg {
                    Some(collector_message::Msg::Ack(a)) => {
                        let n = a.persisted_through;
                        if n < acked {
                            return Err(ExportError::Protocol(format!(
                                "ack went backwards: persisted_through {n} after {acked}"
                            )));
                        }
                        if n > sent {
                            return Err(ExportError::Protocol(format!(
                                "ack for seq {n}, but only events through {sent} were sent"
                            )));
                        }
                        tracing::debug!(persisted_through = n, "audit batch acknowledged");
                        if n > acked {
                            acked = n;
                            source.acknowledged(n);
                            status.acked_seq.fetch_max(n, Ordering::Relaxed);
                            while inflight.front().is_some_and(|&last| last <= n) {
                                inflight.pop_front();
                            }
                            last_progress = Instant::now();
                            *progressed = true;
                        }
                    }
                    Some(collector_message::Msg::Welcome(_) | collector_message::Msg::Accepted(_)) => {
                        return Err(ExportError::Protocol("a second Welcome or Accepted".into()));
                    }
                    None => {
                        return Err(ExportError::Protocol("an empty CollectorMessage".into()));
                    }
                }
            }
            r = durable.changed(), if caught_up && !source_closed => {
                if r.is_err() {
                    source_closed = true;
                }
            }
            _ = tokio::time::sleep_until(deadline.into()), if !inflight.is_empty() => {
                return Err(ExportError::Stalled(opts.ack_timeout));
            }
        }
    }
}

/// A status from this side's decoder (a collector message over
/// `MAX_COLLECTOR_MESSAGE`, or not a `CollectorMessage`) is the collector's
/// fault: a protocol violation. Statuses the collector sent stay statuses.
fn classify(s: tonic::Status) -> ExportError {
    let m = s.message();
    let oversize = matches!(
        s.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) && m.contains(&format!("limit is: {MAX_COLLECTOR_MESSAGE} bytes"));
    let undecodable =
        s.code() == tonic::Code::Internal && s.metadata().is_empty() && m.contains("decod");
    if oversize || undecodable {
        ExportError::Protocol(format!("undecodable or oversize message: {m}"))
    } else {
        ExportError::Status(s)
    }
}

/// The outgoing half closed under us: the collector ended the stream. Its
/// status says why (a refused batch, a shutdown); wait briefly for it.
/// Acks still in the pipe are dropped, not applied: the next stream resumes
/// from what the collector says it holds.
async fn why_closed(inbound: &mut tonic::Streaming<CollectorMessage>) -> ExportError {
    let reason = async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return ExportError::Closed,
                Err(s) => return classify(s),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), reason)
        .await
        .unwrap_or(ExportError::Closed)
}

/// Reads the next events from the source off the async runtime.
async fn read<S: EventSource>(
    source: &Arc<S>,
    after: u64,
    max: usize,
) -> Result<Vec<Vec<u8>>, ExportError> {
    let src = Arc::clone(source);
    tokio::task::spawn_blocking(move || src.read_after(after, max.max(1)))
        .await
        .map_err(|e| ExportError::Source(format!("spool reader task: {e}")))?
        .map_err(|e| ExportError::Source(e.to_string()))
}

/// The sequence number of a canonical event: field 1, which prost writes
/// first; anything else is decoded in full.
pub fn event_seq(bytes: &[u8]) -> Option<u64> {
    if bytes.first() == Some(&0x08) {
        let mut v: u64 = 0;
        for (i, &b) in bytes[1..].iter().take(10).enumerate() {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return (v != 0).then_some(v);
            }
        }
        return None;
    }
    Event::decode(bytes).ok().map(|e| e.seq).filter(|&s| s != 0)
}

/// Connects to the collector: TLS per the config for https://; for http://,
/// only to loopback addresses unless plaintext is allowed.
async fn connect(target: &CollectorTarget, opts: &ExportOptions) -> Result<Channel, ExportError> {
    let bad = |reason: String| ExportError::Endpoint {
        endpoint: target.endpoint.clone(),
        reason,
    };
    let uri: Uri = target
        .endpoint
        .parse()
        .map_err(|e| bad(format!("not a URI: {e}")))?;
    let tune = |ep: Endpoint| {
        ep.connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(opts.keepalive)
            .keep_alive_timeout(opts.keepalive)
            .keep_alive_while_idle(true)
    };
    match (uri.scheme_str(), &target.tls) {
        (Some("https"), Some(tls)) => {
            let cfg = client_tls(tls, opts.connect_timeout)?;
            let ep = tune(Endpoint::from(uri))
                .tls_config(cfg)
                .map_err(|e| ExportError::Tls(error_chain(&e)))?;
            ep.connect()
                .await
                .map_err(|e| ExportError::Connect(error_chain(&e)))
        }
        (Some("https"), None) => Err(bad("https:// needs a ca_file".into())),
        (Some("http"), None) => {
            let host = uri
                .host()
                .ok_or_else(|| bad("no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().ok_or_else(|| bad("no port".into()))?;
            if target.allow_plaintext {
                return tune(Endpoint::from(uri))
                    .connect()
                    .await
                    .map_err(|e| ExportError::Connect(error_chain(&e)));
            }
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| ExportError::Connect(format!("resolving {host}: {e}")))?
                .collect();
            let (loopback, other): (Vec<SocketAddr>, Vec<SocketAddr>) =
                resolved.iter().copied().partition(|a| a.ip().is_loopback());
            if loopback.is_empty() {
                let addrs = resolved
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ExportError::PlaintextRefused {
                    endpoint: target.endpoint.clone(),
                    addrs: if addrs.is_empty() {
                        "nothing".into()
                    } else {
                        addrs
                    },
                });
            }
            if !other.is_empty() {
                tracing::warn!(
                    event = "audit_export_plaintext_filtered",
                    endpoint = %target.endpoint,
                    skipped = ?other,
                    "plaintext collector host also resolves to non-loopback addresses; using loopback only"
                );
            }
            let mut last = None;
            for addr in loopback {
                // Connect to the checked address itself, keeping the
                // configured authority for the request.
                let ep = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| bad(e.to_string()))?
                    .origin(uri.clone());
                match tune(ep).connect().await {
                    Ok(ch) => return Ok(ch),
                    Err(e) => last = Some(format!("{addr}: {}", error_chain(&e))),
                }
            }
            Err(ExportError::Connect(last.unwrap_or_default()))
        }
        (Some("http"), Some(_)) => Err(bad(
            "TLS settings with an http:// endpoint; use https://".into()
        )),
        _ => Err(bad("the scheme must be https or http".into())),
    }
}

/// rustls client config from the configured files: the CA to trust (only
/// it), an optional server-name override and an optional client identity.
fn client_tls(tls: &CollectorTls, timeout: Duration) -> Result<ClientTlsConfig, ExportError> {
    let ca = read_pem(&tls.ca_file)?;
    if !contains_pem(&ca, "CERTIFICATE") {
        return Err(ExportError::Tls(format!(
            "ca_file {}: no PEM CERTIFICATE block",
            tls.ca_file.display()
        )));
    }
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .timeout(timeout);
    if let Some(name) = &tls.server_name {
        cfg = cfg.domain_name(name.clone());
    }
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = read_pem(cert)?;
            let key_pem = read_pem(key)?;
            if !contains_pem(&cert_pem, "CERTIFICATE") {
                return Err(ExportError::Tls(format!(
                    "client_cert {}: no PEM CERTIFICATE block",
                    cert.display()
                )));
            }
            if !contains_pem(&key_pem, "PRIVATE KEY") {
                return Err(ExportError::Tls(format!(
                    "client_key {}: no PEM private key block",
                    key.display()
                )));
            }
            cfg = cfg.identity(Identity::from_pem(cert_pem, key_pem));
        }
        (None, None) => {}
        _ => {
            return Err(ExportError::Tls(
                "mTLS needs both client_cert and client_key".into(),
            ));
        }
    }
    Ok(cfg)
}

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, ExportError> {
    use std::io::Read as _;
    let err = |e: std::io::Error| ExportError::Tls(format!("{}: {e}", path.display()));
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(MAX_PEM_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_PEM_FILE {
        return Err(ExportError::Tls(format!(
            "{}: larger than {MAX_PEM_FILE} bytes; not a PEM file",
            path.display()
        )));
    }
    Ok(buf)
}

/// True when `pem` has a `-----BEGIN ...<label>-----` line.
fn contains_pem(pem: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(pem)
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")))
}

/// An error with its sources, for one log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter_above_the_floor() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(5), Duration::from_millis(3200));
        assert_eq!(b.ceiling(9), Duration::from_secs(30));
        assert_eq!(b.ceiling(200), Duration::from_secs(30));
        for n in [0, 1, 4, 9, 64, u32::MAX] {
            assert_eq!(b.delay(n, 0), b.floor);
            assert_eq!(
                b.delay(n, b.ceiling(n).as_nanos() as u64),
                b.floor + b.ceiling(n)
            );
            assert!(b.delay(n, u64::MAX) <= b.floor + b.ceiling(n));
        }
        // Drawn delays spread over the range rather than repeating one value.
        let rng = ring::rand::SystemRandom::new();
        let draws: Vec<Duration> = (0..64).map(|_| b.next_delay(8, &rng)).collect();
        assert!(
            draws
                .iter()
                .all(|d| *d >= b.floor && *d <= b.floor + b.ceiling(8))
        );
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 32, "{distinct:?}");
        let mean = draws.iter().sum::<Duration>() / 64;
        assert!(mean > b.floor + b.ceiling(8) / 4 && mean < b.floor + b.ceiling(8) * 3 / 4);
    }

    #[test]
    fn event_seq_reads_field_one() {
        for seq in [1u64, 127, 128, 300, u64::MAX] {
            let ev = Event {
                seq,
                node_id: "n".into(),
                ..Default::default()
            };
            assert_eq!(event_seq(&ev.encode_to_vec()), Some(seq));
        }
        assert_eq!(event_seq(&[]), None);
        assert_eq!(event_seq(&[0x08, 0x80]), None);
        assert_eq!(event_seq(&[0x08, 0x00]), None);
        // Field 3 first (a foreign encoder's order): decoded in full.
        let mut odd = Vec::new();
        prost::encoding::string::encode(3, &"n".to_owned(), &mut odd);
        prost::encoding::uint64::encode(1, &42, &mut odd);
        assert_eq!(event_seq(&odd), Some(42));
    }

    #[test]
    fn pem_labels() {
        assert!(contains_pem(
            b"x\n-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n",
            "CERTIFICATE"
        ));
        assert!(contains_pem(
            b"-----BEGIN EC PRIVATE KEY-----\n",
            "PRIVATE KEY"
        ));
        assert!(!contains_pem(b"garbage", "CERTIFICATE"));
    }
}
