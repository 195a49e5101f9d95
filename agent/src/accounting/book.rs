//! What the accountant publishes: spend to date per identity, tenant and
//! service with the month's forecast, and the budgets' last evaluation,
//! shared read-mostly with whoever decides (the admitter's policy
//! requests, the control API, the budget loop). The accountant
//! (`agent/src/accounting.rs`) is the only writer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use crate::{budget::BudgetView, config::identity_key};

/// What spend is listed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpendBy {
    Identity,
    Tenant,
    Service,
}

/// Spend of one identity, tenant or service, in micro-units of the currency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spend {
    pub month_micros: u64,
    pub day_micros: u64,
    /// Month spend so far plus the recent rate over the rest of the month.
    pub forecast_month_micros: u64,
    /// Cost of the forecast window, per hour.
    pub rate_micros_per_hour: u64,
}

#[derive(Default)]
pub(super) struct Snapshot {
    pub(super) identities: HashMap<String, Spend>,
    pub(super) tenants: HashMap<String, Spend>,
    pub(super) services: HashMap<String, Spend>,
}

/// Spend to date as of the last tick, shared read-mostly with whoever
/// decides (the admitter's policy requests). Also learns the names of the
/// identities it is asked about, so the accountant can name their kernel
/// slots (the kernel keeps only a hash of the name).
#[derive(Default)]
pub struct SpendBook {
    snapshot: RwLock<Snapshot>,
    /// The budgets and their last evaluation.
    budgets: RwLock<Arc<BudgetView>>,
    learned: Mutex<HashMap<u64, (String, String)>>,
}

impl SpendBook {
    pub fn new() -> Arc<SpendBook> {
        Arc::new(SpendBook::default())
    }

    pub fn identity(&self, name: &str) -> Spend {
        let s = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        s.identities.get(name).copied().unwrap_or_default()
    }

    pub fn tenant(&self, tenant: &str) -> Spend {
        let s = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        s.tenants.get(tenant).copied().unwrap_or_default()
    }

    /// Every identity's, tenant's or service's spend as of the last tick
    /// (`ctl spend`), by name.
    pub fn all(&self, by: SpendBy) -> Vec<(String, Spend)> {
        let s = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        let m = match by {
            SpendBy::Identity => &s.identities,
            SpendBy::Tenant => &s.tenants,
            SpendBy::Service => &s.services,
        };
        let mut v: Vec<(String, Spend)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// `(spend_month, forecast_month)` of an identity (its kernel name,
    /// `identity_name(tenant, subject)`), for the policy context; remembers
    /// the name and tenant for the accountant.
    pub fn spend(&self, identity: &str, tenant: Option<&str>) -> (u64, u64) {
        self.learn(identity, tenant.unwrap_or(""));
        let s = self.identity(identity);
        (s.month_micros, s.forecast_month_micros)
    }

    /// Tells the accountant an identity's name and tenant ("" for none).
    pub fn learn(&self, identity: &str, tenant: &str) {
        let key = identity_key(identity);
        let mut l = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(key)
            .or_insert_with(|| (identity.to_string(), tenant.to_string()));
    }

    /// The budgets as of the last evaluation (`agent/src/budget/verdict.rs`).
    pub fn budgets(&self) -> Arc<BudgetView> {
        self.budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn publish_budgets(&self, view: BudgetView) {
        *self.budgets.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }

    pub(super) fn take_learned(&self) -> HashMap<u64, (String, String)> {
        std::mem::take(&mut *self.learned.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn publish(&self, snap: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = snap;
    }
}
