//! JWT access-token verification: RFC 7515 (JWS compact serialization),
//! RFC 7519 (JWT), RFC 9068 (the JWT profile for OAuth 2.0 access tokens) and
//! RFC 8725 (JWT best current practices), with `ring` doing the cryptography.
//!
//! [`Verifier::verify`] takes a compact token and the current time and returns
//! the token's [`Claims`] or a [`TokenError`] whose [`TokenError::reason`] is a
//! stable snake_case name. The order of checks is:
//!
//! 1. size (at most [`MAX_TOKEN_BYTES`]), then the verified-token cache, keyed
//!    by SHA-256 of the token; a hit re-checks only time and revocation;
//! 2. three non-empty base64url segments;
//! 3. the protected header: a JSON object without duplicate names, an `alg`
//!    we support, no `crit`, `typ` = `at+jwt` (policy), a `kid` naming a key
//!    in the JWKS whose one algorithm is `alg`;
//! 4. the signature, before the payload is even decoded;
//! 5. the claims: `iss`, `aud`, `exp`, `nbf`, `iat` with bounded leeway, the
//!    maximum lifetime, `sub`, `jti`, roles, scopes, tenant, `cnf`;
//! 6. revocation (by `jti`, by subject) and `jti` reuse by another token.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::jwk::{self, Alg, JsonError, Jwk, JwkError, JwksFile, KeySet, clip};
use crate::identity::IdentityName;

/// Largest compact token accepted. RFC 9068 tokens are a few hundred bytes
/// to a couple of KiB; anything near this is not an access token.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The largest clock leeway a policy may ask for; larger values are capped.
pub const MAX_LEEWAY: Duration = Duration::from_secs(5 * 60);
/// Latest NumericDate accepted (9999-12-31T23:59:59Z); later is nonsense.
const MAX_NUMERIC_DATE: u64 = 253_402_300_799;
/// Longest `model:` scope service or action name.
const MAX_SCOPE_PART: usize = 64;
/// At least this many `jti`s are remembered, whatever the cache size.
const MIN_JTI_ENTRIES: usize = 65_536;

/// What a token must satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Required `iss` (exact, case-sensitive match; RFC 9068 §4 step 3).
    pub issuer: String,
    /// An audience that `aud` must contain (RFC 9068 §4 step 4).
    pub audience: String,
    /// Clock skew allowed on `exp`, `nbf` and `iat`; capped at [`MAX_LEEWAY`].
    pub leeway: Duration,
    /// Longest lifetime accepted: tokens with `exp - iat` above it are refused.
    pub max_lifetime: Duration,
    /// Name of the claim holding the tenant (default `tenant`); `None`:
    /// this deployment has no tenants and the claim is ignored.
    pub tenant_claim: Option<String>,
    /// The tenant of tokens without the tenant claim. `None` (the default):
    /// such tokens are refused (`missing_tenant`), since an identity without
    /// a tenant would escape every tenant-scoped policy and limit.
    pub default_tenant: Option<String>,
    /// Require `client_id` (RFC 9068 §2.2: REQUIRED). Off only for identity
    /// providers that omit it.
    pub require_client_id: bool,
    /// Require `typ` = `at+jwt` (RFC 9068 §2.1, §4 step 1; RFC 8725 §3.11).
    pub require_typ: bool,
    /// Verified tokens cached (0 disables the cache).
    pub cache_entries: usize,
}

/// Verified tokens the agent caches.
pub const AGENT_CACHE_ENTRIES: usize = 65_536;

/// The policy of the config's `[tokens]` section.
impl From<&crate::config::TokensSection> for TokenPolicy {
    fn from(t: &crate::config::TokensSection) -> TokenPolicy {
        TokenPolicy {
            issuer: t.issuer.clone(),
            audience: t.audience.clone(),
            leeway: t.leeway,
            max_lifetime: t.max_lifetime,
            tenant_claim: t.tenant_claim.clone(),
            default_tenant: t.default_tenant.clone(),
            require_client_id: t.require_client_id,
            require_typ: t.require_typ,
            cache_entries: AGENT_CACHE_ENTRIES,
        }
    }
}

impl TokenPolicy {
    /// A policy with the defaults: 60 s leeway, 1 h maximum lifetime, tenant
    /// claim `tenant` required, `client_id` and `typ` required, 10 000 cache
    /// entries.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> TokenPolicy {
        TokenPolicy {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(3600),
            tenant_claim: Some("tenant".into()),
            default_tenant: None,
            require_client_id: true,
            require_typ: true,
            cache_entries: 10_000,
        }
    }
}

/// A `model:<service>:<action>` scope; the service may be `*` (any service),
/// the action may not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// The service, or `None` for `*`.
    pub service: Option<String>,
    /// The action (`invoke`, `read`, ...).
    pub action: String,
}

impl Scope {
    /// Does this scope allow `action` on `service`?
    pub fn allows(&self, service: &str, action: &str) -> bool {
        self.service.as_deref().is_none_or(|s| s == service) && self.action == action
    }

