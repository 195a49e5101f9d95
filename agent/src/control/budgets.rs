//! `Budget` and `Spend`: the budgets in force with their meters and the
//! approvals, run-time budget edits and approvals (each checked by the
//! one validation the config uses, persisted in the ledger and audited
//! before the reply), and spend to date with the forecast and the
//! budgets' verdict (docs/cost-control.md).

use portcullis_proto::v1::{self, budget_request::Op, event::Body};
use tonic::Status;

use super::Node;
use crate::{
    accounting::{SpendBy, budgets::EditError},
    budget::{Budget, BudgetDraft, BudgetView},
};

fn spec(b: &Budget) -> v1::BudgetSpec {
    v1::BudgetSpec {
        name: b.name.clone(),
        identity: b.scope.identity.clone().unwrap_or_default(),
        tenant: b.scope.tenant.clone().unwrap_or_default(),
        service: b.scope.service.clone().unwrap_or_default(),
        period: b.period.as_str().into(),
        amount_micros: i64::try_from(b.amount_micros).unwrap_or(i64::MAX),
        thresholds: b
            .thresholds
            .iter()
            .map(|t| v1::ThresholdSpec {
                percent: i64::from(t.percent),
                action: t.action.as_str().into(),
            })
            .collect(),
        throttle_percent: i64::from(b.throttle_percent),
    }
}

fn draft(s: &v1::BudgetSpec) -> BudgetDraft {
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_string());
    BudgetDraft {
        name: s.name.clone(),
        identity: opt(&s.identity),
        tenant: opt(&s.tenant),
        service: opt(&s.service),
        period: s.period.clone(),
        amount_micros: i128::from(s.amount_micros),
        thresholds: s
            .thresholds
            .iter()
            .map(|t| (t.percent, t.action.clone()))
            .collect(),
        throttle_percent: (s.throttle_percent != 0).then_some(s.throttle_percent),
    }
}

fn refused(e: EditError) -> Status {
    match e {
        EditError::Invalid(e) => Status::invalid_argument(e.to_string()),
        EditError::Ledger(e) => Status::unavailable(format!("not kept: {e}")),
    }
}

fn reply(node: &Node, view: &BudgetView) -> v1::BudgetReply {
    let list = node.accountant().budget_list();
    let budgets = list
        .iter()
        .map(|(b, origin)| {
            let mut meters: Vec<v1::MeterInfo> = view
                .readings
                .values()
                .filter(|r| r.budget == b.name)
                .map(|r| v1::MeterInfo {
                    key: r.key.clone(),
                    spent_micros: r.spent_micros,
                    forecast_micros: r.forecast_micros,
                    rate_micros_per_hour: r.rate_micros_per_hour,
                    forecast_percent: r.forecast_percent(),
                    action: r.level.map_or("", |l| l.action.as_str()).into(),
                    horizon_secs: r.horizon_secs,
                })
                .collect();
            meters.sort_by(|a, b| a.key.cmp(&b.key));
            v1::BudgetInfo {
                spec: Some(spec(b)),
                origin: origin.as_str().into(),
                meters,
            }
        })
        .collect();
    v1::BudgetReply {
        budgets,
        approvals: view
            .approvals
            .iter()
            .map(|(identity, a)| v1::ApprovalInfo {
                identity: identity.clone(),
                amount_micros: a.amount_micros,
                used_micros: a.used_micros,
                until_unix_secs: a.until_secs,
                by: a.by.clone(),
                reason: a.reason.clone(),
            })
            .collect(),
        currency: node.cfg().accounting.currency.clone(),
        ..Default::default()
    }
}

fn audit(node: &Node, ev: v1::BudgetEvent) {
    if let Err(e) = node.auditor.record(Body::Budget(ev)) {
        tracing::error!(event = "audit_failed", error = %e, "budget change not audited");
    }
}

