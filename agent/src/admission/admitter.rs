//! The knock pipeline: datagram → checks → kernel admission → reply, in the
//! order the issue fixes so the cheapest refusals come first: size and
//! shape, freshness, nonce replay, token, proof of possession, scope, then
//! the kernel write. Every refusal has a stable reason for metrics and
//! audit; the sender never learns which (silence on failure).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    accounting::SpendBook,
    admission::{
        knock::{self, KnockError, KnockLimits, NonceCache},
        revocations::Change,
        token::{Claims, TokenError, Verifier},
    },
    apply,
    config::{Action, Config, ModelAttrs},
    identity::IdentityName,
    kernel::{KernelError, Maps, clock},
    nodekey::NodeKey,
    policy::{Decision, Method, PolicyStore, Principal, Request as PolicyRequest, Resource},
};
use portcullis_proto::v1;

/// Why a knock was refused: the stable names are what metrics count and
/// audit records carry.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Knock(#[from] KnockError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("service {0:?} is not protected on this node")]
    UnknownService(String),
    #[error("token does not grant model:{service}:{action}")]
    Scope {
        service: String,
        action: &'static str,
    },
    #[error("policy {version} denies (determining: {determining:?}; errors: {errors:?})")]
    Policy {
        version: String,
        determining: Vec<String>,
        errors: Vec<String>,
    },
    #[error("all identity slots are in use")]
    SlotsExhausted,
    /// The identity already holds `limit` live admissions to the service
    /// (`max_sources_per_identity`): one identity cannot fill the table.
    #[error(
        "identity {identity} already holds {limit} live admissions to {service} (services.max_sources_per_identity); revoke some or wait for them to expire"
    )]
    IdentityQuota {
        identity: String,
        service: String,
        limit: u32,
    },
    /// A kernel table is full.
    #[error("the kernel table {map} is full; raise {knob}")]
    TableFull {
        map: &'static str,
        knob: &'static str,
    },
    #[error("kernel write failed: {0}")]
    Kernel(KernelError),
    /// The audit spool is full (`audit.on_full = "refuse_admissions"`): no
    /// admission is granted that could not be recorded.
    #[error("the audit spool is full; new admissions are refused until the collector catches up")]
    AuditFull,
    /// The grant could not be made durable in the audit spool.
    #[error("the admission could not be recorded in the audit spool: {0}")]
    AuditFailed(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Knock(e) => e.reason(),
            Refusal::Token(e) => e.reason(),
            Refusal::UnknownService(_) => "unknown_service",
            Refusal::Scope { .. } => "scope",
            Refusal::Policy { .. } => "policy",
            Refusal::SlotsExhausted => "identity_slots_exhausted",
            Refusal::IdentityQuota { .. } => "identity_quota",
            Refusal::TableFull { .. } => "table_full",
            Refusal::Kernel(_) => "kernel_error",
            Refusal::AuditFull => "audit_spool_full",
            Refusal::AuditFailed(_) => "audit_write_failed",
        }
    }
}

impl From<KernelError> for Refusal {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::IdentitiesExhausted(_) => Refusal::SlotsExhausted,
            KernelError::TableFull { map, knob } => Refusal::TableFull { map, knob },
            other => Refusal::Kernel(other),
        }
    }
}

/// A knock that passed every check, decided but not yet written to the
/// kernel: the runtime makes its audit record durable first, then
/// [`Admitter::commit`]s it.
#[derive(Debug, Clone)]
pub struct Decided {
    claims: Arc<Claims>,
    identity: IdentityName,
    service: String,
    svc_id: u32,
    action: &'static str,
    model_version: String,
    source: IpAddr,
    source_port: u16,
    expires: SystemTime,
    ttl: Duration,
    nonce: [u8; 16],
    request_len: usize,
    policies: Vec<String>,
    policy_version: String,
}

impl Decided {
    /// The audit record of this grant (the jti only as its SHA-256).
    pub fn audit_event(&self) -> v1::AdmissionGranted {
        v1::AdmissionGranted {
            identity: self.claims.subject.clone(),
            tenant: self.claims.tenant.clone().unwrap_or_default(),
            service: self.service.clone(),
            model_version: self.model_version.clone(),
            source: self.source.to_string(),
            source_port: u32::from(self.source_port),
            method: v1::AdmissionMethod::Knock as i32,
            policies: self.policies.clone(),
            policy_version: self.policy_version.clone(),
            jti_sha256: self.claims.jti_hash().to_vec(),
            expires_unix_ms: clock::unix_ms(self.expires),
            action: self.action.to_string(),
            identity_name: self.identity.display(),
        }
    }
}

