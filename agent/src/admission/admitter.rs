//! Knock admission as decisions: datagram → checks → a decided admission,
//! in the order that puts the cheapest refusals first: size and shape,
//! freshness, nonce replay, token, proof of possession, scope, the
//! identity's quota, then the policy. Nothing here writes the kernel or
//! the audit trail: the knock service (`agent/src/daemon/knock_service.rs`)
//! records the decision, has `agent/src/enforce/` carry it out and replies.
//! Every refusal has a stable reason for metrics and audit; the sender
//! never learns which (silence on failure).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use portcullis_knock::{self as knock, KnockLimits};
use portcullis_proto::v1;
use portcullis_trail::{hex::hex, time};

use crate::{
    accounting::SpendBook,
    admission::{
        grants::{AdmissionRef, Grants, LiveGrant, Reservation},
        jwk::sha256,
        nonces::NonceCache,
        pop::verify_pop,
        refusal::{Attempt, Denied, Refusal, audit_method},
        revocations::Change,
        token::{Claims, Verifier},
    },
    budget::{Action as BudgetAction, Verdict},
    config::{Action, Config, ModelAttrs},
    identity::IdentityName,
    policy::{Decision, Method, PolicyStore, Principal, Request as PolicyRequest, Resource},
};

/// A knock that passed every check, decided but not yet written to the
/// kernel: the knock service (`agent/src/daemon/knock_service.rs`) makes
/// its audit record durable, then has the kernel write it.
#[derive(Debug, Clone)]
pub struct Decided {
    pub(crate) claims: Arc<Claims>,
    pub identity: IdentityName,
    pub service: String,
    pub svc_id: u32,
    pub action: &'static str,
    pub model_version: String,
    pub source: IpAddr,
    pub source_port: u16,
    /// A knock, or the control API's `Admit`.
    pub method: Method,
    /// Fixed when decided: time spent recording it only shortens it.
    pub expires: SystemTime,
    pub ttl: Duration,
    pub nonce: [u8; 16],
    pub request_len: usize,
    pub policies: Vec<String>,
    pub policy_version: String,
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
            method: audit_method(self.method) as i32,
            policies: self.policies.clone(),
            policy_version: self.policy_version.clone(),
            jti_sha256: self.claims.jti_hash().to_vec(),
            expires_unix_ms: time::unix_ms(self.expires),
            action: self.action.to_string(),
            identity_name: self.identity.display(),
        }
    }

    /// Who this decision was about, for the record of a later refusal.
    pub fn attempt(&self) -> Attempt {
        Attempt {
            subject: self.claims.subject.clone(),
            tenant: self.claims.tenant.clone(),
            jti_hash: self.claims.jti_hash(),
            service: self.service.clone(),
            action: self.action,
            model_version: self.model_version.clone(),
            source: Some(self.source),
            source_port: self.source_port,
            policies: self.policies.clone(),
            policy_version: self.policy_version.clone(),
            method: self.method,
        }
    }

    /// The token's subject (the key of `[identities.NAME]` limits).
    pub fn subject(&self) -> &str {
        &self.claims.subject
    }

    /// SHA-256 of the token's `jti`.
    pub fn jti_hash(&self) -> [u8; 32] {
        self.claims.jti_hash()
    }

    /// The token's tenant, if it names one.
    pub fn tenant(&self) -> Option<&str> {
        self.claims.tenant.as_deref()
    }
}

/// What was asked for, by a knock or an `Admit` call.
struct Asked {
    service: String,
    source: IpAddr,
    source_port: u16,
    method: Method,
    nonce: [u8; 16],
    request_len: usize,
}

struct ServiceInfo {
    id: u32,
    action: Action,
    model: ModelAttrs,
    max_sources: u32,
}

pub struct Admitter {
    cfg: Arc<Config>,
    verifier: Arc<Verifier>,
    nonces: NonceCache,
    limits: KnockLimits,
    /// The protected services by name, replaced when they change at run
    /// time ([`set_services`](Self::set_services)).
    services: std::sync::RwLock<Arc<HashMap<String, ServiceInfo>>>,
    grants: Mutex<Grants>,
    policies: Arc<PolicyStore>,
    /// Spend to date for the policy context; `None`: reported as 0.
    spend: Option<Arc<SpendBook>>,
}