    /// Parses one scope-token. `Ok(None)` for scopes that are not `model:`
    /// scopes (`openid`, `profile`, ...): they are none of our business.
    fn parse(token: &str) -> Result<Option<Scope>, TokenError> {
        let Some(rest) = token.strip_prefix("model:") else {
            return Ok(None);
        };
        let bad = |why: &str| TokenError::ScopeInvalid(format!("{}: {why}", clip(token)));
        let Some((service, action)) = rest.split_once(':') else {
            return Err(bad("expected model:<service>:<action>"));
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= MAX_SCOPE_PART
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if !name_ok(action) {
            return Err(bad(
                "the action must be 1-64 of [A-Za-z0-9._-] (no wildcard)",
            ));
        }
        let service = match service {
            "*" => None,
            s if name_ok(s) => Some(s.to_owned()),
            _ => return Err(bad("the service must be * or 1-64 of [A-Za-z0-9._-]")),
        };
        Ok(Some(Scope {
            service,
            action: action.to_owned(),
        }))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let service = self.service.as_deref().unwrap_or("*");
        write!(f, "model:{service}:{}", self.action)
    }
}

/// The proof-of-possession key a token is bound to (`cnf`, RFC 7800 §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// `cnf.jkt`: the RFC 7638 SHA-256 thumbprint of the key (RFC 9449 §6.1),
    /// base64url as in the token.
    Jkt(String),
    /// `cnf.jwk`: the public key itself (RFC 7800 §3.2).
    Jwk(Jwk),
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub` (RFC 7519 §4.1.2).
    pub subject: String,
    /// The tenant claim ([`TokenPolicy::tenant_claim`]), or the configured
    /// default tenant; `None` only where the deployment has no tenants.
    pub tenant: Option<String>,
    /// `client_id` (RFC 9068 §2.2), the OAuth client the token was issued
    /// to.
    pub client_id: Option<String>,
    /// `roles` (RFC 9068 §7.2.1.1, RFC 7643 §4.1.2), deduplicated.
    pub roles: Vec<String>,
    /// `model:` scopes from `scope` and `scp`, deduplicated; others ignored.
    pub scopes: Vec<Scope>,
    /// `iss` (RFC 7519 §4.1.1).
    pub issuer: String,
    /// `jti` (RFC 7519 §4.1.7).
    pub jti: String,
    /// `iat` (RFC 7519 §4.1.6).
    pub issued_at: SystemTime,
    /// `nbf` (RFC 7519 §4.1.5), if present.
    pub not_before: Option<SystemTime>,
    /// `exp` (RFC 7519 §4.1.4).
    pub expires_at: SystemTime,
    /// `cnf` (RFC 7800 §3.1 / RFC 9449 §6.1), if the token is key-bound.
    pub cnf: Option<Confirmation>,
    /// SHA-256 of the compact token.
    pub token_hash: [u8; 32],
}

impl Claims {
    /// Does any scope allow `action` on `service`?
    pub fn allows(&self, service: &str, action: &str) -> bool {
        self.scopes.iter().any(|s| s.allows(service, action))
    }

    /// SHA-256 of the `jti`.
    pub fn jti_hash(&self) -> [u8; 32] {
        jwk::sha256(self.jti.as_bytes())
    }
}

/// Why a token was refused. [`TokenError::reason`] is stable (metrics,
/// audit); `Display` says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is {len} bytes, more than the {MAX_TOKEN_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("token is truncated: {0}")]
    Truncated(String),
    #[error(
        "token has {0} dot-separated segments; a JWS compact token has exactly 3 (RFC 7515 §7.1; 5 would be a JWE, which is not accepted)"
    )]
    Segments(usize),
    #[error("the {part} is not base64url without padding (RFC 7515 §2): {detail}")]
    Base64 { part: &'static str, detail: String },
    #[error("the header is not a JSON object: {0}")]
    HeaderNotObject(String),
    #[error("the payload is not a JSON object: {0}")]
    PayloadNotObject(String),
    #[error("the {0} is nested too deeply")]
    TooDeep(&'static str),
    #[error("the header has the parameter {0} more than once (RFC 7515 §4)")]
    DuplicateHeader(String),
    #[error("the payload has the claim {0} more than once (RFC 7519 §4)")]
    DuplicateClaim(String),
    #[error("the header parameter {param:?} is invalid: {detail}")]
    BadHeader { param: &'static str, detail: String },
    #[error("the header has no \"alg\" (RFC 7515 §4.1.1)")]
    MissingAlg,
    #[error("algorithm {alg} is not allowed: {detail}")]
    AlgNotAllowed { alg: String, detail: String },
    #[error("the header has no \"kid\"; keys are selected by kid")]
    MissingKid,
    #[error("no key with kid {0} in the JWK set")]
    UnknownKid(String),
    #[error("the key with kid {kid} is in the JWK set but was refused when it was loaded: {why}")]
    KeyRefused { kid: String, why: String },
    #[error("the header has \"crit\" ({0}); no JWS extensions are understood (RFC 7515 §4.1.11)")]
    CritUnsupported(String),
    #[error("the header \"typ\" is {0}; an access token has typ \"at+jwt\" (RFC 9068 §2.1, §4)")]
    BadTyp(String),
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("the token has no {0:?} claim (RFC 9068 §2.2)")]
    MissingClaim(&'static str),
    #[error(
        "the token has no tenant claim {0:?} (tokens.tenant_claim); the identity provider must name the tenant, or set tokens.default_tenant"
    )]
    MissingTenant(String),
    #[error("the claim {claim:?} is invalid: {detail}")]
    BadClaim { claim: &'static str, detail: String },
    #[error("invalid scope: {0}")]
    ScopeInvalid(String),
    #[error("invalid cnf claim: {0}")]
    CnfInvalid(String),
    #[error(
        "the cnf claim uses {0}, a confirmation method that is not supported (only jkt and jwk)"
    )]
    CnfUnsupported(String),
    #[error("the issuer {0} is not the configured one (RFC 9068 §4 step 3)")]
    IssuerMismatch(String),
    #[error("the audience does not include {0} (RFC 9068 §4 step 4, RFC 7519 §4.1.3)")]
    AudienceMismatch(String),
    #[error("the token expired {0}s ago (beyond the leeway; RFC 7519 §4.1.4)")]
    Expired(u64),
    #[error("the token is not valid for another {0}s (nbf, beyond the leeway; RFC 7519 §4.1.5)")]
    NotYetValid(u64),
    #[error("the token was issued {0}s in the future (iat, beyond the leeway)")]
    IssuedInFuture(u64),
    #[error("the token lives {lifetime}s (exp - iat), longer than the {max}s allowed")]
    LifetimeTooLong { lifetime: u64, max: u64 },
    #[error("the token's jti is revoked")]
    JtiRevoked,
    #[error("the token's subject is revoked")]
    SubjectRevoked,
    #[error("the token's identity {0} is revoked")]
    IdentityRevoked(String),
    #[error("another token with the same jti was already seen (RFC 7519 §4.1.7: jti is unique)")]
    JtiReused,
    #[error("too many live tokens to remember their jti; refusing new ones until some expire")]
    JtiStoreFull,
}

impl TokenError {
    /// A stable snake_case name for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::TooLarge { .. } => "token_too_large",
            TokenError::Truncated(_) => "token_truncated",
            TokenError::Segments(_) => "token_not_three_segments",
            TokenError::Base64 { .. } => "token_bad_base64",
            TokenError::HeaderNotObject(_) => "header_not_json_object",
            TokenError::PayloadNotObject(_) => "payload_not_json_object",
            TokenError::TooDeep(_) => "json_too_deep",
            TokenError::DuplicateHeader(_) => "duplicate_header_parameter",
            TokenError::DuplicateClaim(_) => "duplicate_claim",
            TokenError::BadHeader { .. } => "header_parameter_invalid",
            TokenError::MissingAlg => "missing_alg",
            TokenError::AlgNotAllowed { .. } => "alg_not_allowed",
            TokenError::MissingKid => "missing_kid",
            TokenError::UnknownKid(_) => "unknown_kid",
            TokenError::KeyRefused { .. } => "key_refused",
            TokenError::CritUnsupported(_) => "crit_unsupported",
            TokenError::BadTyp(_) => "typ_invalid",
            TokenError::BadSignature(_) => "bad_signature",
            TokenError::MissingClaim(claim) => match *claim {
                "iss" => "missing_iss",
                "aud" => "missing_aud",
                "sub" => "missing_sub",
                "exp" => "missing_exp",
                "iat" => "missing_iat",
                "jti" => "missing_jti",
                "client_id" => "missing_client_id",
                _ => "missing_claim",
            },
            // The claim is part of the code, so a dashboard tells an
            // audience problem from a clock problem without the detail.
            TokenError::MissingTenant(_) => "missing_tenant",
            TokenError::BadClaim { claim, .. } => match *claim {
                "iss" => "claim_invalid_iss",
                "aud" => "claim_invalid_aud",
                "sub" => "claim_invalid_sub",
                "exp" => "claim_invalid_exp",
                "nbf" => "claim_invalid_nbf",
                "iat" => "claim_invalid_iat",
                "jti" => "claim_invalid_jti",
                "roles" => "claim_invalid_roles",
                "tenant" => "claim_invalid_tenant",
                "client_id" => "claim_invalid_client_id",
                _ => "claim_invalid",
            },
            TokenError::ScopeInvalid(_) => "scope_invalid",
            TokenError::CnfInvalid(_) => "cnf_invalid",
            TokenError::CnfUnsupported(_) => "cnf_unsupported",
            TokenError::IssuerMismatch(_) => "issuer_mismatch",
            TokenError::AudienceMismatch(_) => "audience_mismatch",
            TokenError::Expired(_) => "token_expired",
            TokenError::NotYetValid(_) => "token_not_yet_valid",
            TokenError::IssuedInFuture(_) => "token_issued_in_future",
            TokenError::LifetimeTooLong { .. } => "token_lifetime_too_long",
            TokenError::JtiRevoked => "jti_revoked",
            TokenError::SubjectRevoked => "subject_revoked",
            TokenError::IdentityRevoked(_) => "identity_revoked",
            TokenError::JtiReused => "jti_reused",
            TokenError::JtiStoreFull => "jti_store_full",
        }
    }
}

/// A `jti` seen in a verified token, kept until the token is dead.
#[derive(Debug, Clone, Copy)]
struct SeenJti {
    token_hash: [u8; 32],
    until: SystemTime,
}

#[derive(Debug, Default)]
struct Cache {
    /// The key set the entries were verified under; a reload empties the
    /// cache (a removed key must not keep its tokens alive). Holding the Arc
    /// also keeps the pointer comparison free of address reuse.
    keys: Option<Arc<KeySet>>,
    entries: HashMap<[u8; 32], Arc<Claims>>,
}

/// Verifies access tokens against a policy and a hot-reloaded JWKS, with a
/// cache of verified tokens and revocation lists. `Send + Sync`; share it in
/// an `Arc`.
#[derive(Debug)]
pub struct Verifier {
    policy: TokenPolicy,
    keys: Arc<JwksFile>,
    cache: RwLock<Cache>,
    seen_jtis: Mutex<HashMap<[u8; 32], SeenJti>>,
    jti_capacity: usize,
    revoked_jtis: RwLock<HashMap<[u8; 32], SystemTime>>,
    revoked_subjects: RwLock<HashSet<String>>,
    revoked_identities: RwLock<HashSet<IdentityName>>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `t + d`, saturating at `t` on overflow (only reachable with an absurd
/// `now`; every use errs on the strict side then).
fn plus(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d).unwrap_or(t)
}

/// Whole seconds from `earlier` to `later` (0 if not later), for messages.
fn secs_between(earlier: SystemTime, later: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Verifier {
    /// A verifier for `policy` (its leeway capped at [`MAX_LEEWAY`]) with
    /// keys from `keys`.
    pub fn new(mut policy: TokenPolicy, keys: Arc<JwksFile>) -> Verifier {
        policy.leeway = policy.leeway.min(MAX_LEEWAY);
        let jti_capacity = policy.cache_entries.saturating_mul(4).max(MIN_JTI_ENTRIES);
        Verifier {
            policy,
            keys,
            cache: RwLock::new(Cache::default()),
            seen_jtis: Mutex::new(HashMap::new()),
            jti_capacity,
            revoked_jtis: RwLock::new(HashMap::new()),
            revoked_subjects: RwLock::new(HashSet::new()),
            revoked_identities: RwLock::new(HashSet::new()),
        }
    }

    /// The policy in force (leeway already capped).
    pub fn policy(&self) -> &TokenPolicy {
        &self.policy
    }

    /// The key file.
    pub fn keys(&self) -> &Arc<JwksFile> {
        &self.keys
    }

    /// Verifies a compact token at time `now`. A token verified before (same
    /// bytes, same key set) comes from the cache, re-checked only for expiry,
    /// `nbf` and revocation.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Arc<Claims>, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge { len: token.len() });
        }
        if token.is_empty() {
            return Err(TokenError::Truncated("it is empty".into()));
        }
        let token_hash = jwk::sha256(token.as_bytes());
        let keys = self.keys.current();
        if let Some(claims) = self.cached(&token_hash, &keys) {
            self.check_live(&claims, now)?;
            return Ok(claims);
        }
        let claims = self.verify_uncached(token, token_hash, &keys, now)?;
        self.remember_jti(&claims, now)?;
        let claims = Arc::new(claims);
        self.cache_insert(&keys, &claims, now);
        Ok(claims)
    }

    /// Revokes the token with this `jti` until `until` (give its `exp`); the
    /// entry is forgotten by [`Verifier::purge`] after that.
    pub fn revoke_jti(&self, jti: &str, until: SystemTime) {
        let mut revoked = write(&self.revoked_jtis);
        let entry = revoked.entry(jwk::sha256(jti.as_bytes())).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Revokes every token of this subject until [`Verifier::unrevoke_subject`].
    pub fn revoke_subject(&self, subject: &str) {
        write(&self.revoked_subjects).insert(subject.to_owned());
    }

    /// Lifts a subject revocation.
    pub fn unrevoke_subject(&self, subject: &str) {
        write(&self.revoked_subjects).remove(subject);
    }

    /// Revokes every token of one identity (a subject in one tenant).
    pub fn revoke_identity(&self, identity: &IdentityName) {
        write(&self.revoked_identities).insert(identity.clone());
    }

    pub fn unrevoke_identity(&self, identity: &IdentityName) {
        write(&self.revoked_identities).remove(identity);
    }

    /// Is the token revoked, by `jti` or by subject?
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.check_revoked(claims).is_err()
    }

    /// Drops cache entries, remembered `jti`s and `jti` revocations whose
    /// tokens are dead (expired beyond the leeway) at `now`.
    pub fn purge(&self, now: SystemTime) {
        let leeway = self.policy.leeway;
        write(&self.cache)
            .entries
            .retain(|_, claims| plus(claims.expires_at, leeway) > now);
        lock(&self.seen_jtis).retain(|_, seen| seen.until > now);
        write(&self.revoked_jtis).retain(|_, until| *until > now);
    }

    /// Number of cached verified tokens.
    pub fn cache_len(&self) -> usize {
        read(&self.cache).entries.len()
    }

    fn cached(&self, token_hash: &[u8; 32], keys: &Arc<KeySet>) -> Option<Arc<Claims>> {
        if self.policy.cache_entries == 0 {
            return None;
        }
        let cache = read(&self.cache);
        match &cache.keys {
            Some(k) if Arc::ptr_eq(k, keys) => cache.entries.get(token_hash).cloned(),
            _ => None,
        }
    }

    fn cache_insert(&self, keys: &Arc<KeySet>, claims: &Arc<Claims>, now: SystemTime) {
        let capacity = self.policy.cache_entries;
        if capacity == 0 {
            return;
        }
        let leeway = self.policy.leeway;
        let mut cache = write(&self.cache);
        if !cache.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            cache.entries.clear();
            cache.keys = Some(keys.clone());
        }
        if cache.entries.len() >= capacity {
            cache
                .entries
                .retain(|_, c| plus(c.expires_at, leeway) > now);
        }
        if cache.entries.len() >= capacity {
            // Still full of live tokens: drop the one dying soonest.
            let soonest = cache
                .entries
                .iter()
                .min_by_key(|(_, c)| c.expires_at)
                .map(|(hash, _)| *hash);
            if let Some(hash) = soonest {
                cache.entries.remove(&hash);
            }
        }
        cache.entries.insert(claims.token_hash, claims.clone());
    }

    /// Time and revocation: what can change for an already verified token.
    fn check_live(&self, claims: &Claims, now: SystemTime) -> Result<(), TokenError> {
        let leeway = self.policy.leeway;
        // RFC 7519 §4.1.4: "the current date/time MUST be before the
        // expiration date/time", with "some small leeway".
        if now >= plus(claims.expires_at, leeway) {
            return Err(TokenError::Expired(secs_between(claims.expires_at, now)));
        }
        // RFC 7519 §4.1.5: "the current date/time MUST be after or equal to
        // the not-before date/time", with leeway.
        if let Some(nbf) = claims.not_before
            && plus(now, leeway) < nbf
        {
            return Err(TokenError::NotYetValid(secs_between(now, nbf)));
        }
        // RFC 7519 §4.1.6 gives iat; one from the future is refused (a clock
        // or issuer problem, or a token minted ahead of time).
        if claims.issued_at > plus(now, leeway) {
            return Err(TokenError::IssuedInFuture(secs_between(
                now,
                claims.issued_at,
            )));
        }
        self.check_revoked(claims)
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), TokenError> {
        if read(&self.revoked_jtis).contains_key(&claims.jti_hash()) {
            return Err(TokenError::JtiRevoked);
        }
        if read(&self.revoked_subjects).contains(&claims.subject) {
            return Err(TokenError::SubjectRevoked);
        }
        let revoked = read(&self.revoked_identities);
        if !revoked.is_empty() {
            let id = IdentityName::new(claims.tenant.as_deref(), &claims.subject);
            if revoked.contains(&id) {
                return Err(TokenError::IdentityRevoked(id.display()));
            }
        }
        Ok(())
    }

    /// Remembers the `jti` until the token is dead, and refuses a different
    /// token carrying a `jti` already seen (RFC 7519 §4.1.7: a jti is unique
    /// to one token; a second one is an issuer fault or a forgery attempt).
    fn remember_jti(&self, claims: &Claims, now: SystemTime) -> Result<(), TokenError> {
        let key = claims.jti_hash();
        let until = plus(claims.expires_at, self.policy.leeway);
        let mut seen = lock(&self.seen_jtis);
        if let Some(old) = seen.get(&key)
            && old.until > now
        {
            return if old.token_hash == claims.token_hash {
                Ok(())
            } else {
                Err(TokenError::JtiReused)
            };
        }
        if seen.len() >= self.jti_capacity {
            seen.retain(|_, s| s.until > now);
            if seen.len() >= self.jti_capacity {
                // Fail closed: forgetting a live jti would forget a revocation
                // target and the reuse check.
                return Err(TokenError::JtiStoreFull);
            }
        }
        seen.insert(
            key,
            SeenJti {
                token_hash: claims.token_hash,
                until,
            },
        );
        Ok(())
    }

    /// Everything but the cache, time-of-use and revocation checks.
    fn verify_uncached(
        &self,
        token: &str,
        token_hash: [u8; 32],
        keys: &KeySet,
        now: SystemTime,
    ) -> Result<Claims, TokenError> {
        // RFC 7515 §7.1: BASE64URL(header) '.' BASE64URL(payload) '.'
        // BASE64URL(signature).
        let dots = token.bytes().filter(|&b| b == b'.').count();
        if dots != 2 {
            return Err(TokenError::Segments(dots + 1));
        }
        let (signing_input, sig_b64) = token.rsplit_once('.').ok_or(TokenError::Segments(1))?;
        let (header_b64, payload_b64) = signing_input
            .split_once('.')
            .ok_or(TokenError::Segments(2))?;
        if header_b64.is_empty() {
            return Err(TokenError::Truncated("the header segment is empty".into()));
        }
        if payload_b64.is_empty() {
            return Err(TokenError::Truncated("the payload segment is empty".into()));
        }

        // RFC 7515 §5.2 steps 2-4: decode and parse the protected header.
        let header = decode_object(header_b64, "header")?;
        let (alg, key) = self.check_header(&header, keys)?;

        // RFC 7515 §5.2 steps 6-8: the signature, before the payload is used.
        if sig_b64.is_empty() {
            return Err(TokenError::Truncated(
                "the signature segment is empty".into(),
            ));
        }
        let signature = jwk::b64url_decode(sig_b64).map_err(|detail| TokenError::Base64 {
            part: "signature",
            detail,
        })?;
        if signature.len() < key.signature_len() {
            return Err(TokenError::Truncated(format!(
                "the {alg} signature is {} bytes, expected {}",
                signature.len(),
                key.signature_len()
            )));
        }
        key.verify(alg, signing_input.as_bytes(), &signature)
            .map_err(|e| match e {
                JwkError::AlgNotAllowed { .. } => TokenError::AlgNotAllowed {
                    alg: alg.as_str().into(),
                    detail: e.to_string(),
                },
                other => TokenError::BadSignature(other.to_string()),
            })?;

        // RFC 7515 §5.2 step 9 / RFC 7519 §7.2 step 10: the claims.
        let payload = decode_object(payload_b64, "payload")?;
        self.claims(&payload, token_hash, now)
    }

    /// The protected header: returns the algorithm and the key to check it.
    fn check_header<'k>(
        &self,
        header: &Map<String, Value>,
        keys: &'k KeySet,
    ) -> Result<(Alg, &'k Jwk), TokenError> {
        // RFC 7515 §4.1.1: "alg" is REQUIRED. RFC 8725 §3.1: only algorithms
        // on the allow-list; "none" never (RFC 7518 §3.6 unsecured JWS).
        let alg_name = match header.get("alg") {
            None => return Err(TokenError::MissingAlg),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(TokenError::BadHeader {
                    param: "alg",
                    detail: "not a string".into(),
                });
            }
        };
        let alg = Alg::from_str(alg_name).map_err(|_| TokenError::AlgNotAllowed {
            alg: clip(alg_name),
            detail: if alg_name.eq_ignore_ascii_case("none") {
                "unsecured JWS is never accepted (RFC 8725 §3.1)".into()
            } else {
                "accepted: EdDSA, ES256, RS256, HS256 (RFC 8725 §3.1)".into()
            },
        })?;

        // RFC 7515 §4.1.11: "crit" lists extensions that MUST be understood;
        // we understand none, so any "crit" (even an invalid empty one) means
        // refusal.
        if let Some(crit) = header.get("crit") {
            let listed = match crit {
                Value::Array(names) => names
                    .iter()
                    .map(|n| n.as_str().map_or_else(|| "non-string".to_owned(), clip))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => "not an array".into(),
            };
            return Err(TokenError::CritUnsupported(listed));
        }
        // RFC 7797 §6: "b64" must be listed in "crit", which we refuse; a
        // bare "b64" is malformed.
        if header.contains_key("b64") {
            return Err(TokenError::BadHeader {
                param: "b64",
                detail: "unencoded payloads (RFC 7797) are not accepted".into(),
            });
        }

        // RFC 9068 §2.1 and §4 step 1 (RFC 8725 §3.11 explicit typing): typ
        // is "at+jwt" or "application/at+jwt"; media types compare
        // case-insensitively (RFC 7515 §4.1.9).
        if self.policy.require_typ {
            match header.get("typ") {
                Some(Value::String(typ))
                    if typ.eq_ignore_ascii_case("at+jwt")
                        || typ.eq_ignore_ascii_case("application/at+jwt") => {}
                Some(Value::String(typ)) => return Err(TokenError::BadTyp(clip(typ))),
                Some(_) => return Err(TokenError::BadTyp("not a string".into())),
                None => return Err(TokenError::BadTyp("missing".into())),
            }
        }

        // RFC 7515 §4.1.4: "kid" is a hint to the key; ours are selected by
        // it only (never by "jwk", "jku", "x5u" or "x5c": RFC 8725 §3.10).
        let kid = match header.get("kid") {
            None => return Err(TokenError::MissingKid),
            Some(Value::String(kid)) => kid,
            Some(_) => {
                return Err(TokenError::BadHeader {
                    param: "kid",
                    detail: "not a string".into(),
                });
            }
        };
        let key = keys.get(kid).ok_or_else(|| match keys.refused(kid) {
            // The key is there but the product refused it (a weak RSA key,
            // a shared secret while HS256 is off): say so, or the operator
            // hunts for a key that is in the file.
            Some(why) => TokenError::KeyRefused {
                kid: clip(kid),
                why: why.to_owned(),
            },
            None => TokenError::UnknownKid(clip(kid)),
        })?;
        // RFC 8725 §3.1 / §2.1: the key's one algorithm must be the header's
        // (this is what stops HS256 with an RSA public key as the secret).
        if key.alg != alg {
            return Err(TokenError::AlgNotAllowed {
                alg: alg.as_str().into(),
                detail: format!("key {} only verifies {}", clip(kid), key.alg),
            });
        }
        Ok((alg, key))
    }

    /// The claims of a signature-checked payload.
    fn claims(
        &self,
        payload: &Map<String, Value>,
        token_hash: [u8; 32],
        now: SystemTime,
    ) -> Result<Claims, TokenError> {
        let policy = &self.policy;
        // RFC 9068 §2.2: iss, exp, aud, sub, client_id, iat, jti are
        // REQUIRED (client_id unless the policy opts out for an identity
        // provider that omits it).
        // RFC 9068 §4 step 3 / RFC 7519 §4.1.1: iss must match exactly.
        let issuer = required_str(payload, "iss")?;
        if issuer != policy.issuer {
            return Err(TokenError::IssuerMismatch(clip(issuer)));
        }
        // RFC 9068 §4 step 4 / RFC 7519 §4.1.3: aud is a string or an array
        // of strings and must contain our audience.
        let audience_ok = match payload.get("aud") {
            None => return Err(TokenError::MissingClaim("aud")),
            Some(Value::String(aud)) => *aud == policy.audience,
            Some(Value::Array(auds)) => {
                let mut found = false;
                for aud in auds {
                    let Value::String(aud) = aud else {
                        return Err(TokenError::BadClaim {
                            claim: "aud",
                            detail: "the array holds a non-string".into(),
                        });
                    };
                    found |= *aud == policy.audience;
                }
                found
            }
            Some(_) => {
                return Err(TokenError::BadClaim {
                    claim: "aud",
                    detail: "neither a string nor an array of strings".into(),
                });
            }
        };
        if !audience_ok {
            return Err(TokenError::AudienceMismatch(clip(&policy.audience)));
        }

        let expires_at = numeric_date(payload, "exp")?.ok_or(TokenError::MissingClaim("exp"))?;
        let issued_at = numeric_date(payload, "iat")?.ok_or(TokenError::MissingClaim("iat"))?;
        let not_before = numeric_date(payload, "nbf")?;
        let subject = required_str(payload, "sub")?.to_owned();
        let jti = required_str(payload, "jti")?.to_owned();

        // Short-lived tokens only: exp - iat at most the policy's maximum.
        let lifetime = expires_at
            .duration_since(issued_at)
            .map_err(|_| TokenError::BadClaim {
                claim: "exp",
                detail: "exp is before iat".into(),
            })?;
        let mut claims = Claims {
            subject,
            tenant: None,
            client_id: None,
            roles: Vec::new(),
            scopes: Vec::new(),
            issuer: issuer.to_owned(),
            jti,
            issued_at,
            not_before,
            expires_at,
            cnf: None,
            token_hash,
        };
        // Time first: an expired token is reported as expired.
        self.check_live(&claims, now)?;
        if lifetime > policy.max_lifetime {
            return Err(TokenError::LifetimeTooLong {
                lifetime: lifetime.as_secs(),
                max: policy.max_lifetime.as_secs(),
            });
        }

        claims.client_id = match payload.get("client_id") {
            None if policy.require_client_id => return Err(TokenError::MissingClaim("client_id")),
            None => None,
            Some(_) => Some(required_str(payload, "client_id")?.to_owned()),
        };
        claims.tenant = match &policy.tenant_claim {
            None => None,
            Some(name) => match payload.get(name.as_str()) {
                None => match &policy.default_tenant {
                    Some(t) => Some(t.clone()),
                    None => return Err(TokenError::MissingTenant(clip(name))),
                },
                Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
                Some(_) => {
                    return Err(TokenError::BadClaim {
                        claim: "tenant",
                        detail: format!(
                            "the tenant claim {} is not a non-empty string",
                            clip(name)
                        ),
                    });
                }
            },
        };
        claims.roles = roles(payload)?;
        claims.scopes = scopes(payload)?;
        claims.cnf = confirmation(payload)?;
        // Again now that the tenant is known: an identity revocation names
        // the tenant too.
        self.check_revoked(&claims)?;
        Ok(claims)
    }
}

/// Decodes a base64url segment and parses it as a strict JSON object.
fn decode_object(segment: &str, part: &'static str) -> Result<Map<String, Value>, TokenError> {
    let bytes =
        jwk::b64url_decode(segment).map_err(|detail| TokenError::Base64 { part, detail })?;
    jwk::parse_object(&bytes).map_err(|e| match (e, part) {
        (JsonError::Duplicate(name), "header") => TokenError::DuplicateHeader(clip(&name)),
        (JsonError::Duplicate(name), _) => TokenError::DuplicateClaim(clip(&name)),
        (JsonError::TooDeep, _) => TokenError::TooDeep(part),
        (other, "header") => TokenError::HeaderNotObject(other.to_string()),
        (other, _) => TokenError::PayloadNotObject(other.to_string()),
    })
}

/// A required, non-empty string claim.
fn required_str<'a>(
    payload: &'a Map<String, Value>,
    claim: &'static str,
) -> Result<&'a str, TokenError> {
    match payload.get(claim) {
        None => Err(TokenError::MissingClaim(claim)),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(TokenError::BadClaim {
            claim,
            detail: "not a non-empty string".into(),
        }),
    }
}

/// A NumericDate claim (RFC 7519 §2: seconds since the epoch, "non-integer
/// values can be represented"), between 1970 and the year 9999.
fn numeric_date(
    payload: &Map<String, Value>,
    claim: &'static str,
) -> Result<Option<SystemTime>, TokenError> {
    let Some(value) = payload.get(claim) else {
        return Ok(None);
    };
    let bad = |detail: &str| TokenError::BadClaim {
        claim,
        detail: detail.into(),
    };
    let since_epoch = match value {
        Value::Number(n) => if let Some(secs) = n.as_u64() {
            (secs <= MAX_NUMERIC_DATE).then(|| Duration::from_secs(secs))
        } else {
            n.as_f64()
                .filter(|f| (0.0..=MAX_NUMERIC_DATE as f64).contains(f))
                .and_then(|f| Duration::try_from_secs_f64(f).ok())
        }
        .ok_or_else(|| bad("not a NumericDate between 1970 and 9999"))?,
        _ => return Err(bad("not a number (RFC 7519 §2 NumericDate)")),
    };
    Ok(Some(SystemTime::UNIX_EPOCH + since_epoch))
}

/// `roles`: an array of non-empty strings (RFC 9068 §7.2.1.1 / RFC 7643 §4.1.2).
fn roles(payload: &Map<String, Value>) -> Result<Vec<String>, TokenError> {
    let Some(value) = payload.get("roles") else {
        return Ok(Vec::new());
    };
    let bad = || TokenError::BadClaim {
        claim: "roles",
        detail: "not an array of non-empty strings".into(),
    };
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let mut roles: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::String(role) if !role.is_empty() => {
                if !roles.contains(role) {
                    roles.push(role.clone());
                }
            }
            _ => return Err(bad()),
        }
    }
    Ok(roles)
}

/// A scope-token (RFC 6749 §3.3: 1*( %x21 / %x23-5B / %x5D-7E )).
fn scope_token_ok(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

/// `model:` scopes from `scope` (RFC 9068 §2.2.3 / RFC 8693 §4.2: a
/// space-separated string) and `scp` (an array of strings).
fn scopes(payload: &Map<String, Value>) -> Result<Vec<Scope>, TokenError> {
    let mut tokens: Vec<&str> = Vec::new();
    match payload.get("scope") {
        None => {}
        // RFC 6749 §3.3: scope = scope-token *( SP scope-token ).
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => {
            for token in s.split(' ') {
                if !scope_token_ok(token) {
                    return Err(TokenError::ScopeInvalid(format!(
                        "\"scope\" is not scope-tokens separated by single spaces (RFC 6749 §3.3): {}",
                        clip(s)
                    )));
                }
                tokens.push(token);
            }
        }
        Some(_) => {
            return Err(TokenError::ScopeInvalid(
                "\"scope\" is not a string (RFC 8693 §4.2)".into(),
            ));
        }
    }
    match payload.get("scp") {
        None => {}
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(token) if scope_token_ok(token) => tokens.push(token),
                    _ => {
                        return Err(TokenError::ScopeInvalid(
                            "\"scp\" holds something that is not a scope-token".into(),
                        ));
                    }
                }
            }
        }
        Some(_) => {
            return Err(TokenError::ScopeInvalid(
                "\"scp\" is not an array of strings".into(),
            ));
        }
    }
    let mut scopes: Vec<Scope> = Vec::new();
    for token in tokens {
        if let Some(scope) = Scope::parse(token)?
            && !scopes.contains(&scope)
        {
            scopes.push(scope);
        }
    }
    Ok(scopes)
}

/// `cnf` (RFC 7800 §3.1): exactly one confirmation method, `jkt` (RFC 9449
/// §6.1) or `jwk` (RFC 7800 §3.2). Methods we cannot enforce (`jwe`, `kid`,
/// `jku`, `x5t#S256`, ...) refuse the token rather than silently turning a
/// bound token into a bearer one.
fn confirmation(payload: &Map<String, Value>) -> Result<Option<Confirmation>, TokenError> {
    let Some(cnf) = payload.get("cnf") else {
        return Ok(None);
    };
    let Value::Object(cnf) = cnf else {
        return Err(TokenError::CnfInvalid("not a JSON object".into()));
    };
    if let Some(other) = cnf.keys().find(|k| !matches!(k.as_str(), "jkt" | "jwk")) {
        return Err(TokenError::CnfUnsupported(clip(other)));
    }
    match (cnf.get("jkt"), cnf.get("jwk")) {
        (Some(_), Some(_)) => Err(TokenError::CnfInvalid(
            "both jkt and jwk: a cnf names one proof-of-possession key (RFC 7800 §3.1)".into(),
        )),
        (Some(Value::String(jkt)), None) => {
            // RFC 9449 §6.1: base64url SHA-256 thumbprint (32 bytes).
            match jwk::b64url_decode(jkt) {
                Ok(bytes) if bytes.len() == 32 => Ok(Some(Confirmation::Jkt(jkt.clone()))),
                _ => Err(TokenError::CnfInvalid(
                    "jkt is not a base64url SHA-256 thumbprint (RFC 9449 §6.1)".into(),
                )),
            }
        }
        (Some(_), None) => Err(TokenError::CnfInvalid("jkt is not a string".into())),
        (None, Some(Value::Object(key))) => {
            let key =
                Jwk::from_map(key).map_err(|e| TokenError::CnfInvalid(format!("jwk: {e}")))?;
            // A symmetric key in a token would be readable by every holder.
            if key.alg.is_symmetric() {
                return Err(TokenError::CnfInvalid(
                    "jwk is a symmetric key; only public keys can confirm possession".into(),
                ));
            }
            Ok(Some(Confirmation::Jwk(key)))
        }
        (None, Some(_)) => Err(TokenError::CnfInvalid("jwk is not a JSON object".into())),
        (None, None) => Err(TokenError::CnfInvalid("empty".into())),
    }
}

#[cfg(test)]
mod tests;
