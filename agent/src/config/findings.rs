//! `[findings]`: thresholds of the real-time detections (a flood at a
//! protected service, a storm of refused knocks, a spool the collector
//! stopped draining). 0 turns one off.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FindingsSection {
    /// Packets refused per second at one protected service.
    pub flood_per_sec: u64,
    /// Knocks and Admit calls refused per second (agent refusals and the
    /// kernel's knock rate limits together).
    pub refusals_per_sec: u64,
    /// Seconds the collector may acknowledge nothing while events wait.
    pub spool_stall: Duration,
    /// An episode ends after this long below its threshold.
    pub quiet: Duration,
}

impl Default for FindingsSection {
    fn default() -> Self {
        FindingsSection {
            flood_per_sec: 10_000,
            refusals_per_sec: 200,
            spool_stall: Duration::from_secs(60),
            quiet: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFindings {
    pub flood_per_sec: Option<i64>,
    pub refusals_per_sec: Option<i64>,
    pub spool_stall_secs: Option<i64>,
    pub quiet_secs: Option<i64>,
}

pub(super) fn validate(raw: &RawFindings) -> Result<FindingsSection, ConfigError> {
    let d = FindingsSection::default();
    let n = |key: &str, v: Option<i64>, default: u64, min: i64, max: i64| {
        let v = v.unwrap_or(default as i64);
        if !(min..=max).contains(&v) {
            return Err(ConfigError::Invalid {
                field: format!("findings.{key}"),
                message: format!("{v} is out of range; use {min} to {max}"),
            });
        }
        Ok(v as u64)
    };
    Ok(FindingsSection {
        flood_per_sec: n(
            "flood_per_sec",
            raw.flood_per_sec,
            d.flood_per_sec,
            0,
            1 << 40,
        )?,
        refusals_per_sec: n(
            "refusals_per_sec",
            raw.refusals_per_sec,
            d.refusals_per_sec,
            0,
            1 << 40,
        )?,
        spool_stall: Duration::from_secs(n(
            "spool_stall_secs",
            raw.spool_stall_secs,
            d.spool_stall.as_secs(),
            0,
            86_400,
        )?),
        quiet: Duration::from_secs(n("quiet_secs", raw.quiet_secs, d.quiet.as_secs(), 1, 3600)?),
    })
}