/// What was known about a refused knock when it was refused: nothing for
/// malformed, stale, replayed or unverifiable knocks (pre-authentication
/// noise anyone can send; counted, not audited one by one), the verified
/// token's identity from there on.
#[derive(Debug, Default, Clone)]
pub struct Attempt {
    pub subject: String,
    pub tenant: Option<String>,
    pub jti_hash: [u8; 32],
    pub service: String,
    pub action: &'static str,
    pub model_version: String,
    pub source: Option<IpAddr>,
    pub source_port: u16,
    pub policies: Vec<String>,
    pub policy_version: String,
}

/// A refused knock and, once the token verified, who it was.
#[derive(Debug)]
pub struct Denied {
    pub refusal: Refusal,
    pub attempt: Option<Box<Attempt>>,
}

impl Denied {
    fn bare(refusal: impl Into<Refusal>) -> Denied {
        Denied {
            refusal: refusal.into(),
            attempt: None,
        }
    }

    /// The audit record of this refusal: `None` for pre-authentication
    /// refusals (no verified identity to attribute it to).
    pub fn audit_event(&self) -> Option<v1::AdmissionDenied> {
        let a = self.attempt.as_ref()?;
        Some(v1::AdmissionDenied {
            identity: a.subject.clone(),
            tenant: a.tenant.clone().unwrap_or_default(),
            service: a.service.clone(),
            model_version: a.model_version.clone(),
            source: a.source.map(|s| s.to_string()).unwrap_or_default(),
            source_port: u32::from(a.source_port),
            method: v1::AdmissionMethod::Knock as i32,
            policies: a.policies.clone(),
            policy_version: a.policy_version.clone(),
            jti_sha256: a.jti_hash.to_vec(),
            reason: self.refusal.reason().to_string(),
            detail: self.refusal.to_string(),
            action: a.action.to_string(),
            identity_name: IdentityName::new(a.tenant.as_deref(), &a.subject).display(),
        })
    }
}

/// A granted admission: what the agent logs (and later audits).
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

struct ServiceInfo {
    id: u32,
    action: Action,
    model: ModelAttrs,
    max_sources: u32,
}

/// Refusals counted by reason since start.
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

pub struct Admitter {
    cfg: Arc<Config>,
    verifier: Arc<Verifier>,
    nonces: NonceCache,
    limits: KnockLimits,
    services: HashMap<String, ServiceInfo>,
    maps: Arc<Mutex<Maps>>,
    node: Arc<NodeKey>,
    grants: Mutex<Grants>,
    policies: Arc<PolicyStore>,
    /// Spend to date for the policy context; `None`: reported as 0.
    spend: Option<Arc<SpendBook>>,
    pub counters: Counters,
}

/// The kernel key of one admission: source, service id, source port (0:
/// any port).
type AdmissionRef = (IpAddr, u32, u16);

/// Every live knock-granted admission with what it was decided on: a
/// revocation finds the admissions of a token or a subject here, a new
/// policy set decides them again, and the per-identity quota counts them.
/// An entry lives exactly as long as its admission: it goes when the
/// admission expires ([`Admitter::purge`]) or is revoked, so this state is
/// bounded by the admissions table, and by each identity's quota.
#[derive(Default)]
struct Grants {
    live: HashMap<AdmissionRef, LiveGrant>,
    /// Live admissions per (identity, service id): the quota's count.
    per_identity: HashMap<(IdentityName, u32), u32>,
}

struct LiveGrant {
    claims: Arc<Claims>,
    identity: IdentityName,
    service: String,
    method: Method,
    expires: SystemTime,
}

impl Grants {
    fn insert(&mut self, at: AdmissionRef, grant: LiveGrant) {
        let key = (grant.identity.clone(), at.1);
        if let Some(old) = self.live.insert(at, grant) {
            self.uncount(&old.identity, at.1);
        }
        *self.per_identity.entry(key).or_default() += 1;
    }

