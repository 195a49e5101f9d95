//! `Revoke`: what a request names, cut in the kernel before the call
//! returns. Tokens and identities go through the revocations path of
//! `agent/src/daemon/upkeep.rs` (refused from now on, recorded in
//! `tokens.revocations_file` when there is one); sources, tenants and
//! services are cut from the kernel and from admission's registry. A target
//! that holds nothing is `NOT_FOUND` and nothing changes.

use std::net::IpAddr;

use portcullis_proto::v1::{self, event::Body, revoke_request::Target};
use tonic::Status;

use super::{Node, listing::unknown_service};
use crate::{
    admission::{admitter::IdentityMatch, revocations::Entry},
    enforce::{Cut, CutTarget},
    identity::IdentityName,
};

/// Revokes `target`; `reason` goes into the audit record.
pub fn revoke(node: &Node, target: &Target, reason: &str) -> Result<v1::RevokeReply, Status> {
    let reason = if reason.is_empty() {
        "control API".to_string()
    } else {
        format!("control API: {reason}")
    };
    let cut = match target {
        Target::Identity(r) => identity(node, r, &reason)?,
        Target::Jti(jti) => token(node, jti, &reason)?,
        Target::Source(text) => {
            let ip: IpAddr = text.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "source {text:?} is not an IP address; give e.g. 10.0.0.7"
                ))
            })?;
            let ip = ip.to_canonical();
            cut_and_record(
                node,
                CutTarget::Source(ip),
                "source",
                &ip.to_string(),
                &reason,
                |at, _| at.0 == ip,
            )?
        }
        Target::Tenant(t) => {
            if t.is_empty() {
                return Err(Status::invalid_argument(
                    "tenant is empty; name the tenant to revoke",
                ));
            }
            let m = IdentityMatch::Tenant(t.clone());
            cut_and_record(
                node,
                CutTarget::Identities(&m),
                "tenant",
                t,
                &reason,
                |_, id| id.tenant.as_deref() == Some(t.as_str()),
            )?
        }
        Target::Service(name) => {
            let id = node
                .cfg()
                .service(name)
                .ok_or_else(|| unknown_service(&node.cfg(), name))?
                .id;
            cut_and_record(
                node,
                CutTarget::Service(id),
                "service",
                name,
                &reason,
                |at, _| at.1 == id,
            )?
        }
    };
    Ok(v1::RevokeReply {
        admissions_removed: u32::try_from(cut.admissions).unwrap_or(u32::MAX),
        flows_removed: u32::try_from(cut.flows).unwrap_or(u32::MAX),
        identities: cut.identities,
    })
}

fn identity(node: &Node, r: &v1::IdentityRef, reason: &str) -> Result<Cut, Status> {
    if r.subject.is_empty() {
        return Err(Status::invalid_argument(
            "identity.subject is empty; give the token's subject (and its tenant, if it has one)",
        ));
    }
    let name = IdentityName::new(
        (!r.tenant.is_empty()).then_some(r.tenant.as_str()),
        &r.subject,
    );
    let in_kernel = node
        .enforcer
        .observe(|m| m.live_identities())
        .map_err(internal)?
        .iter()
        .any(|(_, id, n)| {
            id.state == portcullis_common::IDENTITY_LIVE
                && IdentityName::parse(n).as_ref() == Some(&name)
        });
    let held = node
        .knocks
        .as_ref()
        .is_some_and(|k| k.service.admitter().holds_identity(&name));
    if !in_kernel && !held {
        return Err(Status::not_found(format!(
            "identity {} holds no admission on this node; nothing was revoked (to refuse its tokens before they are used, add `id:{}` to tokens.revocations_file)",
            name.display(),
            name.display()
        )));
    }
    match &node.knocks {
        Some(k) => {
            let done = k
                .revoke_entry(Entry::Identity(name), reason)
                .map_err(|e| Status::internal(format!("{e:#}")))?;
            Ok(Cut {
                admissions: done.admissions,
                flows: done.flows,
                identities: done.events.into_iter().flat_map(|e| e.identities).collect(),
            })
        }
        None => cut_and_record(
            node,
            CutTarget::Identities(&IdentityMatch::Identity(name.clone())),
            "identity",
            &name.display(),
            reason,
            |_, _| false,
        ),
    }
}

fn token(node: &Node, jti: &str, reason: &str) -> Result<Cut, Status> {
    if jti.is_empty() || jti.len() > 1024 || jti.contains(['\n', '\r']) {
        return Err(Status::invalid_argument(
            "jti must be one non-empty line of at most 1024 bytes",
        ));
    }
    let Some(k) = &node.knocks else {
        return Err(Status::failed_precondition(
            "this node admits no tokens (no [tokens] section), so no admission came from a jti",
        ));
    };
    if !k.service.admitter().holds_jti(jti) {
        return Err(Status::not_found(
            "no live admission came from this jti; nothing was revoked (to refuse the token before it is used, add `jti:...` to tokens.revocations_file)",
        ));
    }
    let done = k
        .revoke_entry(Entry::Jti(jti.to_string()), reason)
        .map_err(|e| Status::internal(format!("{e:#}")))?;
    Ok(Cut {
        admissions: done.admissions,
        flows: done.flows,
        identities: Vec::new(),
    })
}

/// Cuts `target` in the kernel, forgets what admission tracked of it, and
/// records the revocation; `NOT_FOUND` when it held nothing.
fn cut_and_record(
    node: &Node,
    target: CutTarget<'_>,
    kind: &str,
    what: &str,
    reason: &str,
    tracked: impl Fn(&crate::admission::grants::AdmissionRef, &IdentityName) -> bool,
) -> Result<Cut, Status> {
    let cut = node.enforcer.cut(target).map_err(internal)?;
    if let Some(k) = &node.knocks {
        k.service.admitter().forget_where(&tracked);
    }
    if cut.admissions == 0 && cut.flows == 0 && cut.identities.is_empty() {
        return Err(Status::not_found(format!(
            "{kind} {what} holds no admission or flow on this node; nothing was revoked"
        )));
    }
    let ev = v1::Revocation {
        target_kind: kind.to_string(),
        target: what.to_string(),
        reason: reason.to_string(),
        admissions_removed: u32::try_from(cut.admissions).unwrap_or(u32::MAX),
        identities: cut.identities.clone(),
    };
    if let Err(e) = node.auditor.record(Body::Revocation(ev)) {
        tracing::error!(event = "audit_failed", error = %e, "revocation not audited");
    }
    tracing::info!(
        event = "revocation",
        kind,
        target = what,
        admissions = cut.admissions,
        flows = cut.flows,
        reason,
        "revoked through the control API"
    );
    Ok(cut)
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("kernel maps: {e}"))
}
