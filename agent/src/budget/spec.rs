//! What a budget is, and the checks every budget passes whether it comes
//! from the config file (`[[budgets]]`) or the control API (`ctl budget
//! set`): one validation, so both refuse the same input with the same
//! message naming the field and the fix.

use std::fmt;

/// Most a budget's amount may be: far above any real bill, and small
/// enough that `amount × percent` never overflows.
pub const MAX_AMOUNT_MICROS: u64 = 1 << 53;

/// Highest threshold percentage: a forecast may be gated up to 10x the
/// amount (a warning "forecast at 300% of budget").
pub const MAX_PERCENT: u32 = 1_000;

/// What crossing a threshold does. Ordered: a later variant is stricter,
/// and when several budgets apply the strictest wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// An event and a metric, nothing else.
    Warn,
    /// The identity's kernel rates are lowered to the budget's
    /// `throttle_percent` of its limits.
    Throttle,
    /// New admissions refused, live ones revoked.
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Warn => "warn",
            Action::Throttle => "throttle",
            Action::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "warn" => Some(Action::Warn),
            "throttle" => Some(Action::Throttle),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }
}

/// The budget's period. Calendar periods are UTC (as the ledger's);
/// rolling windows end now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day,
    Month,
    Rolling7d,
    Rolling30d,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
            Period::Rolling7d => "7d",
            Period::Rolling30d => "30d",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "day" | "1d" => Some(Period::Day),
            "month" | "1mo" => Some(Period::Month),
            "7d" => Some(Period::Rolling7d),
            "30d" => Some(Period::Rolling30d),
            _ => None,
        }
    }

    /// Length of a rolling window, and the width of the buckets its spend
    /// is kept in (the oldest spend leaves the window a bucket at a time).
    pub fn rolling(self) -> Option<(i64, i64)> {
        match self {
            Period::Rolling7d => Some((7 * 86_400, 3_600)),
            Period::Rolling30d => Some((30 * 86_400, 6 * 3_600)),
            _ => None,
        }
    }
}

/// Whose spend a budget counts. A name, or `*` for "each one separately"
/// (a budget per identity, per tenant). Identity and tenant exclude each
/// other; either may be combined with a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Scope {
    pub identity: Option<String>,
    pub tenant: Option<String>,
    pub service: Option<String>,
}

impl Scope {
    /// Each of the scope's names matched against one (identity, tenant,
    /// service): `None` when the budget does not cover it, else the key of
    /// the budget's meter that does ("" for a budget with one meter; the
    /// `*` parts' values joined by `|` otherwise).
    pub fn covers(&self, identity: &str, tenant: &str, service: Option<&str>) -> Option<String> {
        let part = |want: &Option<String>, have: &str| -> Option<Option<String>> {
            match want.as_deref() {
                None => Some(None),
                Some(_) if have.is_empty() => None,
                Some("*") => Some(Some(have.to_string())),
                Some(w) if w == have => Some(None),
                Some(_) => None,
            }
        };
        let i = part(&self.identity, identity)?;
        let t = part(&self.tenant, tenant)?;
        let s = match (&self.service, service) {
            (None, _) => None,
            (Some(_), None) => return None,
            (Some(w), Some(have)) => part(&Some(w.clone()), have)?,
        };
        Some(
            [i, t, s]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("|"),
        )
    }

