//! The budget loop, once a second after the accounting tick: records what
//! the budgets and approvals changed, applies the budgets' verdicts to
//! every live knock-granted admission (a `throttle` lowers the identity's
//! kernel rates, a `deny` revokes the admission), and runs the extraction
//! guard (a Detection and an egress cap). Decisions come from
//! `agent/src/budget/`; the kernel is written through the enforcer and the
//! trail through the auditor.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Mutex,
    time::SystemTime,
};

use portcullis_proto::v1::{self, event::Body};

use super::node::Node;
use crate::{
    accounting::budgets::News,
    budget::{Action, guard::Guard},
    enforce::{CutTarget, clamp::Clamp},
};

/// What the metrics show of cost control.
#[derive(Debug, Default, Clone)]
pub struct BudgetState {
    /// Identities throttled and egress-capped now.
    pub throttled: usize,
    pub capped: usize,
    pub capped_identities: Vec<String>,
    /// Admissions revoked by budgets, extraction episodes opened, since
    /// start.
    pub revoked: u64,
    pub extraction_opened: u64,
}

#[derive(Default)]
pub struct BudgetLoop {
    guard: Guard,
    revoked: u64,
}

fn action(a: Option<Action>) -> String {
    a.map_or("", Action::as_str).to_string()
}

impl BudgetLoop {
    pub fn tick(&mut self, node: &Node, view: &Mutex<BudgetState>, now: SystemTime) {
        let cfg = node.cfg();
        let (news, traffic, t) = {
            let mut acct = node.accountant();
            let t = acct.periods().2;
            (acct.take_news(), acct.traffic().clone(), t)
        };
        for n in news {
            record(node, n);
        }
        let detections = self
            .guard
            .observe(&cfg.cost_control.extraction, now, t, &traffic);
        for d in detections {
            if d.open {
                tracing::warn!(event = "detection", kind = %d.kind, subject = %d.subject, rate = d.rate, threshold = d.threshold, detail = %d.detail, "extraction guard: egress capped");
            } else {
                tracing::info!(event = "detection", kind = %d.kind, subject = %d.subject, peak = d.rate, duration_ms = d.duration_ms, "extraction guard: cap lifted");
            }
            if let Err(e) = node.auditor.record(Body::Detection(d)) {
                tracing::error!(event = "audit_failed", error = %e, "detection not audited");
            }
        }

        // Verdicts on every live knock-granted admission.
        let budgets = node.book.budgets();
        let mut clamps: HashMap<String, Clamp> = HashMap::new();
        let mut doomed = Vec::new();
        if let Some(k) = &node.knocks {
            for (at, who, service) in k.service.admitter().live_grants() {
                let name = who.display();
                let v = budgets.verdict(&name, who.tenant.as_deref().unwrap_or(""), Some(&service));
                match v.enforced() {
                    Some(Action::Deny) => doomed.push((at, name, service, v)),
                    Some(Action::Throttle) => {
                        let c = clamps.entry(name).or_insert_with(|| Clamp {
                            limits_of: who.subject.clone(),
                            ..Clamp::default()
                        });
                        c.throttle_percent = Some(
                            c.throttle_percent
                                .map_or(v.throttle_percent, |p| p.min(v.throttle_percent)),
                        );
                    }
                    _ => {}
                }
            }
        }
        let capped: BTreeSet<String> = self.guard.capped().map(str::to_string).collect();
        for name in &capped {
            let limits_of = crate::identity::IdentityName::parse(name)
                .map_or_else(|| name.clone(), |n| n.subject);
            clamps
                .entry(name.clone())
                .or_insert_with(|| Clamp {
                    limits_of,
                    ..Clamp::default()
                })
                .egress_cap = Some(cfg.cost_control.extraction.cap_bytes_per_sec);
        }
        let throttled = clamps
            .values()
            .filter(|c| c.throttle_percent.is_some())
            .count();
        match node.enforcer.set_clamps(clamps) {
            Ok(written) if !written.is_empty() => {
                tracing::info!(event = "rates_rewritten", identities = ?written, "kernel rates of clamped or released identities rewritten");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(event = "clamp_failed", error = %e, "kernel rates not changed this second")
            }
        }
        for (at, name, service, v) in doomed {
            match node.enforcer.cut(CutTarget::Admissions(&[at])) {
                Ok(cut) => {
                    if let Some(k) = &node.knocks {
                        k.service.admitter().forget(&at);
                    }
                    self.revoked += 1;
                    tracing::warn!(event = "budget_revoked", identity = %name, service = %service, budget = %v.budget, flows = cut.flows, "budget denies: admission revoked");
                    let ev = v1::Revocation {
                        target_kind: "budget".into(),
                        target: name.clone(),
                        reason: format!(
                            "budget {} denies {name} at {service}: forecast {} of {} micro-units, spent {}",
                            v.budget, v.forecast_micros, v.amount_micros, v.spent_micros
                        ),
                        admissions_removed: u32::try_from(cut.admissions).unwrap_or(u32::MAX),
                        identities: vec![name],
                    };
                    if let Err(e) = node.auditor.record(Body::Revocation(ev)) {
                        tracing::error!(event = "audit_failed", error = %e, "budget revocation not audited");
                    }
                }
                Err(e) => {
                    tracing::error!(event = "budget_revoke_failed", error = %e, identity = %name, "admission over budget not revoked; retried next second")
                }
            }
        }
        let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
        v.throttled = throttled;
        v.capped = capped.len();
        v.capped_identities = capped.into_iter().collect();
        v.revoked = self.revoked;
        v.extraction_opened = self.guard.opened();
    }
}

/// Records one budget event (and logs it).
fn record(node: &Node, n: News) {
    let ev = match n {
        News::Threshold(tr, scope) => {
            let r = &tr.reading;
            let now = r.level.map(|l| l.action);
            if now > tr.from {
                tracing::warn!(event = "budget", budget = %r.budget, key = %r.key, action = %action(now), spent = r.spent_micros, forecast = r.forecast_micros, amount = r.amount_micros, "budget threshold reached");
            } else {
                tracing::info!(event = "budget", budget = %r.budget, key = %r.key, action = %action(now), was = %action(tr.from), "budget action lowered");
            }
            v1::BudgetEvent {
                kind: "threshold".into(),
                budget: r.budget.clone(),
                scope,
                key: r.key.clone(),
                period: r.period.as_str().into(),
                action: action(now),
                previous: action(tr.from),
                amount_micros: r.amount_micros,
                spent_micros: r.spent_micros,
                forecast_micros: r.forecast_micros,
                rate_micros_per_hour: r.rate_micros_per_hour,
                threshold_percent: r.level.map_or(0, |l| l.percent),
                horizon_secs: r.horizon_secs,
                ..Default::default()
            }
        }
        News::ApprovalEnded(e) => {
            tracing::info!(event = "budget_approval_ended", identity = %e.identity, why = e.why, "approval ended");
            v1::BudgetEvent {
                kind: "approval_ended".into(),
                identity: e.identity,
                amount_micros: e.approval.amount_micros,
                used_micros: e.approval.used_micros,
                until_unix_ms: e.approval.until_secs.saturating_mul(1_000),
                by: e.approval.by,
                detail: e.why.into(),
                ..Default::default()
            }
        }
    };
    if let Err(e) = node.auditor.record(Body::Budget(ev)) {
        tracing::error!(event = "audit_failed", error = %e, "budget event not audited");
    }
}
