//! Cost accounting (docs/events.md): every second the kernel's
//! cumulative per-(identity, service) counters become deltas, the deltas
//! become cost by the service's price table, and the cost adds up to
//! month- and day-to-date spend per identity and tenant, kept in the ledger
//! file. The policy context's `spend_month` and `forecast_month` are read
//! from a [`SpendBook`] the accountant publishes to; cost reports for the
//! audit trail accumulate until one is recorded.
//!
//! How the runtime drives it (one [`Accountant`] per agent):
//!
//! ```text
//! start:          let book = SpendBook::new();
//!                 let mut acct = Accountant::open(&cfg, book.clone())?;   // ledger errors stop the agent
//!                 let admitter = Admitter::new(..).with_spend_book(book);
//! every second:   let rows = maps.usage()?; let inst = maps.usage_instance()?;
//!                 acct.tick(SystemTime::now(), &inst, &rows)?;          // persists the ledger
//! every report:   if let Some(r) = acct.take_report(SystemTime::now()) {
//!                     match record(r) { Ok(_) => acct.commit_report()?, Err(_) => acct.restore_report() }
//!                 }
//! ```
//!
//! Deltas: the kernel counters are cumulative since their map was created.
//! The ledger keeps the last value seen per (slot, service) with the
//! identity that held the slot, and the counter instance
//! ([`Maps::usage_instance`](crate::loader::Maps::usage_instance)) they
//! belong to. A delta is the growth since that value; it is the whole
//! current value when the instance changed (new maps start from zero),
//! when the slot now holds another identity (the agent zeroes a slot's
//! rows when it gives the slot away), or when a counter went down (reset).
//! A first start without a ledger charges whatever the counters hold.
//!
//! Periods are UTC calendar months and days. A tick's usage belongs to the
//! period its end falls in. The ledger's clock only moves forward: a wall
//! clock stepped back keeps charging the latest period.
//!
//! Forecast: spend this month plus the cost of the last
//! `cost_control.forecast_window_secs` (or since the agent started, if shorter) per
//! second, times the seconds left in the month; saturating. The window is
//! not persisted: right after a restart the forecast is the spend.

mod book;
pub mod budgets;
pub mod ledger;
pub mod period;
pub mod price;
pub mod totals;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use portcullis_proto::v1::{CostLine, CostReport};

use book::Snapshot;
pub use book::{Spend, SpendBook, SpendBy};
pub use ledger::Counters;
pub use ledger::LedgerError;
use ledger::{Baseline, IdentityToDate, Line, Pending, State, ToDate};
use price::Carry;

use portcullis_trail::time::unix_ns;

use crate::{
    budget::Budget,
    config::{Config, Price, identity_key},
    loader::maps::Usage,
};

struct ServicePrice {
    name: String,
    price: Price,
}

/// (identity, tenant, service, cost) of one tick.
type Charged = (String, String, String, u64);

/// What one tick charged, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickSummary {
    /// (identity, service) rows with new usage.
    pub lines: usize,
    pub cost_micros: u64,
}

/// Counters → cost → spend to date; see the module documentation.
pub struct Accountant {
    path: PathBuf,
    currency: String,
    services: HashMap<u32, ServicePrice>,
    state: State,
    /// A report handed out and not yet committed or restored.
    in_flight: Option<Pending>,
    book: Arc<SpendBook>,
    /// Identity key → (name, tenant).
    names: HashMap<u64, (String, String)>,
    /// Recent ticks' cost per (identity, tenant), oldest first, and their
    /// sums.
    recent: VecDeque<(i64, Vec<Charged>)>,
    window_identity: HashMap<String, u64>,
    window_tenant: HashMap<String, u64>,
    window_service: HashMap<String, u64>,
    /// Ledger time of this process's first tick.
    started: Option<i64>,
    /// Budgets in force: the config's, then those set at run time.
    budgets: Vec<Budget>,
    config_budgets: Vec<Budget>,
    /// `cost_control.forecast_window`, seconds.
    window_secs: i64,
    /// Budget events not yet taken by the budget loop.
    news: Vec<budgets::News>,
    /// The last tick's kernel bytes (in, out) per identity, for the
    /// extraction guard.
    traffic: HashMap<String, (u64, u64)>,
}

