//! The knock service: the one path from a datagram to an admission.
//!
//! 1. check: every decision of `agent/src/admission/admitter.rs`;
//! 2. durable: the grant's record is in the audit spool (fsynced, shared
//!    with concurrent grants: group commit) before anything changes;
//! 3. commit: the kernel admission, written by `agent/src/enforce/`;
//! 4. reply: a node-signed reply, sent only on success (silence
//!    otherwise); the listener signs it while step 2's fsync runs.
//!
//! The listener, the admission tests and `cargo xtask bench admission` all
//! run [`KnockService::handle`] (the listener splits it at the point where
//! a decided knock is finished in its own task), so a published latency is
//! the latency of this path.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use portcullis_proto::v1::{self, event::Body};
use portcullis_trail::node_key::NodeKey;
use tokio::net::UdpSocket;

use crate::{
    admission::{
        admitter::{Admitter, Decided},
        refusal::{Attempt, Denied, Refusal},
    },
    audit::auditor::Auditor,
    enforce::{Admission, AdmitError, Enforcer},
};

/// Why a knock was refused, whoever refused it.
#[derive(Debug, thiserror::Error)]
pub enum KnockRefusal {
    /// Admission decided against it.
    #[error(transparent)]
    Denied(#[from] Refusal),
    /// The kernel could not take the admission.
    #[error(transparent)]
    Kernel(#[from] AdmitError),
    /// The audit spool is full (`audit.on_full = "refuse_admissions"`): no
    /// admission is granted that could not be recorded.
    #[error("the audit spool is full; new admissions are refused until the collector catches up")]
    AuditFull,
    /// The grant could not be made durable in the audit spool.
    #[error("the admission could not be recorded in the audit spool: {0}")]
    AuditFailed(String),
}

impl KnockRefusal {
    /// Stable snake_case name, for counters and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            KnockRefusal::Denied(r) => r.reason(),
            KnockRefusal::Kernel(e) => e.reason(),
            KnockRefusal::AuditFull => "audit_spool_full",
            KnockRefusal::AuditFailed(_) => "audit_write_failed",
        }
    }

    /// Operator problems (as opposed to a client's bad knock).
    fn is_operator_problem(&self) -> bool {
        matches!(
            self,
            KnockRefusal::Kernel(_) | KnockRefusal::AuditFull | KnockRefusal::AuditFailed(_)
        )
    }
}

/// A refused knock and, once its token verified, who it was.
#[derive(Debug, thiserror::Error)]
#[error("{refusal}")]
pub struct Refused {
    pub refusal: KnockRefusal,
    pub attempt: Option<Box<Attempt>>,
}

impl Refused {
    pub fn reason(&self) -> &'static str {
        self.refusal.reason()
    }

    /// The audit record of this refusal: `None` for pre-authentication
    /// refusals (no verified identity to attribute it to).
    pub fn audit_event(&self) -> Option<v1::AdmissionDenied> {
        let a = self.attempt.as_ref()?;
        Some(a.denied_event(self.reason(), self.refusal.to_string()))
    }

    fn after(d: &Decided, refusal: KnockRefusal) -> Refused {
        Refused {
            refusal,
            attempt: Some(Box::new(d.attempt())),
        }
    }
}

impl From<Denied> for Refused {
    fn from(d: Denied) -> Self {
        Refused {
            refusal: d.refusal.into(),
            attempt: d.attempt,
        }
    }
}

/// A granted admission: what the agent logs and replies with.
#[derive(Debug, Clone)]
pub struct Granted {
    pub subject: String,
    pub tenant: Option<String>,
    pub service: String,
    pub source: IpAddr,
    pub source_port: u16,
    pub expires: SystemTime,
    pub slot: u32,
    /// SHA-256 of the token's `jti`: never the token itself.
    pub jti_hash: [u8; 32],
    /// The knock's nonce and size, for the reply.
    pub nonce: [u8; 16],
    pub request_len: usize,
    /// The policies that permitted it, and the policy set's version.
    pub policies: Vec<String>,
    pub policy_version: String,
}

impl Granted {
    fn of(d: Decided, slot: u32) -> Granted {
        Granted {
            subject: d.subject().to_string(),
            tenant: d.tenant().map(str::to_string),
            jti_hash: d.jti_hash(),
            service: d.service,
            source: d.source,
            source_port: d.source_port,
            expires: d.expires,
            slot,
            nonce: d.nonce,
            request_len: d.request_len,
            policies: d.policies,
            policy_version: d.policy_version,
        }
    }
}