    fn remove(&mut self, at: &AdmissionRef) -> Option<LiveGrant> {
        let g = self.live.remove(at)?;
        self.uncount(&g.identity, at.1);
        Some(g)
    }

    fn uncount(&mut self, identity: &IdentityName, service: u32) {
        let key = (identity.clone(), service);
        if let Some(n) = self.per_identity.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_identity.remove(&key);
            }
        }
    }

    /// Live admissions `identity` holds to `service`, not counting `at`
    /// itself (a re-knock from the same source extends, it does not add).
    fn held(&self, identity: &IdentityName, service: u32, at: &AdmissionRef) -> u32 {
        let n = self
            .per_identity
            .get(&(identity.clone(), service))
            .copied()
            .unwrap_or(0);
        match self.live.get(at) {
            Some(g) if &g.identity == identity => n.saturating_sub(1),
            _ => n,
        }
    }

    /// Removes the entries `pred` selects and returns their keys.
    fn take(&mut self, pred: impl Fn(&AdmissionRef, &LiveGrant) -> bool) -> Vec<AdmissionRef> {
        let doomed: Vec<AdmissionRef> = self
            .live
            .iter()
            .filter(|(k, g)| pred(k, g))
            .map(|(k, _)| *k)
            .collect();
        for k in &doomed {
            self.remove(k);
        }
        doomed
    }

    fn purge(&mut self, now: SystemTime) {
        self.take(|_, g| g.expires <= now || g.claims.expires_at <= now);
    }

    fn len(&self) -> usize {
        self.live.len()
    }
}

/// What applying a revocation change did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    pub subjects: usize,
    /// `id:` entries: one identity in one tenant.
    pub named: usize,
    pub jtis: usize,
    pub identities: usize,
    pub admissions: usize,
    /// One audit record per revoked jti or subject.
    pub events: Vec<v1::Revocation>,
}