/// One `Budget` call by `caller`. Edits run under the accountant's lock
/// and are persisted (ledger) before they are audited and answered.
pub fn budget(
    node: &Node,
    req: &v1::BudgetRequest,
    caller: &str,
) -> Result<v1::BudgetReply, Status> {
    let op = req.op.as_ref().ok_or_else(|| {
        Status::invalid_argument("op is missing; give list, set, remove or approve")
    })?;
    let mut warnings = Vec::new();
    let mut replaced = false;
    match op {
        Op::List(_) => {}
        Op::Set(s) => {
            let d = draft(s);
            let (b, was) = node.accountant().set_budget(&d).map_err(refused)?;
            replaced = was;
            warnings = unseen(node, &b);
            tracing::info!(event = "budget_set", budget = %b.name, scope = %b.scope, period = b.period.as_str(), amount = b.amount_micros, caller, "budget set");
            audit(
                node,
                v1::BudgetEvent {
                    kind: "set".into(),
                    budget: b.name.clone(),
                    scope: b.scope.to_string(),
                    period: b.period.as_str().into(),
                    amount_micros: b.amount_micros,
                    by: caller.into(),
                    detail: b
                        .thresholds
                        .iter()
                        .map(|t| format!("{}%:{}", t.percent, t.action.as_str()))
                        .collect::<Vec<_>>()
                        .join(" "),
                    ..Default::default()
                },
            );
        }
        Op::Remove(name) => {
            let d = node.accountant().remove_budget(name).map_err(refused)?;
            tracing::info!(event = "budget_removed", budget = %d.name, caller, "budget removed");
            let scope = crate::budget::Scope {
                identity: d.identity.clone(),
                tenant: d.tenant.clone(),
                service: d.service.clone(),
            };
            audit(
                node,
                v1::BudgetEvent {
                    kind: "removed".into(),
                    budget: d.name.clone(),
                    scope: scope.to_string(),
                    period: d.period.clone(),
                    amount_micros: u64::try_from(d.amount_micros).unwrap_or(0),
                    by: caller.into(),
                    ..Default::default()
                },
            );
        }
        Op::Approve(a) => {
            if a.reason.len() > 256 || a.reason.chars().any(char::is_control) {
                return Err(Status::invalid_argument(
                    "reason: at most 256 printable characters",
                ));
            }
            let approval = node
                .accountant()
                .approve(
                    std::time::SystemTime::now(),
                    &a.identity,
                    i128::from(a.amount_micros),
                    a.until_unix_secs,
                    caller,
                    &a.reason,
                )
                .map_err(refused)?;
            tracing::warn!(event = "budget_approval", identity = %a.identity, amount = approval.amount_micros, until = approval.until_secs, caller, "approval granted: the identity may go past its budgets");
            audit(
                node,
                v1::BudgetEvent {
                    kind: "approval".into(),
                    identity: a.identity.clone(),
                    amount_micros: approval.amount_micros,
                    until_unix_ms: approval.until_secs.saturating_mul(1_000),
                    by: caller.into(),
                    detail: a.reason.clone(),
                    ..Default::default()
                },
            );
        }
    }
    let mut r = reply(node, &node.book.budgets());
    r.replaced = replaced;
    r.warnings = warnings;
    Ok(r)
}

/// A named identity or tenant nobody here has spent as yet: accepted (it
/// may come with its first token), and said.
fn unseen(node: &Node, b: &Budget) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(i) = b.scope.identity.as_deref().filter(|i| *i != "*")
        && !node.accountant().knows(i)
    {
        w.push(format!(
            "identity {i:?} has not been admitted or spent on this node yet; the budget applies once it does"
        ));
    }
    if let Some(t) = b.scope.tenant.as_deref().filter(|t| *t != "*")
        && node.book.tenant(t) == Default::default()
    {
        w.push(format!(
            "tenant {t:?} has no spend on this node yet; the budget applies once it does"
        ));
    }
    w
}

pub fn spend(node: &Node, req: &v1::SpendRequest) -> Result<v1::SpendReply, Status> {
    let by = match req.by.as_str() {
        "" | "identity" => SpendBy::Identity,
        "tenant" => SpendBy::Tenant,
        "service" => SpendBy::Service,
        other => {
            return Err(Status::invalid_argument(format!(
                "by: {other:?} is not a grouping; use identity, tenant or service"
            )));
        }
    };
    let view = node.book.budgets();
    let rows = node
        .book
        .all(by)
        .into_iter()
        .map(|(name, s)| {
            let v = match by {
                SpendBy::Identity => {
                    let tenant = crate::identity::IdentityName::parse(&name)
                        .and_then(|n| n.tenant)
                        .unwrap_or_default();
                    view.verdict(&name, &tenant, None)
                }
                SpendBy::Tenant => view.verdict("", &name, None),
                SpendBy::Service => view.verdict("", "", Some(&name)),
            };
            v1::SpendRow {
                name,
                day_micros: s.day_micros,
                month_micros: s.month_micros,
                forecast_month_micros: s.forecast_month_micros,
                rate_micros_per_hour: s.rate_micros_per_hour,
                budget_action: v.action.map_or("", |a| a.as_str()).into(),
                budget: v.budget,
                budget_forecast_percent: v.forecast_percent,
                approved: v.approved,
            }
        })
        .collect();
    let (month, day, _) = {
        let a = node.accountant();
        let (m, d, c) = a.periods();
        (m.to_string(), d.to_string(), c)
    };
    Ok(v1::SpendReply {
        by: match by {
            SpendBy::Identity => "identity",
            SpendBy::Tenant => "tenant",
            SpendBy::Service => "service",
        }
        .into(),
        currency: node.cfg().accounting.currency.clone(),
        month,
        day,
        rows,
    })
}