impl Accountant {
    /// Loads (or starts) the ledger at `cfg.accounting.ledger`. A ledger
    /// that exists but cannot be read is an error naming the file and the
    /// fix; nothing is reset silently.
    pub fn open(cfg: &Config, book: Arc<SpendBook>) -> Result<Accountant, LedgerError> {
        let path = cfg.accounting.ledger.clone();
        ledger::prepare_dir(&path)?;
        let state = match ledger::load(&path)? {
            Some(s) => s,
            None => {
                tracing::info!(ledger = %path.display(), "no accounting ledger yet; starting from zero");
                State::default()
            }
        };
        let mut a = Accountant {
            path,
            currency: cfg.accounting.currency.clone(),
            services: HashMap::new(),
            state,
            in_flight: None,
            book,
            names: HashMap::new(),
            recent: VecDeque::new(),
            window_identity: HashMap::new(),
            window_tenant: HashMap::new(),
            window_service: HashMap::new(),
            started: None,
            budgets: Vec::new(),
            config_budgets: Vec::new(),
            window_secs: 600,
            news: Vec::new(),
            traffic: HashMap::new(),
        };
        a.set_prices(cfg);
        for (name, to_date) in &a.state.identities {
            a.names
                .insert(identity_key(name), (name.clone(), to_date.tenant.clone()));
        }
        for name in cfg.identities.keys() {
            a.know(name, "");
        }
        for adm in &cfg.admissions {
            a.know(&adm.identity, "");
        }
        a.publish();
        // Budgets and their last actions hold from the start, before the
        // first tick: a restart does not open a window for knocks.
        a.evaluate_now();
        Ok(a)
    }

    /// The handle the admitter reads spend from.
    pub fn spend_book(&self) -> Arc<SpendBook> {
        self.book.clone()
    }

    /// Names an identity (its kernel name) and its tenant ("" for none),
    /// unless already known. Identities the accountant cannot name (e.g.
    /// admitted by `agent admit` while it runs) are reported as
    /// `#<identity key in hex>`.
    pub fn know(&mut self, identity: &str, tenant: &str) {
        self.names
            .entry(identity_key(identity))
            .or_insert_with(|| (identity.to_string(), tenant.to_string()));
    }

    /// Takes the service names and price tables from the config (at start
    /// and on reload).
    pub fn set_prices(&mut self, cfg: &Config) {
        self.services = cfg
            .services
            .iter()
            .map(|s| {
                (
                    s.id,
                    ServicePrice {
                        name: s.name.clone(),
                        price: s.price,
                    },
                )
            })
            .collect();
        self.currency = cfg.accounting.currency.clone();
        self.configure_budgets(cfg);
    }

    /// Spend of an identity as of the last tick.
    pub fn spend(&self, identity: &str) -> Spend {
        self.book.identity(identity)
    }

