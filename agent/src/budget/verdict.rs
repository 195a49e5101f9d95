//! What the budgets say about one (identity, tenant, service), as of the
//! last evaluation: every budget that covers it is checked, the strictest
//! action wins, and the verdict names the budget that decided. An active
//! approval lets the identity through `throttle` and `deny` (a warning
//! still shows). Decisions only: the knock path refuses, the budget loop
//! (`agent/src/daemon/budgets.rs`) throttles and revokes.

use std::collections::{BTreeMap, HashMap};

use super::{
    meter::{Approval, Reading},
    spec::{Action, Budget},
};

/// The budgets, their meters' last readings and the approvals.
#[derive(Clone, Debug, Default)]
pub struct BudgetView {
    pub budgets: Vec<Budget>,
    pub readings: HashMap<(String, String), Reading>,
    pub approvals: BTreeMap<String, Approval>,
    /// Ledger time of the evaluation.
    pub at_secs: i64,
}

/// The budgets' verdict on one request or live admission.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The strictest action in force (`None`: under every threshold, or
    /// no budget covers it).
    pub action: Option<Action>,
    /// The budget that decided (with an action), else the one closest to
    /// its amount; "" when no budget covers it.
    pub budget: String,
    pub key: String,
    pub spent_micros: u64,
    pub forecast_micros: u64,
    pub rate_micros_per_hour: u64,
    pub amount_micros: u64,
    /// The deciding budget's forecast in percent of its amount.
    pub forecast_percent: u64,
    /// Throttle level of the deciding budget.
    pub throttle_percent: u32,
    /// An approval let the identity through what `action` would do.
    pub approved: bool,
}

impl Verdict {
    /// The action to enforce: none while an approval holds.
    pub fn enforced(&self) -> Option<Action> {
        match self.action {
            Some(a @ (Action::Throttle | Action::Deny)) if !self.approved => Some(a),
            _ => None,
        }
    }
}

impl BudgetView {
    /// The verdict for `identity` (its kernel name) in `tenant` ("" for
    /// none) at `service`; `None` for the service: budgets of any service
    /// are left out (the identity as a whole).
    pub fn verdict(&self, identity: &str, tenant: &str, service: Option<&str>) -> Verdict {
        let mut best: Option<(Verdict, (Option<Action>, u64))> = None;
        for b in &self.budgets {
            if service.is_none() && b.scope.service.is_some() {
                continue;
            }
            let Some(key) = b.scope.covers(identity, tenant, service) else {
                continue;
            };
            let r = self.readings.get(&(b.name.clone(), key.clone()));
            let (spent, forecast, rate, level) = r.map_or((0, 0, 0, None), |r| {
                (
                    r.spent_micros,
                    r.forecast_micros,
                    r.rate_micros_per_hour,
                    r.level,
                )
            });
            let percent = (u128::from(forecast) * 100 / u128::from(b.amount_micros.max(1)))
                .min(u128::from(u64::MAX)) as u64;
            let rank = (level.map(|l| l.action), percent);
            if best.as_ref().is_some_and(|(_, r)| *r >= rank) {
                continue;
            }
            best = Some((
                Verdict {
                    action: level.map(|l| l.action),
                    budget: b.name.clone(),
                    key,
                    spent_micros: spent,
                    forecast_micros: forecast,
                    rate_micros_per_hour: rate,
                    amount_micros: b.amount_micros,
                    forecast_percent: percent,
                    throttle_percent: b.throttle_percent,
                    approved: false,
                },
                rank,
            ));
        }
        let mut v = best.map(|(v, _)| v).unwrap_or_default();
        v.approved = self
            .approvals
            .get(identity)
            .is_some_and(|a| a.active(self.at_secs));
        v
    }
}
