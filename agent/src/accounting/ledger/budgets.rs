//! The ledger's budget section: every budget meter (spend in its period,
//! the rolling buckets, the action in force), the approvals, and the
//! budgets set through the control API. In the ledger rather than a file
//! of its own so that spend and what it triggered are written in one
//! atomic write (`agent/src/budget/meter.rs`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::budget::{Action, Approval, BudgetDraft, Meter, Meters, meter::Ring};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBudgets {
    #[serde(default)]
    meters: Vec<FileMeter>,
    #[serde(default)]
    approvals: Vec<FileApproval>,
    /// Budgets set with `ctl budget set`, in force until removed.
    #[serde(default)]
    defined: Vec<FileBudget>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeter {
    budget: String,
    key: String,
    period: String,
    spent: u64,
    #[serde(default)]
    buckets: Vec<(i64, u64)>,
    #[serde(default)]
    level: String,
    /// The recent window's cost: (seconds per slot, [(slot, cost)]).
    #[serde(default)]
    recent: (i64, Vec<(i64, u64)>),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileApproval {
    identity: String,
    amount_micros: u64,
    used_micros: u64,
    until_secs: i64,
    granted_secs: i64,
    by: String,
    reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBudget {
    name: String,
    identity: Option<String>,
    tenant: Option<String>,
    service: Option<String>,
    period: String,
    amount_micros: u64,
    thresholds: Vec<(i64, String)>,
    throttle_percent: i64,
}

impl FileBudgets {
    pub(super) fn of(m: &Meters, defined: &[BudgetDraft]) -> FileBudgets {
        FileBudgets {
            meters: m
                .meters
                .iter()
                .map(|((budget, key), v)| FileMeter {
                    budget: budget.clone(),
                    key: key.clone(),
                    period: v.period.clone(),
                    spent: v.spent,
                    buckets: v.buckets.iter().copied().collect(),
                    level: v.level.map_or("", Action::as_str).to_string(),
                    recent: v.recent.to_vec(),
                })
                .collect(),
            approvals: m
                .approvals
                .iter()
                .map(|(identity, a)| FileApproval {
                    identity: identity.clone(),
                    amount_micros: a.amount_micros,
                    used_micros: a.used_micros,
                    until_secs: a.until_secs,
                    granted_secs: a.granted_secs,
                    by: a.by.clone(),
                    reason: a.reason.clone(),
                })
                .collect(),
            defined: defined
                .iter()
                .map(|d| FileBudget {
                    name: d.name.clone(),
                    identity: d.identity.clone(),
                    tenant: d.tenant.clone(),
                    service: d.service.clone(),
                    period: d.period.clone(),
                    amount_micros: u64::try_from(d.amount_micros).unwrap_or(0),
                    thresholds: d.thresholds.clone(),
                    throttle_percent: d.throttle_percent.unwrap_or(0),
                })
                .collect(),
        }
    }

    /// The meters and the budgets defined at run time; an entry that
    /// cannot be what this agent wrote is an error naming it.
    pub(super) fn into_parts(self) -> Result<(Meters, Vec<BudgetDraft>), String> {
        let mut m = Meters::default();
        for f in self.meters {
            let level = match f.level.as_str() {
                "" => None,
                s => Some(Action::parse(s).ok_or_else(|| {
                    format!("budget meter {}/{} has action {s:?}", f.budget, f.key)
                })?),
            };
            let buckets: VecDeque<(i64, u64)> = f.buckets.into_iter().collect();
            m.meters.insert(
                (f.budget, f.key),
                Meter {
                    period: f.period,
                    spent: f.spent,
                    buckets,
                    level,
                    recent: Ring::from_vec(f.recent.0, &f.recent.1),
                },
            );
        }
        for a in self.approvals {
            m.approvals.insert(
                a.identity,
                Approval {
                    amount_micros: a.amount_micros,
                    used_micros: a.used_micros,
                    until_secs: a.until_secs,
                    granted_secs: a.granted_secs,
                    by: a.by,
                    reason: a.reason,
                },
            );
        }
        let defined = self
            .defined
            .into_iter()
            .map(|b| BudgetDraft {
                name: b.name,
                identity: b.identity,
                tenant: b.tenant,
                service: b.service,
                period: b.period,
                amount_micros: i128::from(b.amount_micros),
                thresholds: b.thresholds,
                throttle_percent: Some(b.throttle_percent),
            })
            .collect();
        Ok((m, defined))
    }
}
