//! Spend per budget and scope, its recent rate and its forecast; and the
//! approvals that let one identity through. Kept by the accountant in the
//! ledger (`agent/src/accounting/ledger.rs`), so spend, period roll-overs,
//! approvals and the last action of every meter are written in the same
//! atomic write as the month's spend: a restart neither resets a period
//! twice nor fires a warning again.
//!
//! Time is the ledger's clock, which never goes back: a wall clock stepped
//! back keeps charging the latest period; one stepped forward across a
//! boundary rolls it over once.
//!
//! Forecast (issue: spend is gated before it happens): the spend so far
//! plus the recent rate (cost over the last `forecast_window` seconds,
//! divided by the window) times the time left: until the end of the UTC
//! day or month, and for a rolling window the window's whole length (an
//! upper bound: what it would hold if the rate went on and nothing left
//! it). The rate is not persisted; for one window after a restart it
//! counts only what was charged since.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::spec::{Action, Budget, Period, Threshold};
use crate::accounting::period::Periods;

/// Slots the recent-rate window is kept in.
const RATE_SLOTS: usize = 20;

/// Cost per slot of the forecast window, tagged by slot number so stale
/// slots are skipped without clearing them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// Seconds per slot the slot numbers count in.
    width: i64,
    slots: [(i64, u64); RATE_SLOTS],
}

impl Ring {
    /// The non-empty slots, for the ledger.
    pub fn to_vec(&self) -> (i64, Vec<(i64, u64)>) {
        (
            self.width,
            self.slots.iter().copied().filter(|s| s.1 != 0).collect(),
        )
    }

    /// A ring the ledger kept. Its slot numbers count in `width`
    /// seconds; a ring of another width than the window's is ignored
    /// when read.
    pub fn from_vec(width: i64, slots: &[(i64, u64)]) -> Ring {
        let mut r = Ring {
            width,
            ..Ring::default()
        };
        for &(at, v) in slots {
            r.add(at, v);
        }
        r
    }

    fn add(&mut self, slot: i64, cost: u64) {
        let s = &mut self.slots[slot.rem_euclid(RATE_SLOTS as i64) as usize];
        if s.0 != slot {
            *s = (slot, 0);
        }
        s.1 = s.1.saturating_add(cost);
    }

    /// Cost of the `n` slots ending with `slot`.
    fn sum(&self, slot: i64, n: i64) -> u64 {
        self.slots
            .iter()
            .filter(|(at, _)| *at > slot - n && *at <= slot)
            .fold(0u64, |a, (_, v)| a.saturating_add(*v))
    }
}

/// One budget's spend for one scope key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meter {
    /// Calendar periods: the day or month (`"2026-12-05"`, `"2026-12"`)
    /// `spent` belongs to. Empty for rolling windows.
    pub period: String,
    pub spent: u64,
    /// Rolling windows: (bucket start, spend), oldest first.
    pub buckets: VecDeque<(i64, u64)>,
    /// The action in force after the last evaluation.
    pub level: Option<Action>,
    /// Cost of the recent forecast window, kept so that a restart does
    /// not forget the rate a forecast gates on.
    pub recent: Ring,
}

/// An approval: `identity` may go past its budgets until `until_secs` or
/// until it has spent `amount_micros` since, whichever comes first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    pub amount_micros: u64,
    pub used_micros: u64,
    pub until_secs: i64,
    pub granted_secs: i64,
    /// Who asked for it (the control API's caller) and why.
    pub by: String,
    pub reason: String,
}

impl Approval {
    pub fn active(&self, t: i64) -> bool {
        t < self.until_secs && self.used_micros < self.amount_micros
    }
}

/// A meter as the last evaluation saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    pub budget: String,
    /// The scope key ("" for a budget with one meter; the identity,
    /// tenant or `identity|service` for `*` scopes).
    pub key: String,
    pub period: Period,
    pub amount_micros: u64,
    pub spent_micros: u64,
    /// Recent rate, micro-units per hour.
    pub rate_micros_per_hour: u64,
    pub forecast_micros: u64,
    /// Seconds the forecast projects the rate over.
    pub horizon_secs: u64,
    /// The strictest threshold the forecast reached.
    pub level: Option<Threshold>,
}

impl Reading {
    /// Forecast in percent of the amount.
    pub fn forecast_percent(&self) -> u64 {
        (u128::from(self.forecast_micros) * 100 / u128::from(self.amount_micros.max(1)))
            .min(u128::from(u64::MAX)) as u64
    }
}

/// A meter's action changed (up or down).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Option<Action>,
    pub reading: Reading,
}

/// An approval that ended (its amount used, or its time up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub identity: String,
    pub approval: Approval,
    pub why: &'static str,
}

/// Every budget's meters and the approvals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meters {
    /// (budget, key) → meter.
    pub meters: BTreeMap<(String, String), Meter>,
    /// Identity → its approval.
    pub approvals: BTreeMap<String, Approval>,
}

/// The width of one slot of the forecast window, seconds: the window
/// in at most [`RATE_SLOTS`] whole seconds.
fn slot_width(window_secs: i64) -> i64 {
    (window_secs / RATE_SLOTS as i64).max(1)
}

/// How many slots the window spans (fewer than [`RATE_SLOTS`] for a
/// window shorter than that many seconds).
fn slot_count(window_secs: i64) -> i64 {
    (window_secs / slot_width(window_secs)).clamp(1, RATE_SLOTS as i64)
}

