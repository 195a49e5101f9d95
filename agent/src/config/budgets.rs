//! `[[budgets]]` and `[cost_control]`: spend limits with forecast gating,
//! the throttle's floor, and the extraction guard's thresholds
//! (docs/cost-control.md). The budgets are checked by the one validation
//! the control API uses too (`agent/src/budget/spec.rs`).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::budget::{Budget, BudgetDraft, spec};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    pub name: Option<String>,
    pub identity: Option<String>,
    pub tenant: Option<String>,
    pub service: Option<String>,
    pub period: Option<String>,
    pub amount_micros: Option<i64>,
    #[serde(default)]
    pub thresholds: Vec<RawThreshold>,
    pub throttle_percent: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawThreshold {
    pub percent: Option<i64>,
    pub action: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCostControl {
    pub forecast_window_secs: Option<i64>,
    pub throttle_floor_bytes_per_sec: Option<i64>,
    pub throttle_floor_conn_per_sec: Option<i64>,
    #[serde(default)]
    pub extraction: RawExtraction,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExtraction {
    pub egress_bytes_per_min: Option<i64>,
    pub ratio: Option<i64>,
    pub baseline_factor: Option<i64>,
    pub baseline_minutes: Option<i64>,
    pub min_bytes_per_min: Option<i64>,
    pub cap_bytes_per_sec: Option<i64>,
    pub hold_secs: Option<i64>,
}

/// `[cost_control]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostControlSection {
    /// The forecast extrapolates the cost of this recent window.
    pub forecast_window: Duration,
    /// What a throttled identity keeps where its limits are unlimited
    /// (a fraction of "unlimited" is not a rate).
    pub throttle_floor_bytes_per_sec: u64,
    pub throttle_floor_conn_per_sec: u32,
    pub extraction: ExtractionSection,
}

/// `[cost_control.extraction]`: when an identity's output looks like a
/// model being siphoned. Each figure is over the last minute; 0 turns a
/// test off. Nothing fires below `min_bytes_per_min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractionSection {
    /// Response bytes per minute, whatever the requests.
    pub egress_bytes_per_min: u64,
    /// Response bytes per request byte.
    pub ratio: u64,
    /// Times the identity's own trailing per-minute average...
    pub baseline_factor: u64,
    /// ...over this many minutes (and only once it has that many).
    pub baseline_minutes: u32,
    pub min_bytes_per_min: u64,
    /// The egress rate a tripped identity is capped at, in TC...
    pub cap_bytes_per_sec: u64,
    /// ...for this long after its output was last over.
    pub hold: Duration,
}

impl Default for CostControlSection {
    fn default() -> Self {
        CostControlSection {
            forecast_window: Duration::from_secs(600),
            throttle_floor_bytes_per_sec: 1 << 20,
            throttle_floor_conn_per_sec: 5,
            extraction: ExtractionSection::default(),
        }
    }
}

impl Default for ExtractionSection {
    /// Generative inference answers in kilobytes per second per stream:
    /// none of these fires below 256 MiB of output a minute.
    fn default() -> Self {
        ExtractionSection {
            egress_bytes_per_min: 4 << 30,
            ratio: 1_000,
            baseline_factor: 20,
            baseline_minutes: 10,
            min_bytes_per_min: 256 << 20,
            cap_bytes_per_sec: 1 << 20,
            hold: Duration::from_secs(300),
        }
    }
}

fn range(
    field: &str,
    v: Option<i64>,
    default: u64,
    min: i64,
    max: i64,
) -> Result<u64, ConfigError> {
    let v = v.unwrap_or(default as i64);
    if !(min..=max).contains(&v) {
        return Err(ConfigError::Invalid {
            field: field.to_string(),
            message: format!("{v} is out of range; use {min} to {max}"),
        });
    }
    Ok(v as u64)
}

pub(super) fn cost_control(raw: &RawCostControl) -> Result<CostControlSection, ConfigError> {
    let d = CostControlSection::default();
    let x = &raw.extraction;
    let dx = d.extraction;
    let f = "cost_control.extraction";
    Ok(CostControlSection {
        forecast_window: Duration::from_secs(range(
            "cost_control.forecast_window_secs",
            raw.forecast_window_secs,
            d.forecast_window.as_secs(),
            1,
            86_400,
        )?),
        throttle_floor_bytes_per_sec: range(
            "cost_control.throttle_floor_bytes_per_sec",
            raw.throttle_floor_bytes_per_sec,
            d.throttle_floor_bytes_per_sec,
            1,
            1 << 40,
        )?,
        throttle_floor_conn_per_sec: range(
            "cost_control.throttle_floor_conn_per_sec",
            raw.throttle_floor_conn_per_sec,
            u64::from(d.throttle_floor_conn_per_sec),
            1,
            1_000_000,
        )? as u32,
        extraction: ExtractionSection {
            egress_bytes_per_min: range(
                &format!("{f}.egress_bytes_per_min"),
                x.egress_bytes_per_min,
                dx.egress_bytes_per_min,
                0,
                1 << 50,
            )?,
            ratio: range(&format!("{f}.ratio"), x.ratio, dx.ratio, 0, 1 << 40)?,
            baseline_factor: range(
                &format!("{f}.baseline_factor"),
                x.baseline_factor,
                dx.baseline_factor,
                0,
                1_000_000,
            )?,
            baseline_minutes: range(
                &format!("{f}.baseline_minutes"),
                x.baseline_minutes,
                u64::from(dx.baseline_minutes),
                1,
                1_440,
            )? as u32,
            min_bytes_per_min: range(
                &format!("{f}.min_bytes_per_min"),
                x.min_bytes_per_min,
                dx.min_bytes_per_min,
                1,
                1 << 50,
            )?,
            cap_bytes_per_sec: range(
                &format!("{f}.cap_bytes_per_sec"),
                x.cap_bytes_per_sec,
                dx.cap_bytes_per_sec,
                1,
                1 << 40,
            )?,
            hold: Duration::from_secs(range(
                &format!("{f}.hold_secs"),
                x.hold_secs,
                dx.hold.as_secs(),
                1,
                86_400,
            )?),
        },
    })
}

/// `[[budgets]]`, each checked as `ctl budget set` checks one, then the
/// set (names and scopes once each).
pub(super) fn budgets(raw: &[RawBudget], services: &[&str]) -> Result<Vec<Budget>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let draft = BudgetDraft {
            name: r.name.clone().unwrap_or_default(),
            identity: r.identity.clone(),
            tenant: r.tenant.clone(),
            service: r.service.clone(),
            period: r.period.clone().unwrap_or_default(),
            amount_micros: i128::from(r.amount_micros.unwrap_or(0)),
            thresholds: r
                .thresholds
                .iter()
                .map(|t| (t.percent.unwrap_or(0), t.action.clone().unwrap_or_default()))
                .collect(),
            throttle_percent: r.throttle_percent,
        };
        let b = draft.validate(services).map_err(|e| ConfigError::Invalid {
            field: format!("budgets[{i}].{}", e.field),
            message: e.message,
        })?;
        out.push(b);
    }
    spec::check_set(&out).map_err(|e| ConfigError::Invalid {
        field: format!("budgets.{}", e.field),
        message: e.message,
    })?;
    Ok(out)
}
