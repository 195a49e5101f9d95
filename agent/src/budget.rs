//! Cost control: budgets over spend (per identity, tenant, service, and
//! identity or tenant × service; per UTC day or month, or rolling 7 or
//! 30 days), gated on the forecast rather than only the spend so far, with
//! ordered thresholds whose actions are `warn`, `throttle` and `deny`;
//! approvals that let one identity through for an amount or a time; and
//! the extraction guard on response volume (docs/cost-control.md).
//!
//! Decisions only: [`spec`] checks budgets, [`meter`] keeps spend and
//! forecasts (inside the accountant's ledger), [`verdict`] says what
//! applies to a request, [`guard`] says when output looks like
//! extraction. The budget loop (`agent/src/daemon/budgets.rs`) applies
//! them to the kernel and records the events.

pub mod guard;
pub mod meter;
pub mod spec;
pub mod verdict;

#[cfg(test)]
mod tests;

pub use meter::{Approval, Ended, Meter, Meters, Reading, Transition};
pub use spec::{Action, Budget, BudgetDraft, BudgetError, Period, Scope, Threshold};
pub use verdict::{BudgetView, Verdict};