/// Whose admissions a revocation cuts, as [`Admitter::revoke`] decides it:
/// the enforcer removes them from the kernel, the caller records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationTarget {
    /// `jti`, `subject` or `identity`.
    pub kind: &'static str,
    /// What the record names: a jti's SHA-256 in hex (never the jti), a
    /// subject, an identity name.
    pub target: String,
    /// The knock-granted admissions of a revoked token.
    pub admissions: Vec<AdmissionRef>,
    /// For a subject or an identity: which kernel identities it covers
    /// (admitted before this agent started, or statically, too).
    pub identities: Option<IdentityMatch>,
}

/// The kernel identities a subject or identity revocation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMatch {
    /// The subject in every tenant.
    Subject(String),
    /// One identity in its own tenant.
    Identity(IdentityName),
    /// Every identity of a tenant.
    Tenant(String),
}

impl IdentityMatch {
    pub fn matches(&self, name: &IdentityName) -> bool {
        match self {
            IdentityMatch::Subject(s) => &name.subject == s,
            IdentityMatch::Identity(n) => name == n,
            IdentityMatch::Tenant(t) => name.tenant.as_deref() == Some(t.as_str()),
        }
    }
}

impl Admitter {
    pub fn new(cfg: Arc<Config>, verifier: Arc<Verifier>, policies: Arc<PolicyStore>) -> Admitter {
        let limits = KnockLimits {
            window: cfg.knock.window,
            ..KnockLimits::default()
        };
        let services = std::sync::RwLock::new(Arc::new(service_infos(&cfg)));
        Admitter {
            nonces: NonceCache::new(limits.window, limits.max_nonces),
            cfg,
            verifier,
            limits,
            services,
            grants: Mutex::new(Grants::default()),
            policies,
            spend: None,
        }
    }

    /// Takes the services of `cfg` (changed at run time); knocks for a
    /// removed one are refused as unknown from now on.
    pub fn set_services(&self, cfg: &Config) {
        *self.services.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(service_infos(cfg));
    }

    fn services(&self) -> Arc<HashMap<String, ServiceInfo>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

    pub fn policies(&self) -> &PolicyStore {
        &self.policies
    }

    fn grants(&self) -> MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every check of the knock pipeline, up to and including the policy
    /// decision; changes nothing but the nonce cache.
    pub fn check(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        now: SystemTime,
    ) -> Result<Decided, Denied> {
        self.decide_knock(datagram, peer, now)
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
        verify_pop(&k, claims.cnf.as_ref()).map_err(Denied::bare)?;
        self.nonces
            .check_and_insert(k.nonce, Instant::now())
            .map_err(Denied::bare)?;
        // A claimed address (client behind NAT) is only honoured with a
        // proof of possession, which verify_pop demanded above.
        let source = k.client_addr.unwrap_or(peer.ip()).to_canonical();
        self.decide_verified(
            claims,
            Asked {
                service: k.service,
                source,
                source_port: k.source_port,
                method: Method::Knock,
                nonce: k.nonce,
                request_len: datagram.len(),
            },
            now,
        )
    }

    /// The control API's `Admit`: a trusted gateway asks for `source` with
    /// the client's token. The same token checks, scope, quota and policy
    /// as a knock (policies see `context.method == "admit_rpc"`); a token
    /// bound to a key (`cnf`, RFC 7800 §3) needs the client's proof of
    /// possession, which only a knock carries, so it is refused here.
    pub fn check_rpc(
        &self,
        token: &str,
        service: &str,
        source: IpAddr,
        source_port: u16,
        now: SystemTime,
    ) -> Result<Decided, Denied> {
        let claims = self.verifier.verify(token, now).map_err(Denied::bare)?;
        if claims.cnf.is_some() {
            return Err(Denied::bare(knock::KnockError::PopMissing));
        }
        self.decide_verified(
            claims,
            Asked {
                service: service.to_string(),
                source: source.to_canonical(),
                source_port,
                method: Method::AdmitRpc,
                nonce: [0; 16],
                request_len: 0,
            },
            now,
        )
    }

