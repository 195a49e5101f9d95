//! The configuration file as written: every key optional, integers as TOML's
//! `i64`, addresses as text. Ranges, defaults, required keys and
//! cross-references are `validate`'s job, so their errors can name the key
//! and the fix in plain words instead of serde's type names.
//!
//! Every struct denies unknown keys. When serde rejects the file, `parse`
//! finds which section and key were at fault (serde's own message names
//! neither) and reports that path with the toml crate's line/column text.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::budgets::{RawBudget, RawCostControl};
use super::control::RawControl;
use super::findings::RawFindings;
use super::metrics::RawMetrics;
use super::{Action, ConfigError, LogFormat, OnFull, Protocol, ServiceMode, XdpMode};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub kernel: RawKernel,
    #[serde(default)]
    pub knock: RawKnock,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub identities: BTreeMap<String, RawLimits>,
    #[serde(default)]
    pub services: Vec<RawService>,
    #[serde(default)]
    pub admissions: Vec<RawAdmission>,
    pub tokens: Option<RawTokens>,
    pub policy: Option<RawPolicy>,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub accounting: RawAccounting,
    #[serde(default)]
    pub control: RawControl,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub findings: RawFindings,
    #[serde(default)]
    pub budgets: Vec<RawBudget>,
    #[serde(default)]
    pub cost_control: RawCostControl,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub spool_dir: Option<String>,
    pub spool_max_bytes: Option<i64>,
    pub segment_bytes: Option<i64>,
    pub on_full: Option<OnFull>,
    pub checkpoint_events: Option<i64>,
    pub checkpoint_secs: Option<i64>,
    pub report_interval_secs: Option<i64>,
    pub collector: Option<RawCollector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCollector {
    pub endpoint: Option<String>,
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub allow_plaintext: Option<bool>,
    pub batch_max_events: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccounting {
    pub ledger: Option<String>,
    pub currency: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub per_connection_micros: Option<i64>,
    pub per_mib_in_micros: Option<i64>,
    pub per_mib_out_micros: Option<i64>,
    pub per_request_micros: Option<i64>,
    pub per_mtok_in_micros: Option<i64>,
    pub per_mtok_out_micros: Option<i64>,
    pub per_gpu_hour_micros: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub dir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub node_id: Option<String>,
    pub log_format: Option<LogFormat>,
    pub stats_interval_ms: Option<i64>,
    pub node_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKernel {
    pub interfaces: Option<Vec<String>>,
    pub xdp_mode: Option<XdpMode>,
    pub egress: Option<bool>,
    pub pin_dir: Option<String>,
    pub bpffs: Option<String>,
    pub max_flows: Option<i64>,
    pub max_admissions: Option<i64>,
    pub max_knock_sources: Option<i64>,
    pub events_per_sec: Option<i64>,
    pub ephemeral_pins: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKnock {
    pub port: Option<i64>,
    pub per_source_per_sec: Option<i64>,
    pub per_source_burst: Option<i64>,
    pub global_per_sec: Option<i64>,
    pub global_burst: Option<i64>,
    pub window_secs: Option<i64>,
    pub max_ttl_secs: Option<i64>,
    pub reply: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    pub jwks_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: Option<i64>,
    pub max_lifetime_secs: Option<i64>,
    pub tenant_claim: Option<String>,
    pub default_tenant: Option<String>,
    pub require_client_id: Option<bool>,
    pub require_typ: Option<bool>,
    pub allow_hs256: Option<bool>,
    pub revocations_file: Option<String>,
}

/// Both `[limits]` and each `[identities.<name>]` (a subset of the same keys).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub conn_per_sec: Option<i64>,
    pub conn_burst: Option<i64>,
    pub bytes_per_sec: Option<i64>,
    pub bytes_burst: Option<i64>,
    pub egress_bytes_per_sec: Option<i64>,
    pub egress_bytes_burst: Option<i64>,
    pub max_flows: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub name: Option<String>,
    pub protocol: Option<Protocol>,
    pub port: Option<i64>,
    pub address: Option<String>,
    pub action: Option<Action>,
    pub tenant: Option<String>,
    pub version: Option<String>,
    pub sensitivity: Option<String>,
    pub cost_tier: Option<String>,
    pub price: Option<RawPrice>,
    pub max_sources_per_identity: Option<i64>,
    pub mode: Option<ServiceMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmission {
    pub identity: Option<String>,
    pub source: Option<String>,
    pub service: Option<String>,
    pub ttl_secs: Option<i64>,
    pub source_port: Option<i64>,
}

/// Parses the file's text into its raw shape.
pub(super) fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|error| {
        let detail = error.to_string().trim_end().to_owned();
        // A document that is not even a table is a syntax error: no key to blame.
        match toml::from_str::<Table>(text) {
            Err(e) => match oversized_integer(text, &e) {
                Some((field, literal, _)) => ConfigError::Invalid {
                    field,
                    message: format!(
                        "{literal} is too large for any setting (TOML integers stop at {}); use a value in the setting's range (see --print-example-config)",
                        i64::MAX
                    ),
                },
                None => ConfigError::Syntax { detail },
            },
            Ok(doc) => ConfigError::Toml {
                field: locate(&doc),
                fix: fix_for(error.message()),
                detail,
            },
        }
    })
}

/// The path of the first key serde rejects. Each section is deserialized on
/// its own, then key by key; this works because every raw field is optional,
/// so a single key can only fail for its own sake. Every section of
/// [`RawConfig`] must be listed here: a missing one would be blamed for
/// every error after it (the test `every_section_is_located` checks).
fn locate(doc: &Table) -> String {
    doc.iter()
        .find_map(|(key, value)| match key.as_str() {
            "agent" => probe::<RawAgent>(key, value, no_nested),
            "kernel" => probe::<RawKernel>(key, value, no_nested),
            "knock" => probe::<RawKnock>(key, value, no_nested),
            "limits" => probe::<RawLimits>(key, value, no_nested),
            "identities" => probe_entries::<RawLimits>(key, value),
            "services" => probe_items::<RawService>(key, value, |path, key, value| match key {
                "price" => Some(probe::<RawPrice>(path, value, no_nested)),
                _ => None,
            }),
            "admissions" => probe_items::<RawAdmission>(key, value, no_nested),
            "tokens" => probe::<RawTokens>(key, value, no_nested),
            "policy" => probe::<RawPolicy>(key, value, no_nested),
            "audit" => probe::<RawAudit>(key, value, |path, key, value| match key {
                "collector" => Some(probe::<RawCollector>(path, value, no_nested)),
                _ => None,
            }),
            "accounting" => probe::<RawAccounting>(key, value, no_nested),
            "control" => probe::<RawControl>(key, value, no_nested),
            "metrics" => probe::<RawMetrics>(key, value, no_nested),
            "findings" => probe::<RawFindings>(key, value, no_nested),
            // Not a section of the file at all.
            _ => Some(key.clone()),
        })
        // Unreachable while the list above matches RawConfig; stay useful anyway.
        .unwrap_or_else(|| "config".to_owned())
}

/// What to do with a nested table: `Some(result)` to probe it with its own
/// type (`path` is its path), `None` to blame the key itself.
type Nested = fn(&str, &str, &Value) -> Option<Option<String>>;

fn no_nested(_: &str, _: &str, _: &Value) -> Option<Option<String>> {
    None
}

/// `Some(path)` of the offending key if `value` is not a valid `T`.
fn probe<T: DeserializeOwned>(path: &str, value: &Value, nested: Nested) -> Option<String> {
    if value.clone().try_into::<T>().is_ok() {
        return None;
    }
    let Value::Table(table) = value else {
        return Some(path.to_owned());
    };
    let culprit = table.iter().find(|&(key, value)| {
        let single = Table::from_iter([(key.clone(), value.clone())]);
        Value::Table(single).try_into::<T>().is_err()
    });
    Some(match culprit {
        Some((key, value)) => {
            let at = format!("{path}.{key}");
            match nested(&at, key, value) {
                Some(Some(inner)) => inner,
                _ => at,
            }
        }
        None => path.to_owned(),
    })
}

/// `[[section]]`: an array of tables, blamed as `section[i].key`.
fn probe_items<T: DeserializeOwned>(path: &str, value: &Value, nested: Nested) -> Option<String> {
    let Value::Array(items) = value else {
        return Some(path.to_owned());
    };
    items
        .iter()
        .enumerate()
        .find_map(|(i, item)| probe::<T>(&format!("{path}[{i}]"), item, nested))
}

/// `[section.<name>]`: a table of tables, blamed as `section.name.key`.
fn probe_entries<T: DeserializeOwned>(path: &str, value: &Value) -> Option<String> {
    let Value::Table(entries) = value else {
        return Some(path.to_owned());
    };
    entries
        .iter()
        .find_map(|(name, entry)| probe::<T>(&format!("{path}.{name}"), entry, no_nested))
}

/// An integer literal TOML cannot hold (beyond i64) makes the whole file
/// unparsable, so serde never names its key. This finds it: the literal at
/// the error, the key on its line and the section above. Returns the field
/// path, the literal, and the text with the literal replaced by the nearest
/// i64, which parses (so validation can name the field's range).
pub(super) fn oversized_integer(
    text: &str,
    error: &toml::de::Error,
) -> Option<(String, String, String)> {
    let span = error.span()?;
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[span.start..]
        .find('\n')
        .map_or(text.len(), |i| span.start + i);
    let line = &text[line_start..line_end];
    let (key, rest) = line.split_once('=')?;
    let literal = rest.split('#').next()?.trim();
    let digits: String = literal.chars().filter(|c| *c != '_').collect();
    let negative = digits.starts_with('-');
    let body = digits.trim_start_matches(['+', '-']);
    if body.is_empty() || !body.chars().all(|c| c.is_ascii_digit()) || digits.parse::<i64>().is_ok()
    {
        return None;
    }
    let key = key.trim().trim_matches('"');
    // The section: the last header above, counting [[array]] items.
    let mut section = String::new();
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_owned();
            let n = counts.entry(name.clone()).or_insert(0);
            section = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            section = name.trim().to_owned();
        }
    }
    let field = if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    };
    let nearest = if negative { i64::MIN } else { i64::MAX };
    let mut fixed = String::with_capacity(text.len());
    fixed.push_str(&text[..line_start]);
    fixed.push_str(&line.replacen(literal, &nearest.to_string(), 1));
    fixed.push_str(&text[line_end..]);
    Some((field, literal.to_owned(), fixed))
}

/// Plain-words advice for serde's message kinds; the message itself (with
/// the expected keys or values) follows in the toml crate's text.
fn fix_for(message: &str) -> &'static str {
    if message.starts_with("unknown field") {
        "not a known key here; remove it or fix its spelling (the valid keys are listed below)"
    } else if message.starts_with("unknown variant") {
        "not an allowed value; use one of the values listed below"
    } else if message.starts_with("invalid type") {
        "wrong kind of value (text, number, boolean, list or table); fix it as described below"
    } else {
        "fix the value as described below"
    }
}
