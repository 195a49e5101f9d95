//! A running agent, for its outside interfaces (`agent/src/control/`,
//! `agent/src/metrics/`).

use std::sync::{Arc, Mutex, MutexGuard};

use crate::{
    accounting::{Accountant, SpendBook, totals::CostTotals},
    audit::auditor::Auditor,
    config::Config,
    daemon::{budgets::BudgetState, detect::FindingsView, upkeep::Knocks},
    enforce::Enforcer,
    loader::Origin,
};

/// The running agent's parts, as the control API and the metrics endpoint
/// see them: they read and act through these, never around them.
pub struct Node {
    pub enforcer: Arc<Enforcer>,
    pub auditor: Auditor,
    /// Knock admission (absent without `[tokens]`): `Admit` and token
    /// revocations need it.
    pub knocks: Option<Arc<Knocks>>,
    /// Spend to date, for `Stats`.
    pub book: Arc<SpendBook>,
    /// Cost reported since start, per tenant and service (metrics).
    pub costs: Arc<CostTotals>,
    /// The one accountant: the main loop charges kernel counters every
    /// second, `ReportUsage` what model servers report.
    pub accountant: Mutex<Accountant>,
    /// Held while the protected services change (`daemon/services.rs`).
    pub service_edits: Mutex<()>,
    /// The detections' state, for the metrics.
    pub findings: Mutex<FindingsView>,
    /// Cost control's state, for the metrics.
    pub budget_state: Mutex<BudgetState>,
    pub origin: Origin,
    pub pin_durability: String,
}

impl Node {
    /// The configuration in force (services as changed at run time).
    pub fn cfg(&self) -> Arc<Config> {
        self.enforcer.config()
    }

    /// The accountant, held briefly (a charge and a ledger write).
    pub fn accountant(&self) -> MutexGuard<'_, Accountant> {
        self.accountant.lock().unwrap_or_else(|p| p.into_inner())
    }
}