    /// One interval: `rows` are the cumulative counters
    /// ([`Maps::usage`](crate::loader::Maps::usage)) of the counter
    /// instance `instance`. Charges the growth since the last tick, rolls
    /// periods over, publishes spend and persists the ledger (when
    /// anything changed). On a ledger write error the in-memory state has
    /// advanced; the next successful write persists it.
    pub fn tick(
        &mut self,
        now: SystemTime,
        instance: &str,
        rows: &[Usage],
    ) -> Result<TickSummary, LedgerError> {
        // What this tick changes, so the clock alone is not worth a write
        // (periods only move forward against the saved month and day).
        let periods_before = (self.state.month.clone(), self.state.day.clone());
        let start_before = self.state.pending.start_unix_ns;
        let mut dirty = false;
        let first = self.started.is_none();
        let t = self.advance(now);
        dirty |= periods_before != (self.state.month.clone(), self.state.day.clone())
            || start_before != self.state.pending.start_unix_ns;
        if self.state.counters != instance {
            if !self.state.counters.is_empty() {
                tracing::info!(
                    was = %self.state.counters,
                    now = %instance,
                    "kernel usage counters are new (maps created afresh); counting from zero"
                );
            }
            self.state.baselines.clear();
            self.state.counters = instance.to_string();
            dirty = true;
        }
        self.absorb_learned();
        let p = period::periods(t);

        let old = std::mem::take(&mut self.state.baselines);
        let mut summary = TickSummary::default();
        let mut costs: Vec<Charged> = Vec::new();
        self.traffic.clear();
        for row in rows {
            let (identity, tenant) = self.name_of(row.identity_key);
            let now_counters = Counters::from(row.stats);
            let delta = match old.get(&(row.slot, row.service)) {
                Some(b)
                    if b.identity_key == row.identity_key
                        && !now_counters.went_down_from(&b.counters) =>
                {
                    now_counters.since(&b.counters)
                }
                // Another identity's slot now (its rows were zeroed when
                // it changed hands), counters reset, or first sight.
                _ => now_counters,
            };
            let baseline = Baseline {
                identity_key: row.identity_key,
                identity: identity.clone(),
                counters: now_counters,
            };
            dirty |= old.get(&(row.slot, row.service)) != Some(&baseline);
            self.state
                .baselines
                .insert((row.slot, row.service), baseline);
            if !delta.has_traffic() {
                continue;
            }
            dirty = true;
            if !first {
                let e = self.traffic.entry(identity.clone()).or_default();
                e.0 = e.0.saturating_add(delta.bytes_in);
                e.1 = e.1.saturating_add(delta.bytes_out);
            }
            let cost = self.charge(&identity, &tenant, row.service, &delta, (t, &p, !first));
            summary.lines += 1;
            summary.cost_micros = summary.cost_micros.saturating_add(cost);
            if cost != 0 {
                let service = self.service_name(row.service);
                costs.push((identity, tenant, service, cost));
            }
        }
        if first {
            // The first tick catches up on whatever happened while no
            // agent counted: not a rate.
            costs.clear();
        }
        // Rows no longer read (their slot or service went away).
        dirty |= old.len() != self.state.baselines.len();
        self.remember_rate(t, costs);
        self.publish();
        dirty |= self.evaluate_budgets(t, &p);
        if dirty {
            self.save()?;
        }
        Ok(summary)
    }

    /// Charges usage a model server reported for `identity` (its kernel
    /// name) at `service`, by the service's price table, and persists the
    /// ledger before returning, so an acknowledged report is never lost.
    /// The cost counts toward spend and the forecast's recent rate at
    /// once: the next policy decision sees it. `Ok(None)`: the service
    /// is not priced here (unknown id), nothing charged.
    pub fn report_usage(
        &mut self,
        now: SystemTime,
        identity: &str,
        tenant: &str,
        service: u32,
        usage: &Counters,
    ) -> Result<Option<(u64, Spend)>, LedgerError> {
        if !self.services.contains_key(&service) {
            return Ok(None);
        }
        let t = self.advance(now);
        let tenant = self
            .state
            .identities
            .get(identity)
            .map_or(tenant, |i| i.tenant.as_str())
            .to_string();
        self.know(identity, &tenant);
        let p = period::periods(t);
        let cost = self.charge(identity, &tenant, service, usage, (t, &p, true));
        let name = self.service_name(service);
        self.remember_rate(t, vec![(identity.to_string(), tenant, name, cost)]);
        self.publish();
        self.evaluate_budgets(t, &p);
        self.save()?;
        Ok(Some((cost, self.book.identity(identity))))
    }

