//! The accountant's side of cost control: which budgets are in force (the
//! config's, then those set through the control API and kept in the
//! ledger), their evaluation after every charge, and the run-time edits
//! (`ctl budget set|remove|approve`). What a budget is and how its forecast
//! is made: `agent/src/budget/`.

use crate::{
    budget::{
        Approval, Budget, BudgetDraft, BudgetError, BudgetView, Ended, Transition,
        spec::{self, MAX_AMOUNT_MICROS},
    },
    config::Config,
};

use super::{Accountant, LedgerError, period};

/// Longest an approval may run: an exception, not a second budget.
pub const MAX_APPROVAL_SECS: i64 = 31 * 86_400;

/// What the budget loop has to record and enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum News {
    /// A meter's action changed; the budget's scope as text.
    Threshold(Transition, String),
    ApprovalEnded(Ended),
}

/// Why a run-time budget edit was refused, or could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Invalid(#[from] BudgetError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

fn refuse(field: &str, message: impl Into<String>) -> EditError {
    EditError::Invalid(BudgetError {
        field: field.to_string(),
        message: message.into(),
    })
}

/// Where a budget in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Config,
    Control,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Control => "control",
        }
    }
}

impl Accountant {
    /// Takes the config's budgets and forecast window (start and reload).
    pub(super) fn configure_budgets(&mut self, cfg: &Config) {
        self.config_budgets = cfg.budgets.clone();
        self.window_secs = cfg.cost_control.forecast_window.as_secs().max(1) as i64;
        self.recompute_budgets();
    }

    fn service_names(&self) -> Vec<String> {
        self.services.values().map(|s| s.name.clone()).collect()
    }

    /// The config's budgets, then the control API's that still hold (a
    /// budget for a service since removed, or one the config now names,
    /// is left out with a warning and kept in the ledger).
    fn recompute_budgets(&mut self) {
        let names = self.service_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut all = self.config_budgets.clone();
        for d in &self.state.defined {
            let mut with = all.clone();
            match d.validate(&names).and_then(|b| {
                with.push(b);
                spec::check_set(&with)
            }) {
                Ok(()) => all = with,
                Err(e) => tracing::warn!(
                    event = "budget_not_in_force",
                    budget = %d.name,
                    error = %e,
                    "a budget set through the control API does not apply now"
                ),
            }
        }
        self.state.budgets.retain_budgets(&all);
        self.budgets = all;
    }

    /// Evaluates every budget at ledger time `t` and publishes the view;
    /// whether the meters or approvals changed (the ledger needs a write).
    pub(super) fn evaluate_budgets(&mut self, t: i64, p: &period::Periods) -> bool {
        let (readings, changed, ended, moved) =
            self.state
                .budgets
                .evaluate(&self.budgets, t, p, self.window_secs);
        for tr in changed {
            let scope = self
                .budgets
                .iter()
                .find(|b| b.name == tr.reading.budget)
                .map(|b| b.scope.to_string())
                .unwrap_or_default();
            self.news.push(News::Threshold(tr, scope));
        }
        self.news.extend(ended.into_iter().map(News::ApprovalEnded));
        self.book.publish_budgets(BudgetView {
            budgets: self.budgets.clone(),
            readings: readings
                .into_iter()
                .map(|r| ((r.budget.clone(), r.key.clone()), r))
                .collect(),
            approvals: self.state.budgets.approvals.clone(),
            at_secs: t,
        });
        moved
    }

    pub(super) fn evaluate_now(&mut self) {
        let t = self.state.clock_secs;
        let p = period::periods(t);
        self.evaluate_budgets(t, &p);
    }

    /// Budget events since the last call.
    pub fn take_news(&mut self) -> Vec<News> {
        std::mem::take(&mut self.news)
    }

    /// The budgets in force and where each comes from.
    pub fn budget_list(&self) -> Vec<(Budget, Origin)> {
        self.budgets
            .iter()
            .map(|b| {
                let origin = if self.config_budgets.iter().any(|c| c.name == b.name) {
                    Origin::Config
                } else {
                    Origin::Control
                };
                (b.clone(), origin)
            })
            .collect()
    }