    /// Everything after the token verified: refusals name who was refused.
    fn decide_verified(
        &self,
        claims: Arc<Claims>,
        k: Asked,
        now: SystemTime,
    ) -> Result<Decided, Denied> {
        let source = k.source;
        let mut attempt = Attempt {
            subject: claims.subject.clone(),
            tenant: claims.tenant.clone(),
            jti_hash: claims.jti_hash(),
            service: k.service.clone(),
            source: Some(source),
            source_port: k.source_port,
            method: k.method,
            ..Attempt::default()
        };
        let deny = |refusal: Refusal, attempt: Attempt| Denied {
            refusal,
            attempt: Some(Box::new(attempt)),
        };
        let services = self.services();
        let Some(svc) = services.get(&k.service) else {
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
        if let Err(refusal) = quota(
            &self.grants(),
            &identity,
            &k.service,
            svc,
            &(source, svc.id, k.source_port),
        ) {
            return Err(deny(refusal, attempt));
        }
        // A budget whose forecast reached `deny` refuses before policy
        // (unless an approval lets the identity through).
        let verdict = self.budget(&identity, &k.service);
        if verdict.enforced() == Some(BudgetAction::Deny) {
            return Err(deny(Refusal::Budget(Box::new(verdict)), attempt));
        }
        // Policy decides within what the token's scope allows: it can
        // narrow a token, never widen it.
        let decision = self.decide(&claims, &k.service, svc, source, k.method, now, &verdict);
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
            method: k.method,
            expires,
            ttl,
            nonce: k.nonce,
            request_len: k.request_len,
            policies: decision.determining,
            policy_version: decision.version,
        })
    }

    /// Registers a decided admission before the kernel write, checking the
    /// identity's quota again under the lock so concurrent knocks cannot
    /// overshoot it together. A failed write [`release`](Self::release)s it.
    pub fn reserve(&self, d: &Decided) -> Result<Reservation, Denied> {
        let at = (d.source, d.svc_id, d.source_port);
        let mut grants = self.grants();
        if let Some(svc) = self.services().get(&d.service)
            && let Err(refusal) = quota(&grants, &d.identity, &d.service, svc, &at)
        {
            return Err(Denied {
                refusal,
                attempt: Some(Box::new(d.attempt())),
            });
        }
        Ok(grants.insert(
            at,
            LiveGrant {
                claims: d.claims.clone(),
                identity: d.identity.clone(),
                service: d.service.clone(),
                method: d.method,
                expires: d.expires,
                generation: 0,
            },
        ))
    }

    /// Forgets a reservation whose kernel write failed (and puts back the
    /// admission a re-knock would have extended).
    pub fn release(&self, r: Reservation) {
        self.grants().release(r);
    }

    /// Live knock-granted admissions tracked (each freed when its admission
    /// expires or is revoked).
    pub fn tracked_admissions(&self) -> usize {
        self.grants().len()
    }

    /// The budgets' verdict on `identity` at `service`: computed once per
    /// decision, for the refusal and for the policy context alike.
    fn budget(&self, identity: &IdentityName, service: &str) -> Verdict {
        match &self.spend {
            Some(book) => book.budgets().verdict(
                &identity.display(),
                identity.tenant.as_deref().unwrap_or(""),
                Some(service),
            ),
            None => Verdict::default(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn decide(
        &self,
        claims: &Claims,
        service: &str,
        svc: &ServiceInfo,
        source: IpAddr,
        method: Method,
        now: SystemTime,
        budget: &Verdict,
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
            budget_action: budget.action.map_or("", BudgetAction::as_str),
            budget_forecast_percent: budget.forecast_percent,
        })
    }

    /// Decides every live knock-granted admission again under the current
    /// policy set: the ones it now denies. Static and break-glass
    /// admissions are not policy-governed. The caller revokes them in the
    /// kernel, then [`forget`](Self::forget)s each.
    pub fn reevaluate(&self, now: SystemTime) -> Vec<AdmissionRef> {
        let services = self.services();
        self.grants()
            .iter()
            .filter(|(_, g)| g.claims.expires_at > now)
            .filter_map(|(&at, g)| {
                let svc = services.get(&g.service)?;
                let budget = self.budget(&g.identity, &g.service);
                let d = self.decide(&g.claims, &g.service, svc, at.0, g.method, now, &budget);
                (!d.allow).then_some(at)
            })
            .collect()
    }

    /// Stops tracking the admissions `pred` selects (cut in the kernel by
    /// the control API); returns them.
    pub fn forget_where(
        &self,
        pred: impl Fn(&AdmissionRef, &IdentityName) -> bool,
    ) -> Vec<AdmissionRef> {
        self.grants().take(|at, g| pred(at, &g.identity))
    }

    /// Every live knock-granted admission: where, whose, to which service.
    pub fn live_grants(&self) -> Vec<(AdmissionRef, IdentityName, String)> {
        self.grants()
            .iter()
            .map(|(&at, g)| (at, g.identity.clone(), g.service.clone()))
            .collect()
    }

    /// Whether a live knock-granted admission came from the token `jti`.
    pub fn holds_jti(&self, jti: &str) -> bool {
        self.grants().iter().any(|(_, g)| g.claims.jti == jti)
    }

    /// Whether a live knock-granted admission belongs to `identity`.
    pub fn holds_identity(&self, identity: &IdentityName) -> bool {
        self.grants().iter().any(|(_, g)| &g.identity == identity)
    }

    /// Stops tracking an admission the kernel no longer holds.
    pub fn forget(&self, at: &AdmissionRef) {
        self.grants().remove(at);
    }

    /// Periodic upkeep: forget nonces, cache entries and admissions past
    /// their time.
    pub fn purge(&self, now: SystemTime) {
        self.verifier.purge(now);
        self.nonces.purge(Instant::now());
        self.grants().purge(now);
    }

    /// Applies a change of the revocations file to admission: the verifier
    /// refuses the tokens from now on, and what they admitted is returned
    /// for the kernel to cut (flows die on their next packet).
    pub fn revoke(&self, change: &Change, now: SystemTime) -> Vec<RevocationTarget> {
        // A revoked jti can only matter while its token could be valid.
        let remember = now
            + self
                .cfg
                .tokens
                .as_ref()
                .map_or(Duration::from_secs(86_400), |t| t.max_lifetime + t.leeway);
        let mut grants = self.grants();
        let mut targets = Vec::new();
        for jti in &change.added.jtis {
            self.verifier.revoke_jti(jti, remember);
            targets.push(RevocationTarget {
                kind: "jti",
                // The audit trail never carries a jti, only its hash.
                target: hex(&sha256(jti.as_bytes())),
                admissions: grants.take(|_, g| &g.claims.jti == jti),
                identities: None,
            });
        }
        for subject in &change.added.subjects {
            self.verifier.revoke_subject(subject);
            let m = IdentityMatch::Subject(subject.clone());
            grants.take(|_, g| m.matches(&g.identity));
            targets.push(RevocationTarget {
                kind: "subject",
                target: subject.clone(),
                admissions: Vec::new(),
                identities: Some(m),
            });
        }
        for identity in &change.added.identities {
            self.verifier.revoke_identity(identity);
            let m = IdentityMatch::Identity(identity.clone());
            grants.take(|_, g| m.matches(&g.identity));
            targets.push(RevocationTarget {
                kind: "identity",
                target: identity.display(),
                admissions: Vec::new(),
                identities: Some(m),
            });
        }
        for subject in &change.removed.subjects {
            self.verifier.unrevoke_subject(subject);
        }
        for identity in &change.removed.identities {
            self.verifier.unrevoke_identity(identity);
        }
        targets
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

fn service_infos(cfg: &Config) -> HashMap<String, ServiceInfo> {
    cfg.services
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
        .collect()
}
