//! The knock pipeline: datagram → checks → kernel admission → reply, in the
//! order the issue fixes so the cheapest refusals come first: size and
//! shape, freshness, nonce replay, token, proof of possession, scope, then
//! the kernel write. Every refusal has a stable reason for metrics and
//! audit; the sender never learns which (silence on failure).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    admission::{
        knock::{self, KnockError, KnockLimits, NonceCache},
        revocations::Change,
        token::{Claims, TokenError, Verifier},
    },
    apply,
    config::{Action, Config, ModelAttrs, identity_key},
    kernel::{KernelError, Maps, clock},
    nodekey::NodeKey,
    policy::{Decision, Method, PolicyStore, Principal, Request as PolicyRequest, Resource},
};

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
    #[error("kernel write failed: {0}")]
    Kernel(KernelError),
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
            Refusal::Kernel(_) => "kernel_error",
        }
    }
}

impl From<KernelError> for Refusal {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::IdentitiesExhausted(_) => Refusal::SlotsExhausted,
            other => Refusal::Kernel(other),
        }
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
    pub counters: Counters,
}

/// What knocks admitted, so a revocation can find the admissions of a token
/// or the identities of a subject. Entries go when their token expires.
#[derive(Default)]
struct Grants {
    by_jti: HashMap<String, (SystemTime, Vec<(IpAddr, u32)>)>,
    by_subject: HashMap<String, (SystemTime, BTreeSet<String>)>,
    /// Each live admission with what it was decided on, so a new policy
    /// set can decide it again.
    live: HashMap<(IpAddr, u32), LiveGrant>,
}

struct LiveGrant {
    claims: Arc<Claims>,
    service: String,
    method: Method,
}

impl Grants {
    fn record(
        &mut self,
        claims: &crate::admission::token::Claims,
        identity: &str,
        source: IpAddr,
        service: u32,
    ) {
        let e = self
            .by_jti
            .entry(claims.jti.clone())
            .or_insert_with(|| (claims.expires_at, Vec::new()));
        if !e.1.contains(&(source, service)) {
            e.1.push((source, service));
        }
        let s = self
            .by_subject
            .entry(claims.subject.clone())
            .or_insert_with(|| (claims.expires_at, BTreeSet::new()));
        s.0 = s.0.max(claims.expires_at);
        s.1.insert(identity.to_string());
    }

    fn purge(&mut self, now: SystemTime) {
        self.by_jti.retain(|_, (exp, _)| *exp > now);
        self.by_subject.retain(|_, (exp, _)| *exp > now);
        self.live.retain(|_, g| g.claims.expires_at > now);
    }
}