impl Admitter {
    pub fn new(
        cfg: Arc<Config>,
        verifier: Arc<Verifier>,
        maps: Arc<Mutex<Maps>>,
        node: Arc<NodeKey>,
        policies: Arc<PolicyStore>,
    ) -> Admitter {
        let limits = KnockLimits {
            window: cfg.knock.window,
            ..KnockLimits::default()
        };
        let services = cfg
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    ServiceInfo {
                        id: s.id,
                        action: s.action,
                        model: s.model.clone(),
                        max_sources: s.max_sources_per_identity,
                    },
                )
            })
            .collect();
        Admitter {
            nonces: NonceCache::new(limits.window, limits.max_nonces),
            cfg,
            verifier,
            limits,
            services,
            maps,
            node,
            grants: Mutex::new(Grants::default()),
            policies,
            spend: None,
            counters: Counters::default(),
        }
    }

    /// Feeds `spend_month` / `forecast_month` of policy requests from the
    /// accountant's book (and tells it the names of the identities it
    /// decides about).
    pub fn with_spend_book(mut self, book: Arc<SpendBook>) -> Admitter {
        self.spend = Some(book);
        self
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Handles one datagram from `peer` start to finish (check, then
    /// commit) without an audit record in between; counts the outcome.
    /// The agent uses [`Admitter::check`] and [`Admitter::commit`] with the
    /// audit spool between them.
    pub fn handle(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Granted, Refusal> {
        self.check(datagram, peer, now)
            .and_then(|d| self.commit(d))
            .map_err(|d| d.refusal)
    }

    /// Every check of the knock pipeline, up to and including the policy
    /// decision; changes nothing in the kernel. A refusal is counted here.
    pub fn check(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Decided, Denied> {
        let r = self.decide_knock(datagram, peer, now);
        if let Err(d) = &r {
            self.counters.refused(d.refusal.reason());
        }
        r
    }

    /// Counts a decided knock refused after `check` (the audit spool could
    /// not record it), so the refusal appears in the per-reason counts.
    pub fn refuse_decided(&self, d: &Decided, refusal: Refusal) -> Denied {
        self.counters.refused(refusal.reason());
        Denied {
            refusal,
            attempt: Some(Box::new(Attempt {
                subject: d.claims.subject.clone(),
                tenant: d.claims.tenant.clone(),
                jti_hash: d.claims.jti_hash(),
                service: d.service.clone(),
                action: d.action,
                model_version: d.model_version.clone(),
                source: Some(d.source),
                source_port: d.source_port,
                policies: d.policies.clone(),
                policy_version: d.policy_version.clone(),
            })),
        }
    }

    fn decide_knock(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Decided, Denied> {
        let k = knock::decode(datagram, &self.limits).map_err(Denied::bare)?;
        knock::check_fresh(k.timestamp, now, self.limits.window).map_err(Denied::bare)?;
        // Replay is checked here, but the nonce is only remembered once the
        // token and proof verify: otherwise anyone could fill the cache
        // with junk and lock every client out.
        self.nonces
            .check(&k.nonce, Instant::now())
            .map_err(Denied::bare)?;
        let claims = self.verifier.verify(&k.token, now).map_err(Denied::bare)?;
        knock::verify_pop(&k, claims.cnf.as_ref()).map_err(Denied::bare)?;
        self.nonces
            .check_and_insert(k.nonce, Instant::now())
            .map_err(Denied::bare)?;
        // From here the token is verified: refusals name who was refused.
        let source = canonical(k.client_addr.unwrap_or(peer.ip()));
        let mut attempt = Attempt {
            subject: claims.subject.clone(),
            tenant: claims.tenant.clone(),
            jti_hash: claims.jti_hash(),
            service: k.service.clone(),
            source: Some(source),
            source_port: k.source_port,
            ..Attempt::default()
        };
        let deny = |refusal: Refusal, attempt: Attempt| Denied {
            refusal,
            attempt: Some(Box::new(attempt)),
        };
        let Some(svc) = self.services.get(&k.service) else {
            return Err(deny(Refusal::UnknownService(k.service.clone()), attempt));
        };
        attempt.action = svc.action.as_str();
        attempt.model_version = svc.model.version.clone();
        // The token bounds what may be granted (RFC 9068 §2.2.3 scopes).
        if !claims.allows(&k.service, svc.action.as_str()) {
            let refusal = Refusal::Scope {
                service: k.service.clone(),
                action: svc.action.as_str(),
            };
            return Err(deny(refusal, attempt));
        }
        // One identity may not fill the admissions table: checked before
        // the policy (cheap first), and again under the lock at commit.
        let identity = IdentityName::new(claims.tenant.as_deref(), &claims.subject);
        if let Err(refusal) =
            self.check_quota(&identity, &k.service, svc, (source, svc.id, k.source_port))
        {
            return Err(deny(refusal, attempt));
        }
        // A claimed address (client behind NAT) is only honoured with a
        // proof of possession, which verify_pop demanded above.
        // Policy decides within what the token's scope allows: it can
        // narrow a token, never widen it.
        let decision = self.decide(&claims, &k.service, svc, source, Method::Knock, now);
        if !decision.allow {
            attempt.policies = decision.determining.clone();
            attempt.policy_version = decision.version.clone();
            let refusal = Refusal::Policy {
                version: decision.version,
                determining: decision.determining,
                errors: decision.errors,
            };
            return Err(deny(refusal, attempt));
        }
        let mut expires = claims.expires_at.min(now + self.cfg.knock.max_ttl);
        if let Some(ttl) = decision.ttl {
            expires = expires.min(now + ttl);
        }
        let ttl = expires.duration_since(now).unwrap_or(Duration::ZERO);
        Ok(Decided {
            identity,
            claims,
            service: k.service,
            svc_id: svc.id,
            action: svc.action.as_str(),
            model_version: svc.model.version.clone(),
            source,
            source_port: k.source_port,
            expires,
            ttl,
            nonce: k.nonce,
            request_len: datagram.len(),
            policies: decision.determining,
            policy_version: decision.version,
        })
    }

    /// Writes a decided admission into the kernel. The expiry was fixed
    /// when it was decided, so time spent recording it only shortens it.
    pub fn commit(&self, d: Decided) -> Result<Granted, Denied> {
        let r = self.write_admission(&d);
        match r {
            Ok(slot) => {
                self.counters.granted.fetch_add(1, Ordering::Relaxed);
                Ok(self.granted(d, slot))
            }
            Err(e) => Err(self.refuse_decided(&d, e)),
        }
    }

    /// Refuses when `identity` already holds its quota of live admissions
    /// to the service (not counting the one at `at`, which a re-knock
    /// extends).
    fn check_quota(
        &self,
        identity: &IdentityName,
        service: &str,
        svc: &ServiceInfo,
        at: AdmissionRef,
    ) -> Result<(), Refusal> {
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        quota(&grants, identity, service, svc, &at)
    }

    fn write_admission(&self, d: &Decided) -> Result<u32, Refusal> {
        let remaining = d
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(d.ttl);
        let at = (d.source, d.svc_id, d.source_port);
        // The grants lock is held over the kernel write, so concurrent
        // knocks of one identity cannot overshoot its quota together.
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(svc) = self.services.get(&d.service) {
            quota(&grants, &d.identity, &d.service, svc, &at)?;
        }
        let slot = {
            let mut maps = self.maps.lock().map_err(|_| {
                Refusal::Kernel(KernelError::Map {
                    map: "agent".into(),
                    detail: "kernel state lock poisoned".into(),
                })
            })?;
            let name = d.identity.display();
            let limits = self.cfg.identity_limits(&d.claims.subject);
            let (slot, _) = maps.upsert_identity(apply::identity_value(&name, &limits), &name)?;
            maps.admit(
                slot,
                d.source,
                d.svc_id,
                d.source_port,
                clock::expiry_after(remaining),
            )?;
            slot
        };
        grants.insert(
            at,
            LiveGrant {
                claims: d.claims.clone(),
                identity: d.identity.clone(),
                service: d.service.clone(),
                method: Method::Knock,
                expires: d.expires,
            },
        );
        Ok(slot)
    }

    /// Live knock-granted admissions the agent tracks (each freed when its
    /// admission expires or is revoked).
    pub fn tracked_admissions(&self) -> usize {
        self.grants.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn granted(&self, d: Decided, slot: u32) -> Granted {
        Granted {
            subject: d.claims.subject.clone(),
            tenant: d.claims.tenant.clone(),
            jti_hash: d.claims.jti_hash(),
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

    fn decide(
        &self,
        claims: &Claims,
        service: &str,
        svc: &ServiceInfo,
        source: IpAddr,
        method: Method,
        now: SystemTime,
    ) -> Decision {
        let (spend_month, forecast_month) = match &self.spend {
            Some(book) => book.spend(
                &IdentityName::new(claims.tenant.as_deref(), &claims.subject).display(),
                claims.tenant.as_deref(),
            ),
            None => (0, 0),
        };
        self.policies.current().decide(&PolicyRequest {
            principal: Principal {
                subject: claims.subject.clone(),
                tenant: claims.tenant.clone(),
                roles: claims.roles.clone(),
                scopes: claims.scopes.iter().map(ToString::to_string).collect(),
                issuer: claims.issuer.clone(),
            },
            action: svc.action.as_str(),
            resource: Resource {
                service: service.to_string(),
                tenant: svc.model.tenant.clone(),
                version: svc.model.version.clone(),
                sensitivity: svc.model.sensitivity.clone(),
                cost_tier: svc.model.cost_tier.clone(),
            },
            now,
            source,
            method,
            token_age: now.duration_since(claims.issued_at).unwrap_or_default(),
            spend_month,
            forecast_month,
        })
    }

    /// Decides every live knock-granted admission again under the current
    /// policy set and revokes, in the kernel, those it now denies (their
    /// flows die on the next packet). Static and break-glass admissions are
    /// not policy-governed.
    pub fn reevaluate(&self, now: SystemTime) -> Result<usize, KernelError> {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let denied: Vec<AdmissionRef> = grants
            .live
            .iter()
            .filter(|(_, g)| g.claims.expires_at > now)
            .filter_map(|(&at, g)| {
                let svc = self.services.get(&g.service)?;
                let d = self.decide(&g.claims, &g.service, svc, at.0, g.method, now);
                (!d.allow).then_some(at)
            })
            .collect();
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        for at in &denied {
            maps.revoke_admission(at.0, at.1, at.2)?;
            grants.remove(at);
        }
        Ok(denied.len())
    }

    pub fn policies(&self) -> &PolicyStore {
        &self.policies
    }

    /// The signed reply to a granted knock: `None` when replies are off or it
    /// would be larger than the knock. Signed after the kernel write, so
    /// the admission is live before the reply costs anything.
    pub fn reply(&self, g: &Granted) -> Option<Vec<u8>> {
        if !self.cfg.knock.reply {
            return None;
        }
        knock::reply_to(&self.node, &g.nonce, &g.service, g.expires, g.request_len)
    }

    /// Periodic upkeep: forget nonces, cache entries and admissions past
    /// their time.
    pub fn purge(&self, now: SystemTime) {
        self.verifier.purge(now);
        self.nonces.purge(Instant::now());
        if let Ok(mut g) = self.grants.lock() {
            g.purge(now);
        }
    }

    /// Applies a change of the revocations file: the verifier refuses the
    /// tokens from now on, and what they already admitted is cut in the
    /// kernel (flows die on their next packet).
    pub fn apply_revocations(
        &self,
        change: &Change,
        now: SystemTime,
    ) -> Result<Revoked, KernelError> {
        let mut done = Revoked::default();
        // A revoked jti can only matter while its token could be valid.
        let remember = now
            + self
                .cfg
                .tokens
                .as_ref()
                .map_or(Duration::from_secs(86_400), |t| t.max_lifetime + t.leeway);
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        for jti in &change.added.jtis {
            self.verifier.revoke_jti(jti, remember);
            done.jtis += 1;
            let mut removed = 0;
            for at in grants.take(|_, g| &g.claims.jti == jti) {
                removed += maps.revoke_admission(at.0, at.1, at.2)?;
            }
            done.admissions += removed;
            // The audit trail never carries a jti, only its hash.
            done.events.push(v1::Revocation {
                target_kind: "jti".into(),
                target: crate::audit::chain::hex(&crate::admission::jwk::sha256(jti.as_bytes())),
                reason: "revocations file".into(),
                admissions_removed: u32::try_from(removed).unwrap_or(u32::MAX),
                identities: Vec::new(),
            });
        }
        // A subject in every tenant; an identity in its own. The kernel's
        // names find identities admitted before this agent started, or
        // statically, too.
        let targets = change
            .added
            .subjects
            .iter()
            .map(|s| ("subject", s.clone(), None))
            .chain(
                change
                    .added
                    .identities
                    .iter()
                    .map(|n| ("identity", n.display(), Some(n))),
            );
        let live = maps.live_identities()?;
        for (kind, target, identity) in targets {
            match identity {
                Some(n) => self.verifier.revoke_identity(n),
                None => self.verifier.revoke_subject(&target),
            }
            let matches = |name: &IdentityName| match identity {
                Some(n) => name == n,
                None => name.subject == target,
            };
            grants.take(|_, g| matches(&g.identity));
            let mut event = v1::Revocation {
                target_kind: kind.into(),
                target: target.clone(),
                reason: "revocations file".into(),
                ..Default::default()
            };
            for (slot, _, name) in &live {
                if IdentityName::parse(name).is_some_and(|n| matches(&n)) {
                    let removed = maps.revoke_identity(*slot)?;
                    done.admissions += removed;
                    done.identities += 1;
                    event.admissions_removed = event
                        .admissions_removed
                        .saturating_add(u32::try_from(removed).unwrap_or(u32::MAX));
                    event.identities.push(name.clone());
                }
            }
            match kind {
                "subject" => done.subjects += 1,
                _ => done.named += 1,
            }
            done.events.push(event);
        }
        for subject in &change.removed.subjects {
            self.verifier.unrevoke_subject(subject);
        }
        for identity in &change.removed.identities {
            self.verifier.unrevoke_identity(identity);
        }
        Ok(done)
    }
}

/// How many live admissions `identity` may still take to `service`.
fn quota(
    grants: &Grants,
    identity: &IdentityName,
    service: &str,
    svc: &ServiceInfo,
    at: &AdmissionRef,
) -> Result<(), Refusal> {
    if grants.held(identity, svc.id, at) >= svc.max_sources {
        return Err(Refusal::IdentityQuota {
            identity: identity.display(),
            service: service.to_string(),
            limit: svc.max_sources,
        });
    }
    Ok(())
}

/// IPv4 clients reach a dual-stack socket as IPv4-mapped IPv6; the kernel
/// sees them as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}