    /// Sets (adds or replaces) a run-time budget; persisted before it
    /// returns. `Ok((budget, replaced))`. Spend counted under the same
    /// name is kept unless the scope or period changed.
    pub fn set_budget(&mut self, draft: &BudgetDraft) -> Result<(Budget, bool), EditError> {
        if self.config_budgets.iter().any(|b| b.name == draft.name) {
            return Err(refuse(
                "name",
                format!(
                    "budget {:?} is defined in the config file; change it there (or choose another name)",
                    draft.name
                ),
            ));
        }
        let names = self.service_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let b = draft.validate(&names)?;
        let mut with: Vec<Budget> = self
            .budgets
            .iter()
            .filter(|o| o.name != b.name)
            .cloned()
            .collect();
        with.push(b.clone());
        spec::check_set(&with)?;
        let old = self.state.defined.iter().position(|d| d.name == b.name);
        let replaced = old.is_some();
        if let Some(i) = old {
            let before = self.state.defined.remove(i);
            if before.validate(&names).map(|o| (o.scope, o.period)).ok()
                != Some((b.scope.clone(), b.period))
            {
                self.state.budgets.meters.retain(|(n, _), _| *n != b.name);
            }
        }
        self.state.defined.push(b.draft());
        self.recompute_budgets();
        self.evaluate_now();
        self.save()?;
        Ok((b, replaced))
    }

    /// Removes a run-time budget (its meters with it); returns it as it
    /// was set (it may not have been in force: see `recompute_budgets`).
    pub fn remove_budget(&mut self, name: &str) -> Result<BudgetDraft, EditError> {
        if self.config_budgets.iter().any(|b| b.name == name) {
            return Err(refuse(
                "name",
                format!("budget {name:?} is defined in the config file; remove it there"),
            ));
        }
        let Some(i) = self.state.defined.iter().position(|d| d.name == name) else {
            return Err(refuse(
                "name",
                format!("no budget {name:?}; `portcullis ctl budget list` shows them"),
            ));
        };
        let d = self.state.defined.remove(i);
        self.recompute_budgets();
        self.evaluate_now();
        self.save()?;
        Ok(d)
    }

    /// Lets `identity` (its kernel name) through its budgets until
    /// `until_secs` or until it has spent `amount_micros` more, whichever
    /// comes first; replaces an earlier approval. Persisted before it
    /// returns.
    pub fn approve(
        &mut self,
        now: std::time::SystemTime,
        identity: &str,
        amount_micros: i128,
        until_secs: i64,
        by: &str,
        reason: &str,
    ) -> Result<Approval, EditError> {
        if amount_micros <= 0 || amount_micros > i128::from(MAX_AMOUNT_MICROS) {
            return Err(refuse(
                "amount",
                format!(
                    "{amount_micros} is not an amount; give 1 to {MAX_AMOUNT_MICROS} micro-units"
                ),
            ));
        }
        // The ledger's clock: approvals end by the time budgets are kept in.
        let now = self.advance(now);
        if until_secs <= now {
            return Err(refuse(
                "until",
                "is not in the future; give a later time (RFC 3339, or +30m, +8h, +2d)",
            ));
        }
        if until_secs - now > MAX_APPROVAL_SECS {
            return Err(refuse(
                "until",
                "is more than 31 days ahead; raise the budget instead",
            ));
        }
        if identity.is_empty() || !self.knows(identity) {
            return Err(refuse(
                "identity",
                format!(
                    "{identity:?} has neither spent nor been admitted on this node; use the name `portcullis ctl spend` shows"
                ),
            ));
        }
        let a = Approval {
            amount_micros: amount_micros as u64,
            used_micros: 0,
            until_secs,
            granted_secs: now,
            by: by.to_string(),
            reason: reason.to_string(),
        };
        self.state
            .budgets
            .approvals
            .insert(identity.to_string(), a.clone());
        self.evaluate_now();
        self.save()?;
        Ok(a)
    }
}
