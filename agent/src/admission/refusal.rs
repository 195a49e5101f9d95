//! Why admission said no, and who it said no to: the stable reason names
//! are what metrics count and audit records carry.

use std::net::IpAddr;

use portcullis_knock::KnockError;
use portcullis_proto::v1;

use crate::{admission::token::TokenError, identity::IdentityName, policy::Method};

/// A decision against a knock.
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
    /// A budget's forecast reached its `deny` threshold.
    #[error(
        "budget {} denies: forecast {} of {} micro-units ({}%), spent {}; ask for an approval (`portcullis ctl budget approve`) or wait for the period to end",
        .0.budget, .0.forecast_micros, .0.amount_micros, .0.forecast_percent, .0.spent_micros
    )]
    Budget(Box<crate::budget::Verdict>),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Knock(e) => e.reason(),
            Refusal::Token(e) => e.reason(),
            Refusal::UnknownService(_) => "unknown_service",
            Refusal::Scope { .. } => "scope",
            Refusal::Policy { .. } => "policy",
            Refusal::IdentityQuota { .. } => "identity_quota",
            Refusal::Budget(_) => "budget",
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
    /// A knock or the control API's `Admit`.
    pub method: Method,
}

/// How the audit trail names an admission method.
pub fn audit_method(m: Method) -> v1::AdmissionMethod {
    match m {
        Method::Knock => v1::AdmissionMethod::Knock,
        Method::AdmitRpc => v1::AdmissionMethod::Control,
    }
}

impl Attempt {
    /// The audit record of refusing this attempt for `reason` (`detail`
    /// says why in words).
    pub fn denied_event(&self, reason: &str, detail: String) -> v1::AdmissionDenied {
        v1::AdmissionDenied {
            identity: self.subject.clone(),
            tenant: self.tenant.clone().unwrap_or_default(),
            service: self.service.clone(),
            model_version: self.model_version.clone(),
            source: self.source.map(|s| s.to_string()).unwrap_or_default(),
            source_port: u32::from(self.source_port),
            method: audit_method(self.method) as i32,
            policies: self.policies.clone(),
            policy_version: self.policy_version.clone(),
            jti_sha256: self.jti_hash.to_vec(),
            reason: reason.to_string(),
            detail,
            action: self.action.to_string(),
            identity_name: IdentityName::new(self.tenant.as_deref(), &self.subject).display(),
        }
    }
}

/// A refused knock and, once the token verified, who it was.
#[derive(Debug)]
pub struct Denied {
    pub refusal: Refusal,
    pub attempt: Option<Box<Attempt>>,
}

impl Denied {
    pub(crate) fn bare(refusal: impl Into<Refusal>) -> Denied {
        Denied {
            refusal: refusal.into(),
            attempt: None,
        }
    }
}