/// What applying a revocation change did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    pub subjects: usize,
    pub jtis: usize,
    pub identities: usize,
    pub admissions: usize,
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
            counters: Counters::default(),
        }
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Handles one datagram from `peer`; counts the outcome.
    pub fn handle(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Granted, Refusal> {
        let r = self.admit(datagram, peer, now);
        match &r {
            Ok(_) => {
                self.counters.granted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.counters.refused(e.reason()),
        }
        r
    }

    fn admit(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Granted, Refusal> {
        let k = knock::decode(datagram, &self.limits)?;
        knock::check_fresh(k.timestamp, now, self.limits.window)?;
        // Replay is checked here, but the nonce is only remembered once the
        // token and proof verify: otherwise anyone could fill the cache
        // with junk and lock every client out.
        self.nonces.check(&k.nonce, Instant::now())?;
        let claims = self.verifier.verify(&k.token, now)?;
        knock::verify_pop(&k, claims.cnf.as_ref())?;
        self.nonces.check_and_insert(k.nonce, Instant::now())?;
        let svc = self
            .services
            .get(&k.service)
            .ok_or_else(|| Refusal::UnknownService(k.service.clone()))?;
        // The token bounds what may be granted (RFC 9068 §2.2.3 scopes).
        if !claims.allows(&k.service, svc.action.as_str()) {
            return Err(Refusal::Scope {
                service: k.service.clone(),
                action: svc.action.as_str(),
            });
        }
        // A claimed address (client behind NAT) is only honoured with a
        // proof of possession, which verify_pop demanded above.
        let source = canonical(k.client_addr.unwrap_or(peer.ip()));
        // Policy decides within what the token's scope allows: it can
        // narrow a token, never widen it.
        let decision = self.decide(&claims, &k.service, svc, source, Method::Knock, now);
        if !decision.allow {
            return Err(Refusal::Policy {
                version: decision.version,
                determining: decision.determining,
                errors: decision.errors,
            });
        }
        let mut expires = claims.expires_at.min(now + self.cfg.knock.max_ttl);
        if let Some(ttl) = decision.ttl {
            expires = expires.min(now + ttl);
        }
        let ttl = expires.duration_since(now).unwrap_or(Duration::ZERO);
        let identity = identity_name(claims.tenant.as_deref(), &claims.subject);
        let slot = {
            let mut maps = self.maps.lock().map_err(|_| {
                Refusal::Kernel(KernelError::Map {
                    map: "agent".into(),
                    detail: "kernel state lock poisoned".into(),
                })
            })?;
            let limits = self.cfg.identity_limits(&claims.subject);
            let (slot, _) = maps.upsert_identity(apply::identity_value(&identity, &limits))?;
            maps.admit(
                slot,
                source,
                svc.id,
                k.source_port,
                clock::expiry_after(ttl),
            )?;
            slot
        };
        if let Ok(mut g) = self.grants.lock() {
            g.record(&claims, &identity, source, svc.id);
            g.live.insert(
                (source, svc.id),
                LiveGrant {
                    claims: claims.clone(),
                    service: k.service.clone(),
                    method: Method::Knock,
                },
            );
        }
        Ok(Granted {
            subject: claims.subject.clone(),
            tenant: claims.tenant.clone(),
            service: k.service.clone(),
            source,
            source_port: k.source_port,
            expires,
            slot,
            jti_hash: claims.jti_hash(),
            nonce: k.nonce,
            request_len: datagram.len(),
            policies: decision.determining,
            policy_version: decision.version,
        })
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
            // Zero until cost accounting exists (the fields are there so
            // policies can be written against them now).
            spend_month: 0,
            forecast_month: 0,
        })
    }

    /// Decides every live knock-granted admission again under the current
    /// policy set and revokes, in the kernel, those it now denies (their
    /// flows die on the next packet). Static and break-glass admissions are
    /// not policy-governed.
    pub fn reevaluate(&self, now: SystemTime) -> Result<usize, KernelError> {
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let denied: Vec<(IpAddr, u32)> = grants
            .live
            .iter()
            .filter(|(_, g)| g.claims.expires_at > now)
            .filter_map(|(&(source, id), g)| {
                let svc = self.services.get(&g.service)?;
                let d = self.decide(&g.claims, &g.service, svc, source, g.method, now);
                (!d.allow).then_some((source, id))
            })
            .collect();
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        for (source, id) in &denied {
            maps.revoke_source(*source, *id)?;
            grants.live.remove(&(*source, *id));
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

    /// Periodic upkeep: forget nonces, cache entries and grants past their
    /// time.
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
        let grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        for jti in &change.added.jtis {
            self.verifier.revoke_jti(jti, remember);
            done.jtis += 1;
            if let Some((_, admitted)) = grants.by_jti.get(jti) {
                for (source, service) in admitted {
                    done.admissions += maps.revoke_source(*source, *service)?;
                }
            }
        }
        for subject in &change.added.subjects {
            self.verifier.revoke_subject(subject);
            done.subjects += 1;
            let mut names: BTreeSet<String> = grants
                .by_subject
                .get(subject)
                .map(|(_, n)| n.clone())
                .unwrap_or_default();
            // Also an identity admitted before this agent started, or
            // statically, under the bare subject.
            names.insert(subject.clone());
            for name in names {
                if let Some(slot) = maps.find_identity(identity_key(&name))? {
                    done.admissions += maps.revoke_identity(slot)?;
                    done.identities += 1;
                }
            }
        }
        for subject in &change.removed.subjects {
            self.verifier.unrevoke_subject(subject);
        }
        Ok(done)
    }
}

/// The kernel identity of a token subject: tenant-qualified so equal
/// subjects of different tenants never share limits or revocation.
pub fn identity_name(tenant: Option<&str>, subject: &str) -> String {
    match tenant {
        Some(t) => format!("{t}/{subject}"),
        None => subject.to_string(),
    }
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