impl Meter {
    /// Moves to the period of `t`: a new day or month starts from zero, a
    /// rolling window forgets buckets that left it. Only forward. Whether
    /// anything changed.
    fn roll(&mut self, period: Period, t: i64, p: &Periods) -> bool {
        let mut moved = false;
        match period.rolling() {
            None => {
                let now = if period == Period::Day {
                    &p.day
                } else {
                    &p.month
                };
                if self.period.as_str() < now.as_str() {
                    self.period = now.clone();
                    self.spent = 0;
                    moved = true;
                }
            }
            Some((len, _)) => {
                while let Some(&(start, v)) = self.buckets.front() {
                    if start > t - len {
                        break;
                    }
                    self.buckets.pop_front();
                    self.spent = self.spent.saturating_sub(v);
                    moved = true;
                }
            }
        }
        moved
    }

    fn add(&mut self, period: Period, t: i64, cost: u64) {
        self.spent = self.spent.saturating_add(cost);
        if let Some((_, width)) = period.rolling() {
            let start = t - t.rem_euclid(width);
            match self.buckets.back_mut() {
                Some((s, v)) if *s == start => *v = v.saturating_add(cost),
                _ => self.buckets.push_back((start, cost)),
            }
        }
    }
}

impl Meters {
    /// Charges `cost` of (identity, tenant, service) at ledger time `at.0`
    /// (in periods `at.1`) to every budget that covers it, and to the
    /// identity's approval; into the recent rate unless `at.2` is false
    /// (catching up on usage from before this agent started).
    pub fn charge(
        &mut self,
        budgets: &[Budget],
        (identity, tenant, service): (&str, &str, &str),
        cost: u64,
        (t, p, rated): (i64, &Periods, bool),
        window_secs: i64,
    ) {
        if cost == 0 {
            return;
        }
        for b in budgets {
            let Some(key) = b.scope.covers(identity, tenant, Some(service)) else {
                continue;
            };
            let m = self.meters.entry((b.name.clone(), key)).or_default();
            m.roll(b.period, t, p);
            m.add(b.period, t, cost);
            if rated {
                m.recent.width = slot_width(window_secs);
                m.recent.add(t / slot_width(window_secs), cost);
            }
        }
        if let Some(a) = self.approvals.get_mut(identity) {
            a.used_micros = a.used_micros.saturating_add(cost);
        }
    }

    /// Forgets meters of budgets no longer defined.
    pub fn retain_budgets(&mut self, budgets: &[Budget]) {
        let names: std::collections::HashSet<&str> =
            budgets.iter().map(|b| b.name.as_str()).collect();
        self.meters.retain(|(b, _), _| names.contains(b.as_str()));
    }

    /// Rolls every meter to `t`, reads its forecast, and records each
    /// meter's action: the readings, the meters whose action changed, the
    /// approvals that ended, and whether anything kept in the ledger
    /// changed.
    pub fn evaluate(
        &mut self,
        budgets: &[Budget],
        t: i64,
        p: &Periods,
        window_secs: i64,
    ) -> (Vec<Reading>, Vec<Transition>, Vec<Ended>, bool) {
        let mut moved = false;
        let by_name: HashMap<&str, &Budget> =
            budgets.iter().map(|b| (b.name.as_str(), b)).collect();
        let slot = t / slot_width(window_secs);
        let n = slot_count(window_secs);
        let span = (slot_width(window_secs) * n) as u128;
        let day_left = (86_400 - t.rem_euclid(86_400)) as u64;
        let mut readings = Vec::with_capacity(self.meters.len());
        let mut changed = Vec::new();
        let mut idle = Vec::new();
        for (id, m) in self.meters.iter_mut() {
            let Some(b) = by_name.get(id.0.as_str()) else {
                continue;
            };
            moved |= m.roll(b.period, t, p);
            let recent = if m.recent.width == slot_width(window_secs) {
                m.recent.sum(slot, n)
            } else {
                0
            };
            let horizon = match b.period {
                Period::Day => day_left,
                Period::Month => p.month_left_secs,
                other => other.rolling().map_or(0, |(len, _)| len as u64),
            };
            let forecast = u128::from(m.spent) + u128::from(recent) * u128::from(horizon) / span;
            let forecast = u64::try_from(forecast).unwrap_or(u64::MAX);
            let level = b.level(forecast);
            let r = Reading {
                budget: id.0.clone(),
                key: id.1.clone(),
                period: b.period,
                amount_micros: b.amount_micros,
                spent_micros: m.spent,
                rate_micros_per_hour: u64::try_from(u128::from(recent) * 3_600 / span)
                    .unwrap_or(u64::MAX),
                forecast_micros: forecast,
                horizon_secs: horizon,
                level,
            };
            let now = level.map(|l| l.action);
            if now != m.level {
                changed.push(Transition {
                    from: m.level,
                    reading: r.clone(),
                });
                m.level = now;
            }
            if m.spent == 0 && recent == 0 && m.level.is_none() {
                idle.push(id.clone());
            }
            readings.push(r);
        }
        // A meter back at zero with nothing in force holds nothing worth
        // keeping: per-identity budgets over many identities stay small.
        moved |= !idle.is_empty() || !changed.is_empty();
        for id in idle {
            self.meters.remove(&id);
        }
        let mut ended = Vec::new();
        self.approvals.retain(|identity, a| {
            if a.active(t) {
                return true;
            }
            ended.push(Ended {
                identity: identity.clone(),
                approval: a.clone(),
                why: if a.used_micros >= a.amount_micros {
                    "amount used"
                } else {
                    "time up"
                },
            });
            false
        });
        moved |= !ended.is_empty();
        (readings, changed, ended, moved)
    }
}
