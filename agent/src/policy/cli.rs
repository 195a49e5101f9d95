//! `portcullis policy validate DIR` and `portcullis policy test DIR
//! --requests FILE`: offline checks of a policy directory.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use portcullis_trail::time::days_from_civil;

use super::{ACTIONS, Method, PolicySet, Principal, Request, Resource};

/// Does any `model:<service|*>:<action>` scope grant `action` on `service`?
/// (The admitter's check of the verified token, for offline tests.)
pub fn scope_grants(scopes: &[String], service: &str, action: &str) -> bool {
    scopes.iter().any(|s| {
        s.strip_prefix("model:")
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(svc, act)| (svc == "*" || svc == service) && act == action)
    })
}

/// Loads and validates `dir`; prints its version, policy count and
/// warnings, or the problems (then `Err`, exit 1).
pub fn validate_cli(dir: &Path) -> anyhow::Result<()> {
    let set = load_or_print(dir)?;
    println!(
        "{}: {} polic{} valid (schema: {}), version {}",
        dir.display(),
        set.len(),
        if set.len() == 1 { "y" } else { "ies" },
        set.schema_origin(),
        set.version()
    );
    for w in set.warnings() {
        println!("warning: {w}");
    }
    Ok(())
}

fn load_or_print(dir: &Path) -> anyhow::Result<PolicySet> {
    match PolicySet::from_dir(dir) {
        Ok(set) => Ok(set),
        Err(e) => {
            eprintln!("{e}");
            let n = e.problems().len().max(1);
            bail!(
                "{}: the policies are not valid ({n} problem{})",
                dir.display(),
                if n == 1 { "" } else { "s" }
            )
        }
    }
}

/// A model's attributes in a test case.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelAttrs {
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    sensitivity: String,
    #[serde(default)]
    cost_tier: String,
}

/// One `[[case]]` of a requests file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    subject: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    issuer: String,
    action: String,
    service: String,
    #[serde(default)]
    model: ModelAttrs,
    #[serde(default = "default_source")]
    source: String,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_time")]
    time: String,
    #[serde(default)]
    token_age_secs: u64,
    #[serde(default)]
    spend_month: u64,
    #[serde(default)]
    forecast_month: u64,
    /// "", warn, throttle or deny.
    #[serde(default)]
    budget_action: String,
    #[serde(default)]
    budget_forecast_percent: u64,
    expect: String,
    #[serde(default)]
    expect_policies: Option<Vec<String>>,
}

fn default_source() -> String {
    "127.0.0.1".into()
}

fn default_method() -> String {
    "knock".into()
}

/// A Monday, noon UTC.
fn default_time() -> String {
    "2026-01-05T12:00:00Z".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestsFile {
    #[serde(default)]
    case: Vec<Case>,
}

impl Case {
    fn request(&self) -> Result<Request, String> {
        let action = ACTIONS
            .iter()
            .copied()
            .find(|a| *a == self.action)
            .ok_or_else(|| {
                format!(
                    "action {:?}: expected one of {}",
                    self.action,
                    ACTIONS.join(", ")
                )
            })?;
        let now = parse_rfc3339(&self.time).ok_or_else(|| {
            format!(
                "time {:?}: expected RFC 3339 UTC like 2026-11-24T10:00:00Z",
                self.time
            )
        })?;
        let source: IpAddr = self
            .source
            .parse()
            .map_err(|_| format!("source {:?}: not an IP address", self.source))?;
        let method = Method::parse(&self.method)
            .ok_or_else(|| format!("method {:?}: expected knock or admit_rpc", self.method))?;
        Ok(Request {
            principal: Principal {
                subject: self.subject.clone(),
                tenant: self.tenant.clone(),
                roles: self.roles.clone(),
                scopes: self.scopes.clone(),
                issuer: self.issuer.clone(),
            },
            action,
            resource: Resource {
                service: self.service.clone(),
                tenant: self.model.tenant.clone(),
                version: self.model.version.clone(),
                sensitivity: self.model.sensitivity.clone(),
                cost_tier: self.model.cost_tier.clone(),
            },
            now,
            source,
            method,
            token_age: Duration::from_secs(self.token_age_secs),
            spend_month: self.spend_month,
            forecast_month: self.forecast_month,
            budget_action: match self.budget_action.as_str() {
                "" | "none" => "",
                "warn" => "warn",
                "throttle" => "throttle",
                "deny" => "deny",
                other => {
                    return Err(format!(
                        "budget_action {other:?}: use \"\", warn, throttle or deny"
                    ));
                }
            },
            budget_forecast_percent: self.budget_forecast_percent,
        })
    }
}

/// What one case got, against what it expected.
struct CaseResult {
    name: String,
    allow: bool,
    determining: Vec<String>,
    errors: Vec<String>,
    /// The TTL a permit gave, or why nothing could permit.
    note: Option<String>,
    ttl_secs: Option<u64>,
    /// What differs from the case's expectations; empty: passed.
    problems: Vec<String>,
}

impl CaseResult {
    fn passed(&self) -> bool {
        self.problems.is_empty()
    }

    fn line(&self) -> String {
        let outcome = match (self.allow, self.determining.is_empty(), &self.note) {
            (false, true, Some(note)) => format!("deny{note}"),
            (false, true, None) => "deny (no permit applies)".to_owned(),
            (allow, _, note) => format!(
                "{} by [{}]{}",
                if allow { "allow" } else { "deny" },
                self.determining.join(", "),
                note.clone().unwrap_or_default()
            ),
        };
        let mut line = format!(
            "{} {}: {outcome}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.name,
        );
        if !self.passed() {
            let _ = write!(line, "; {}", self.problems.join("; "));
        }
        for e in &self.errors {
            let _ = write!(line, "\n    error: {e}");
        }
        line
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "passed": self.passed(),
            "decision": if self.allow { "allow" } else { "deny" },
            "policies": self.determining,
            "ttl_secs": self.ttl_secs,
            "problems": self.problems,
            "errors": self.errors,
        })
    }
}