    /// Whether this scope names an identity (or each identity).
    pub fn per_identity(&self) -> bool {
        self.identity.is_some()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(i) = &self.identity {
            parts.push(format!("identity={i}"));
        }
        if let Some(t) = &self.tenant {
            parts.push(format!("tenant={t}"));
        }
        if let Some(s) = &self.service {
            parts.push(format!("service={s}"));
        }
        f.write_str(&parts.join(","))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Threshold {
    /// Of the amount; the action fires when the forecast reaches it.
    pub percent: u32,
    pub action: Action,
}

impl Threshold {
    /// The amount in micro-units this threshold is at.
    pub fn micros(&self, amount: u64) -> u64 {
        // Both bounded (MAX_AMOUNT_MICROS, MAX_PERCENT): no overflow.
        amount * u64::from(self.percent) / 100
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Budget {
    pub name: String,
    pub scope: Scope,
    pub period: Period,
    pub amount_micros: u64,
    /// Ordered by percent; actions never get milder as the percent rises.
    pub thresholds: Vec<Threshold>,
    /// A throttled identity's kernel rates, in percent of its limits.
    pub throttle_percent: u32,
}

/// A budget as written (config table or control request), before checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetDraft {
    pub name: String,
    pub identity: Option<String>,
    pub tenant: Option<String>,
    pub service: Option<String>,
    pub period: String,
    pub amount_micros: i128,
    /// `(percent, action)` as written.
    pub thresholds: Vec<(i64, String)>,
    pub throttle_percent: Option<i64>,
}

/// A refused budget: the field and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BudgetError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> BudgetError {
    BudgetError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// Names of budgets, identities, tenants and services in a scope: what
/// identities and services are named with (`agent/src/identity.rs`,
/// service names), printable and short.
fn check_name(field: &str, v: &str, wildcard: bool) -> Result<(), BudgetError> {
    if v.is_empty() || v.len() > 128 {
        return Err(err(field, "must be 1 to 128 characters"));
    }
    if v == "*" {
        return if wildcard {
            Ok(())
        } else {
            Err(err(field, "`*` is not allowed here; name one"))
        };
    }
    if v.chars()
        .any(|c| c.is_control() || c == '|' || c.is_whitespace())
    {
        return Err(err(
            field,
            format!(
                "{v:?} holds a space, `|` or a control character; use the name as `ctl spend` shows it"
            ),
        ));
    }
    Ok(())
}

/// Default `throttle_percent`: a throttled identity keeps a tenth of its
/// rates, enough to finish a request and read an error.
pub const DEFAULT_THROTTLE_PERCENT: u32 = 10;

impl BudgetDraft {
    /// Checks a draft; `services` are the configured service names (a
    /// budget for a service that does not exist here could never fire,
    /// which for a limit means it silently fails open: refused).
    pub fn validate(&self, services: &[&str]) -> Result<Budget, BudgetError> {
        check_name("name", &self.name, false)?;
        if let Some(i) = &self.identity {
            check_name("identity", i, true)?;
        }
        if let Some(t) = &self.tenant {
            check_name("tenant", t, true)?;
        }
        if self.identity.is_some() && self.tenant.is_some() {
            return Err(err(
                "tenant",
                "a budget counts an identity or a tenant, not both; an identity's spend already counts toward its tenant's budgets",
            ));
        }
        if let Some(s) = &self.service {
            check_name("service", s, true)?;
            if s != "*" && !services.contains(&s.as_str()) {
                return Err(err(
                    "service",
                    format!(
                        "{s:?} is not a service of this node (configured: {}); add the service first",
                        services.join(", ")
                    ),
                ));
            }
        }
        if self.identity.is_none() && self.tenant.is_none() && self.service.is_none() {
            return Err(err(
                "scope",
                "name an identity, a tenant or a service (or `*` for each of them)",
            ));
        }
        let period = Period::parse(&self.period).ok_or_else(|| {
            err(
                "period",
                format!(
                    "{:?} is not a period; use day, month, 7d or 30d",
                    self.period
                ),
            )
        })?;
        if self.amount_micros <= 0 {
            return Err(err(
                "amount_micros",
                format!(
                    "{} is not a budget; give a positive amount in micro-units of the currency (1 unit = 1000000)",
                    self.amount_micros
                ),
            ));
        }
        if self.amount_micros > i128::from(MAX_AMOUNT_MICROS) {
            return Err(err(
                "amount_micros",
                format!(
                    "{} is more than the largest budget ({MAX_AMOUNT_MICROS})",
                    self.amount_micros
                ),
            ));
        }
        if self.thresholds.is_empty() {
            return Err(err(
                "thresholds",
                "give at least one, e.g. 80:warn and 100:deny",
            ));
        }
        let mut thresholds: Vec<Threshold> = Vec::with_capacity(self.thresholds.len());
        for (i, (percent, action)) in self.thresholds.iter().enumerate() {
            let field = format!("thresholds[{i}]");
            if !(1..=i64::from(MAX_PERCENT)).contains(percent) {
                return Err(err(
                    &field,
                    format!("{percent}% is out of range; use 1 to {MAX_PERCENT}"),
                ));
            }
            let action = Action::parse(action).ok_or_else(|| {
                err(
                    &field,
                    format!("{action:?} is not an action; use warn, throttle or deny"),
                )
            })?;
            let t = Threshold {
                percent: *percent as u32,
                action,
            };
            if let Some(prev) = thresholds.last() {
                if t.percent <= prev.percent {
                    return Err(err(
                        &field,
                        format!(
                            "{}% follows {}%; list thresholds by rising percent",
                            t.percent, prev.percent
                        ),
                    ));
                }
                if t.action < prev.action {
                    return Err(err(
                        &field,
                        format!(
                            "{} at {}% is milder than {} at {}%: a higher threshold must act at least as strictly",
                            t.action.as_str(),
                            t.percent,
                            prev.action.as_str(),
                            prev.percent
                        ),
                    ));
                }
            }
            thresholds.push(t);
        }
        let throttle_percent = match self.throttle_percent {
            None => DEFAULT_THROTTLE_PERCENT,
            Some(p) if (1..=99).contains(&p) => p as u32,
            Some(p) => {
                return Err(err(
                    "throttle_percent",
                    format!("{p} is out of range; use 1 to 99 (percent of the identity's limits)"),
                ));
            }
        };
        Ok(Budget {
            name: self.name.clone(),
            scope: Scope {
                identity: self.identity.clone(),
                tenant: self.tenant.clone(),
                service: self.service.clone(),
            },
            period,
            amount_micros: self.amount_micros as u64,
            thresholds,
            throttle_percent,
        })
    }
}

impl Budget {
    /// The draft this budget is the checked form of (to hand back through
    /// the control API, and to persist).
    pub fn draft(&self) -> BudgetDraft {
        BudgetDraft {
            name: self.name.clone(),
            identity: self.scope.identity.clone(),
            tenant: self.scope.tenant.clone(),
            service: self.scope.service.clone(),
            period: self.period.as_str().to_string(),
            amount_micros: i128::from(self.amount_micros),
            thresholds: self
                .thresholds
                .iter()
                .map(|t| (i64::from(t.percent), t.action.as_str().to_string()))
                .collect(),
            throttle_percent: Some(i64::from(self.throttle_percent)),
        }
    }

    /// The strictest threshold `forecast` has reached.
    pub fn level(&self, forecast: u64) -> Option<Threshold> {
        self.thresholds
            .iter()
            .rev()
            .find(|t| forecast >= t.micros(self.amount_micros))
            .copied()
    }
}

/// Most budgets a node holds: `*` scopes give every identity or tenant a
/// budget of its own, so more than this is a mistake (or an attack on the
/// evaluation every second).
pub const MAX_BUDGETS: usize = 1_024;

/// A set of budgets is refused when it is larger than [`MAX_BUDGETS`], or
/// two have one name, or the same scope and period (two limits on one
/// meter: which one is meant?).
pub fn check_set(budgets: &[Budget]) -> Result<(), BudgetError> {
    if budgets.len() > MAX_BUDGETS {
        return Err(err(
            "name",
            format!(
                "more than {MAX_BUDGETS} budgets; use `*` scopes for a budget per identity or tenant"
            ),
        ));
    }
    for (i, b) in budgets.iter().enumerate() {
        for o in &budgets[..i] {
            if o.name == b.name {
                return Err(err("name", format!("budget {:?} is defined twice", b.name)));
            }
            if o.scope == b.scope && o.period == b.period {
                return Err(err(
                    "scope",
                    format!(
                        "budgets {:?} and {:?} both count {} per {}; change one's amount or thresholds instead",
                        o.name,
                        b.name,
                        b.scope,
                        b.period.as_str()
                    ),
                ));
            }
        }
    }
    Ok(())
}