    /// Whether the accountant has seen `identity` (its kernel name): spend
    /// this month, or named by a knock, an `Admit` or the config.
    pub fn knows(&mut self, identity: &str) -> bool {
        self.absorb_learned();
        self.state.identities.contains_key(identity)
            || self.names.contains_key(&identity_key(identity))
    }

    /// Moves the ledger's clock to `now` (never back), rolling periods
    /// over, and opens the pending report's interval if none is open;
    /// the ledger time charged usage belongs to.
    fn advance(&mut self, now: SystemTime) -> i64 {
        let wall = unix_secs(now);
        if wall < self.state.clock_secs {
            tracing::warn!(
                wall_clock = wall,
                ledger_clock = self.state.clock_secs,
                "wall clock is behind the ledger's; charging the latest period"
            );
        }
        let t = wall.max(self.state.clock_secs);
        self.state.clock_secs = t;
        self.started.get_or_insert(t);
        self.roll(t);
        if self.state.pending.start_unix_ns == 0 && self.state.pending.lines.is_empty() {
            self.state.pending.start_unix_ns = unix_ns(now);
        }
        t
    }

    /// Names the identities the book learned since the last call.
    fn absorb_learned(&mut self) {
        for (key, named) in self.book.take_learned() {
            self.names.entry(key).or_insert(named);
        }
    }

    fn name_of(&self, key: u64) -> (String, String) {
        match self.names.get(&key) {
            Some((n, t)) => (n.clone(), t.clone()),
            None => (format!("#{key:016x}"), String::new()),
        }
    }

    /// Prices one (identity, service) delta and adds it everywhere: spend
    /// to date, the budgets' meters (at ledger time `at.0`, in periods
    /// `at.1`; into their recent rate unless `at.2` is false), the report.
    fn charge(
        &mut self,
        identity: &str,
        tenant: &str,
        service: u32,
        delta: &Counters,
        at: (i64, &period::Periods, bool),
    ) -> u64 {
        let (service_name, price) = match self.services.get(&service) {
            Some(s) => (s.name.clone(), s.price),
            // Counted under a service no longer configured: no price.
            None => (format!("#{service}"), Price::default()),
        };
        let carry: &mut Carry = self
            .state
            .carries
            .entry((identity.to_string(), service))
            .or_default();
        let cost = price::cost(&price, delta, carry);
        if carry.is_zero() {
            self.state.carries.remove(&(identity.to_string(), service));
        }
        self.state.budgets.charge(
            &self.budgets,
            (identity, tenant, &service_name),
            cost,
            at,
            self.window_secs,
        );
        let id = self
            .state
            .identities
            .entry(identity.to_string())
            .or_insert_with(|| IdentityToDate {
                tenant: tenant.to_string(),
                ..IdentityToDate::default()
            });
        id.month_micros = id.month_micros.saturating_add(cost);
        id.day_micros = id.day_micros.saturating_add(cost);
        if !tenant.is_empty() {
            let t = self.state.tenants.entry(tenant.to_string()).or_default();
            t.month_micros = t.month_micros.saturating_add(cost);
            t.day_micros = t.day_micros.saturating_add(cost);
        }
        if cost != 0 {
            let s = self.state.services.entry(service_name.clone()).or_default();
            s.month_micros = s.month_micros.saturating_add(cost);
            s.day_micros = s.day_micros.saturating_add(cost);
        }
        let line = self
            .state
            .pending
            .lines
            .entry((identity.to_string(), service))
            .or_insert_with(|| Line {
                tenant: tenant.to_string(),
                service: service_name,
                ..Line::default()
            });
        line.counters.add(delta);
        line.cost_micros = line.cost_micros.saturating_add(cost);
        cost
    }