/// Runs one case.
fn run_case(set: &PolicySet, case: &Case) -> CaseResult {
    let mut r = CaseResult {
        name: case.name.clone(),
        allow: false,
        determining: Vec::new(),
        errors: Vec::new(),
        note: None,
        ttl_secs: None,
        problems: Vec::new(),
    };
    let expect_allow = match case.expect.as_str() {
        "allow" => true,
        "deny" => false,
        other => {
            r.problems.push(format!(
                "expect = {other:?}: expected \"allow\" or \"deny\""
            ));
            return r;
        }
    };
    let req = match case.request() {
        Ok(q) => q,
        Err(e) => {
            r.problems.push(format!("invalid case: {e}"));
            return r;
        }
    };
    if scope_grants(&req.principal.scopes, &req.resource.service, req.action) {
        let d = set.decide(&req);
        r.ttl_secs = d.ttl.map(|t| t.as_secs());
        r.note = d.ttl.map(|t| format!(" ttl {}s", t.as_secs()));
        (r.allow, r.determining, r.errors) = (d.allow, d.determining, d.errors);
    } else {
        r.note = Some(format!(
            " (token scope: nothing grants model:{}:{})",
            req.resource.service, req.action
        ));
    }
    if r.allow != expect_allow {
        r.problems.push(format!("expected {}", case.expect));
    }
    if let Some(want) = &case.expect_policies {
        let mut want = want.clone();
        want.sort();
        let mut got = r.determining.clone();
        got.sort();
        if want != got {
            r.problems
                .push(format!("expected policies [{}]", want.join(", ")));
        }
    }
    r
}

/// Decides every `[[case]]` of `requests` with the policies of `dir` (the
/// token scope check first, as the admitter does); prints one PASS/FAIL line
/// per case, or with `json` one document. `Err` (exit 1) when the policies
/// do not load, the file is bad, or any case does not get what it expects.
pub fn test_cli(dir: &Path, requests: &Path, json: bool) -> anyhow::Result<()> {
    let set = load_or_print(dir)?;
    let text = std::fs::read_to_string(requests)
        .with_context(|| format!("reading {}", requests.display()))?;
    let file: RequestsFile =
        toml::from_str(&text).with_context(|| format!("{}", requests.display()))?;
    if file.case.is_empty() {
        bail!("{}: no [[case]] tables", requests.display());
    }
    let results: Vec<CaseResult> = file.case.iter().map(|c| run_case(&set, c)).collect();
    let n = results.len();
    let failed = results.iter().filter(|r| !r.passed()).count();
    if json {
        let doc = serde_json::json!({
            "policy_version": set.version(),
            "policies": set.len(),
            "dir": dir.display().to_string(),
            "passed": n - failed,
            "failed": failed,
            "cases": results.iter().map(CaseResult::json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "policy set {} ({} policies from {})",
            set.version(),
            set.len(),
            dir.display()
        );
        for r in &results {
            println!("{}", r.line());
        }
        println!("{} passed, {failed} failed", n - failed);
    }
    if failed > 0 {
        bail!("{failed} of {n} policy test cases failed");
    }
    Ok(())
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC, no fraction).
pub(super) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
        || !matches!(b[19], b'Z' | b'z')
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let secs = days_from_civil(year, month as u32, day as u32) * 86_400
        + hour * 3_600
        + minute * 60
        + second;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (years >= 1).
#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> u64 {
        parse_rfc3339(s)
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(secs("1970-01-01T00:00:00Z"), 0);
        assert_eq!(secs("2000-03-01T00:00:00Z"), 951_868_800);
        assert_eq!(secs("2026-11-24T10:00:00Z"), 1_795_514_400);
        assert_eq!(secs("2024-02-29T23:59:59Z"), 1_709_251_199);
        for bad in [
            "2026-11-24 10:00:00Z",
            "2026-11-24T10:00:00",
            "2026-02-29T10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-11-24T24:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-11-24T10:00:00+01:00",
            "+026-11-24T10:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn scopes() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(scope_grants(&s(&["model:llm:invoke"]), "llm", "invoke"));
        assert!(scope_grants(&s(&["openid", "model:*:read"]), "x", "read"));
        assert!(!scope_grants(&s(&["model:*:read"]), "x", "invoke"));
        assert!(!scope_grants(&s(&["model:llm2:invoke"]), "llm", "invoke"));
        assert!(!scope_grants(&s(&[]), "llm", "invoke"));
    }
}
