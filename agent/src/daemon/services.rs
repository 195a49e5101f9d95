//! Putting a new set of protected services in force while the agent runs:
//! the control API's `Services` add and remove, and a SIGHUP whose config
//! file changed `[[services]]`. One path for both, in an order that never
//! leaves a part of the agent with a service another part lacks:
//!
//! 1. the policy set must not name a service that goes (checked before
//!    anything changes; the hot reload keeps refusing such policies),
//! 2. the enforcer cuts the admissions of removed services and rewrites
//!    the kernel's port tables (`agent/src/enforce/mod.rs`),
//! 3. admission and accounting take the new services and prices,
//! 4. each cut is recorded as a `Revocation` of the service.

use std::sync::Arc;

use portcullis_proto::v1::{self, event::Body};

use super::node::Node;
use crate::{
    config::{Config, ConfigError},
    enforce::ServicesChanged,
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The edit does not validate (the field is named).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// A policy names a service that would go.
    #[error("{0}; apply a policy set without it first (portcullis ctl policy apply DIR)")]
    Policy(String),
    #[error("kernel maps: {0}")]
    Kernel(String),
}

/// Makes the services of `edit(configuration in force)` the node's; `why`
/// goes into the records. Edits run one at a time, so two cannot both
/// validate against the same services.
pub fn edit(
    node: &Node,
    why: &str,
    edit: impl FnOnce(&Config) -> Result<Config, ConfigError>,
) -> Result<ServicesChanged, ApplyError> {
    let _one = node.service_edits.lock().unwrap_or_else(|p| p.into_inner());
    let old = node.cfg();
    let next = Arc::new(edit(&old)?);
    let names = |c: &Config| -> Vec<String> { c.services.iter().map(|s| s.name.clone()).collect() };
    let store = node
        .knocks
        .as_ref()
        .map(|k| k.service.admitter().policies());
    if let Some(store) = &store {
        let known = names(&next);
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        store
            .set_services(&known)
            .map_err(|e| ApplyError::Policy(e.to_string()))?;
    }
    let change = match node.enforcer.replace_services(next.clone()) {
        Ok(c) => c,
        Err(e) => {
            if let Some(store) = &store {
                let known = names(&old);
                let known: Vec<&str> = known.iter().map(String::as_str).collect();
                let _ = store.set_services(&known);
            }
            return Err(ApplyError::Kernel(e.to_string()));
        }
    };
    if let Some(k) = &node.knocks {
        let gone: Vec<u32> = old
            .services
            .iter()
            .filter(|s| change.removed.iter().any(|(n, _)| *n == s.name))
            .map(|s| s.id)
            .collect();
        k.service
            .admitter()
            .forget_where(|at: &crate::admission::grants::AdmissionRef, _: &_| {
                gone.contains(&at.1)
            });
        k.service.admitter().set_services(&next);
    }
    node.accountant().set_prices(&next);
    for (name, admissions) in &change.removed {
        let ev = v1::Revocation {
            target_kind: "service".to_string(),
            target: name.clone(),
            reason: format!("service removed ({why})"),
            admissions_removed: u32::try_from(*admissions).unwrap_or(u32::MAX),
            identities: Vec::new(),
        };
        if let Err(e) = node.auditor.record(Body::Revocation(ev)) {
            tracing::error!(event = "audit_failed", error = %e, "service removal not audited");
        }
    }
    tracing::warn!(
        event = "services_changed",
        added = ?change.added,
        removed = ?change.removed,
        changed = ?change.changed,
        admissions_removed = change.admissions_removed,
        flows_removed = change.flows_removed,
        why,
        "protected services changed"
    );
    Ok(change)
}