    /// Moves to the periods of ledger time `t`, closing the old ones. Only
    /// forward: the ledger's periods never go back.
    fn roll(&mut self, t: i64) {
        let p = period::periods(t);
        if self.state.month.is_empty() || p.month > self.state.month {
            if !self.state.month.is_empty() {
                tracing::info!(closed = %self.state.month, opened = %p.month, "new accounting month");
            }
            // Identities that spent nothing last month and hold no slot
            // are forgotten (with their carries).
            let holding: std::collections::BTreeSet<&str> = self
                .state
                .baselines
                .values()
                .map(|b| b.identity.as_str())
                .collect();
            self.state
                .identities
                .retain(|name, v| v.month_micros != 0 || holding.contains(name.as_str()));
            let kept = &self.state.identities;
            self.state
                .carries
                .retain(|(name, _), _| kept.contains_key(name));
            for v in self.state.identities.values_mut() {
                v.month_micros = 0;
                v.day_micros = 0;
            }
            self.state.tenants.clear();
            self.state.services.clear();
            self.state.month = p.month;
            self.state.day = p.day;
        } else if self.state.day.is_empty() || p.day > self.state.day {
            for v in self.state.identities.values_mut() {
                v.day_micros = 0;
            }
            for v in self
                .state
                .tenants
                .values_mut()
                .chain(self.state.services.values_mut())
            {
                v.day_micros = 0;
            }
            self.state.day = p.day;
        }
    }

    fn service_name(&self, id: u32) -> String {
        self.services
            .get(&id)
            .map_or_else(|| format!("#{id}"), |s| s.name.clone())
    }

    fn remember_rate(&mut self, t: i64, costs: Vec<Charged>) {
        for (identity, tenant, service, cost) in &costs {
            add_to(&mut self.window_identity, identity, *cost);
            if !tenant.is_empty() {
                add_to(&mut self.window_tenant, tenant, *cost);
            }
            add_to(&mut self.window_service, service, *cost);
        }
        if !costs.is_empty() {
            self.recent.push_back((t, costs));
        }
        while let Some((at, _)) = self.recent.front() {
            if *at > t - self.window_secs {
                break;
            }
            let (_, old) = self.recent.pop_front().expect("front exists");
            for (identity, tenant, service, cost) in old {
                sub_from(&mut self.window_identity, &identity, cost);
                sub_from(&mut self.window_tenant, &tenant, cost);
                sub_from(&mut self.window_service, &service, cost);
            }
        }
    }

    /// Recomputes spend and forecasts and hands them to the book.
    fn publish(&self) {
        let t = self.state.clock_secs;
        let left = u128::from(period::periods(t).month_left_secs);
        // Rated ticks cover (started, t].
        let span = self
            .started
            .map_or(1, |s| (t - s).clamp(1, self.window_secs)) as u128;
        let spend = |v: &ToDate, window: u64| Spend {
            month_micros: v.month_micros,
            day_micros: v.day_micros,
            forecast_month_micros: price::saturate(
                u128::from(v.month_micros) + u128::from(window) * left / span,
            ),
            rate_micros_per_hour: price::saturate(u128::from(window) * 3_600 / span),
        };
        let window = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        let mut snap = Snapshot::default();
        for (name, v) in &self.state.identities {
            let to_date = ToDate {
                month_micros: v.month_micros,
                day_micros: v.day_micros,
            };
            let s = spend(&to_date, window(&self.window_identity, name));
            snap.identities.insert(name.clone(), s);
        }
        for (name, v) in &self.state.tenants {
            let s = spend(v, window(&self.window_tenant, name));
            snap.tenants.insert(name.clone(), s);
        }
        for (name, v) in &self.state.services {
            let s = spend(v, window(&self.window_service, name));
            snap.services.insert(name.clone(), s);
        }
        self.book.publish(snap);
    }