/// Refusals counted by reason since start, and grants.
#[derive(Default)]
pub struct Counters {
    by_reason: Mutex<HashMap<&'static str, u64>>,
    pub granted: AtomicU64,
}

impl Counters {
    fn refused(&self, reason: &'static str) {
        if let Ok(mut m) = self.by_reason.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = match self.by_reason.lock() {
            Ok(m) => m.iter().map(|(k, v)| (*k, *v)).collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }
}

/// The knock path: admission's decisions, the audit trail, the kernel.
pub struct KnockService {
    admitter: Arc<Admitter>,
    enforcer: Arc<Enforcer>,
    auditor: Auditor,
    node: Arc<NodeKey>,
    /// `knock.reply`: answer granted knocks.
    reply: bool,
    counters: Counters,
}

impl KnockService {
    pub fn new(
        admitter: Arc<Admitter>,
        enforcer: Arc<Enforcer>,
        auditor: Auditor,
        node: Arc<NodeKey>,
        reply: bool,
    ) -> KnockService {
        KnockService {
            admitter,
            enforcer,
            auditor,
            node,
            reply,
            counters: Counters::default(),
        }
    }

    pub fn admitter(&self) -> &Arc<Admitter> {
        &self.admitter
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// One datagram from `peer`, start to finish: check, durable record,
    /// kernel write. A refusal is counted and, once the token verified,
    /// audited.
    pub async fn handle(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Granted, Refused> {
        let decided = self.check(datagram, peer, now)?;
        self.finish(decided).await
    }

    /// The control API's `Admit`: the knock's decisions for a token a
    /// gateway presents for `source`, then the same durable record and
    /// kernel write as a knock ([`finish`](Self::finish)).
    pub async fn admit_rpc(
        &self,
        token: &str,
        service: &str,
        source: IpAddr,
        source_port: u16,
        now: SystemTime,
    ) -> Result<Granted, Refused> {
        let decided = self
            .admitter
            .check_rpc(token, service, source, source_port, now)
            .map_err(|d| self.refused(d.into()))?;
        if !self.auditor.admissions_allowed() {
            self.auditor.note_refused_admission();
            self.counters.refused(KnockRefusal::AuditFull.reason());
            return Err(Refused::after(&decided, KnockRefusal::AuditFull));
        }
        self.finish(decided).await
    }

    /// Step 1: the decision, and the spool's room for its record. Cheap
    /// enough to run in the receive loop.
    pub fn check(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Decided, Refused> {
        let decided = self
            .admitter
            .check(datagram, peer, now)
            .map_err(|d| self.refused(d.into()))?;
        if !self.auditor.admissions_allowed() {
            // Counted in the spool-pressure event that clears the
            // condition; not one event per refusal into a full spool.
            self.auditor.note_refused_admission();
            self.counters.refused(KnockRefusal::AuditFull.reason());
            return Err(Refused::after(&decided, KnockRefusal::AuditFull));
        }
        Ok(decided)
    }

    /// Steps 2 and 3: reserve the identity's quota, make the grant's
    /// record durable, then write the kernel. Concurrent calls share one
    /// fsync.
    pub async fn finish(&self, decided: Decided) -> Result<Granted, Refused> {
        self.finish_overlapped(decided, |_| ())
            .await
            .map(|(g, ())| g)
    }

    /// [`finish`](Self::finish), running `meanwhile` while the writer
    /// fsyncs the grant's record (the knock's reply is signed there, off
    /// the critical path; it is sent only once the kernel is written).
    pub async fn finish_overlapped<R>(
        &self,
        decided: Decided,
        meanwhile: impl FnOnce(&Decided) -> R,
    ) -> Result<(Granted, R), Refused> {
        let reservation = self
            .admitter
            .reserve(&decided)
            .map_err(|d| self.refused(d.into()))?;
        let body = Body::AdmissionGranted(decided.audit_event());
        let durable = match self.auditor.record_durable_started(body) {
            Ok(synced) => {
                let during = meanwhile(&decided);
                synced.await.map(|_| during)
            }
            Err(e) => Err(e),
        };
        let during = match durable {
            Ok(during) => during,
            Err(e) => {
                self.admitter.release(reservation);
                // The grant's record may still reach the spool once the
                // disk recovers: the refusal follows it there, so the trail
                // never shows a grant that was not made.
                return Err(self.refused(Refused::after(
                    &decided,
                    KnockRefusal::AuditFailed(e.to_string()),
                )));
            }
        };
        // The expiry was fixed when it was decided: time spent recording
        // it only shortens it.
        let ttl = decided
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(decided.ttl);
        let name = decided.identity.display();
        let written = self.enforcer.admit(&Admission {
            name: &name,
            limits_of: decided.subject(),
            source: decided.source,
            service: decided.svc_id,
            source_port: decided.source_port,
            ttl,
        });
        match written {
            Ok(slot) => {
                self.counters.granted.fetch_add(1, Ordering::Relaxed);
                Ok((Granted::of(decided, slot), during))
            }
            Err(e) => {
                self.admitter.release(reservation);
                Err(self.refused(Refused::after(&decided, e.into())))
            }
        }
    }

    /// Counts and audits a refusal.
    fn refused(&self, r: Refused) -> Refused {
        self.counters.refused(r.reason());
        if let Some(ev) = r.audit_event()
            && let Err(e) = self.auditor.record(Body::AdmissionDenied(ev))
        {
            tracing::error!(event = "audit_failed", error = %e, "refusal not audited");
        }
        r
    }

    /// Step 4: the signed reply to a granted knock: `None` when replies are
    /// off or it would be larger than the knock. Sent only after the kernel
    /// write, so the admission is live when the client learns of it.
    pub fn reply(&self, g: &Granted) -> Option<Vec<u8>> {
        self.sign_reply(&g.nonce, &g.service, g.expires, g.request_len)
    }

    /// The same reply, signed from the decision while its record syncs:
    /// the grant carries the decision's nonce, service, expiry and size.
    fn reply_to(&self, d: &Decided) -> Option<Vec<u8>> {
        self.sign_reply(&d.nonce, &d.service, d.expires, d.request_len)
    }

    fn sign_reply(
        &self,
        nonce: &[u8; 16],
        service: &str,
        expires: SystemTime,
        request_len: usize,
    ) -> Option<Vec<u8>> {
        if !self.reply {
            return None;
        }
        portcullis_knock::reply_to(&self.node, nonce, service, expires, request_len)
    }

    /// Binds the knock port: one dual-stack socket, IPv4 knocks arrive as
    /// IPv4-mapped addresses.
    pub async fn bind(port: u16) -> anyhow::Result<UdpSocket> {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding the knock listener on udp {addr}"))
    }

    /// Receives knocks; answers only successes (refusals are silent). A
    /// decided knock is finished in its own task: its grant must be durable
    /// in the audit spool before the kernel changes, and concurrent grants
    /// share one fsync (group commit) instead of queueing behind each other.
    pub async fn listen(self: Arc<Self>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "knock socket receive failed");
                    continue;
                }
            };
            match self.check(&buf[..n], peer, SystemTime::now()) {
                Ok(decided) => {
                    let (svc, sock) = (self.clone(), sock.clone());
                    tokio::spawn(async move {
                        match svc.finish_overlapped(decided, |d| svc.reply_to(d)).await {
                            Ok((g, reply)) => svc.granted(&sock, &g, reply, peer).await,
                            Err(r) => log_refusal(&r, peer),
                        }
                    });
                }
                Err(r) => log_refusal(&r, peer),
            }
        }
    }

    async fn granted(
        &self,
        sock: &UdpSocket,
        g: &Granted,
        reply: Option<Vec<u8>>,
        peer: SocketAddr,
    ) {
        // The reply first: the client is waiting for it, the log is not.
        if let Some(reply) = reply
            && let Err(e) = sock.send_to(&reply, peer).await
        {
            tracing::warn!(error = %e, %peer, "knock reply not sent");
        }
        tracing::info!(
            event = "admission_granted",
            subject = %g.subject,
            tenant = g.tenant.as_deref().unwrap_or(""),
            service = %g.service,
            source = %g.source,
            source_port = g.source_port,
            slot = g.slot,
            policies = ?g.policies,
            policy_version = %g.policy_version,
            ttl_secs = g.expires.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs()),
            "knock admitted"
        );
    }
}

/// Operator problems are warnings; a client's bad knock is debug.
fn log_refusal(r: &Refused, peer: SocketAddr) {
    if r.refusal.is_operator_problem() {
        tracing::warn!(event = "knock_refused", reason = r.reason(), %peer, detail = %r.refusal);
    } else {
        tracing::debug!(event = "knock_refused", reason = r.reason(), %peer, detail = %r.refusal);
    }
}