    /// The cost report of everything charged since the last committed one
    /// (`None` when nothing was), with spend to date as of now. Until
    /// [`commit_report`](Self::commit_report) the accountant keeps the
    /// report's usage; [`restore_report`](Self::restore_report) puts it
    /// back so the next report includes it.
    pub fn take_report(&mut self, now: SystemTime) -> Option<CostReport> {
        self.restore_report();
        let now_ns = unix_ns(now);
        if self.state.pending.lines.is_empty() {
            self.state.pending.start_unix_ns = now_ns;
            return None;
        }
        let pending = std::mem::replace(
            &mut self.state.pending,
            Pending {
                start_unix_ns: now_ns,
                lines: BTreeMap::new(),
            },
        );
        let lines = pending
            .lines
            .iter()
            .map(|((identity, _), l)| {
                let id = self
                    .state
                    .identities
                    .get(identity)
                    .cloned()
                    .unwrap_or_default();
                let tenant = self
                    .state
                    .tenants
                    .get(&l.tenant)
                    .copied()
                    .unwrap_or(ToDate::default());
                CostLine {
                    identity: identity.clone(),
                    tenant: l.tenant.clone(),
                    service: l.service.clone(),
                    connections: l.counters.connections,
                    packets_in: l.counters.packets_in,
                    bytes_in: l.counters.bytes_in,
                    packets_out: l.counters.packets_out,
                    bytes_out: l.counters.bytes_out,
                    cost_micros: l.cost_micros,
                    identity_month_micros: id.month_micros,
                    identity_day_micros: id.day_micros,
                    tenant_month_micros: tenant.month_micros,
                    requests: l.counters.requests,
                    tokens_in: l.counters.tokens_in,
                    tokens_out: l.counters.tokens_out,
                    gpu_ms: l.counters.gpu_ms,
                }
            })
            .collect();
        let report = CostReport {
            interval_start_unix_ns: pending.start_unix_ns,
            interval_ns: u64::try_from(now_ns.saturating_sub(pending.start_unix_ns)).unwrap_or(0),
            currency: self.currency.clone(),
            lines,
            month: self.state.month.clone(),
            day: self.state.day.clone(),
        };
        self.in_flight = Some(pending);
        Some(report)
    }

    /// The taken report is recorded: forget its usage (persisted).
    pub fn commit_report(&mut self) -> Result<(), LedgerError> {
        if self.in_flight.take().is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// The taken report was refused: its usage goes into the next one.
    pub fn restore_report(&mut self) {
        if let Some(mut earlier) = self.in_flight.take() {
            let later = std::mem::take(&mut self.state.pending);
            earlier.absorb(later);
            self.state.pending = earlier;
        }
    }

    /// Writes the ledger; a report in flight is still pending on disk, so
    /// a crash before its commit reports it again rather than never.
    fn save(&self) -> Result<(), LedgerError> {
        match &self.in_flight {
            None => ledger::save(&self.path, &self.state),
            Some(taken) => {
                let mut s = self.state.clone();
                let mut merged = taken.clone();
                merged.absorb(std::mem::take(&mut s.pending));
                s.pending = merged;
                ledger::save(&self.path, &s)
            }
        }
    }

    /// Month, day and the ledger's clock, for status output and tests.
    pub fn periods(&self) -> (&str, &str, i64) {
        (&self.state.month, &self.state.day, self.state.clock_secs)
    }

    /// Kernel bytes (in, out) per identity of the last tick.
    pub fn traffic(&self) -> &HashMap<String, (u64, u64)> {
        &self.traffic
    }

    /// Spend to date of a tenant as of the last tick.
    pub fn tenant_spend(&self, tenant: &str) -> Spend {
        self.book.tenant(tenant)
    }
}

fn add_to(m: &mut HashMap<String, u64>, k: &str, v: u64) {
    let e = m.entry(k.to_string()).or_insert(0);
    *e = e.saturating_add(v);
}

fn sub_from(m: &mut HashMap<String, u64>, k: &str, v: u64) {
    if let Some(e) = m.get_mut(k) {
        *e = e.saturating_sub(v);
        if *e == 0 {
            m.remove(k);
        }
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
