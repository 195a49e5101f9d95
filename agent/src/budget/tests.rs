use std::{collections::HashMap, time::SystemTime};

use super::{guard::Guard, spec::check_set, *};
use crate::{accounting::period::periods, config::ExtractionSection};
use portcullis_trail::time::days_from_civil;

const DAY: i64 = 86_400;

fn draft(name: &str) -> BudgetDraft {
    BudgetDraft {
        name: name.into(),
        identity: Some("acme/alice".into()),
        period: "day".into(),
        amount_micros: 1_000_000,
        thresholds: vec![(80, "warn".into()), (100, "deny".into())],
        ..BudgetDraft::default()
    }
}

fn field(d: &BudgetDraft) -> String {
    d.validate(&["llm", "embed"]).expect_err("refused").field
}

#[test]
fn every_kind_of_bad_budget_is_refused_naming_the_field() {
    let ok = draft("a").validate(&["llm"]).expect("valid");
    assert_eq!(ok.throttle_percent, spec::DEFAULT_THROTTLE_PERCENT);
    for (amount, why) in [
        (0, "zero"),
        (-5, "negative"),
        (i128::from(u64::MAX) + 1, "overflow"),
    ] {
        let d = BudgetDraft {
            amount_micros: amount,
            ..draft("a")
        };
        assert_eq!(field(&d), "amount_micros", "{why}");
    }
    let both = BudgetDraft {
        tenant: Some("acme".into()),
        ..draft("a")
    };
    assert_eq!(field(&both), "tenant");
    let nothing = BudgetDraft {
        identity: None,
        ..draft("a")
    };
    assert_eq!(field(&nothing), "scope");
    let unknown_service = BudgetDraft {
        service: Some("gpt-9".into()),
        ..draft("a")
    };
    let e = unknown_service.validate(&["llm"]).unwrap_err();
    assert_eq!(e.field, "service");
    assert!(e.message.contains("llm"), "{e}");
    let period = BudgetDraft {
        period: "week".into(),
        ..draft("a")
    };
    assert_eq!(field(&period), "period");
    for t in [
        vec![],
        vec![(0, "warn".to_string())],
        vec![(1_001, "warn".to_string())],
        vec![(80, "block".to_string())],
        vec![(90, "warn".to_string()), (80, "deny".to_string())],
        vec![(80, "deny".to_string()), (100, "warn".to_string())],
    ] {
        let d = BudgetDraft {
            thresholds: t.clone(),
            ..draft("a")
        };
        assert!(field(&d).starts_with("thresholds"), "{t:?}");
    }
    let throttle = BudgetDraft {
        throttle_percent: Some(100),
        ..draft("a")
    };
    assert_eq!(field(&throttle), "throttle_percent");
    let name = BudgetDraft {
        name: "a b".into(),
        ..draft("a")
    };
    assert_eq!(field(&name), "name");
    // One name, or one (scope, period), twice: refused.
    let a = draft("a").validate(&[]).unwrap();
    let twin = draft("b").validate(&[]).unwrap();
    assert_eq!(
        check_set(&[a.clone(), a.clone()]).unwrap_err().field,
        "name"
    );
    assert_eq!(check_set(&[a.clone(), twin]).unwrap_err().field, "scope");
    // Overlapping scopes with other periods are fine: strictest wins.
    let month = BudgetDraft {
        period: "month".into(),
        ..draft("c")
    }
    .validate(&[])
    .unwrap();
    assert!(check_set(&[a, month]).is_ok());
}

fn noon(y: i64, m: u32, d: u32) -> i64 {
    days_from_civil(y, m, d) * DAY + 12 * 3_600
}

fn charge(m: &mut Meters, b: &[Budget], who: (&str, &str, &str), cost: u64, t: i64) {
    m.charge(b, who, cost, (t, &periods(t), true), 60);
}

#[test]
fn a_day_budget_rolls_over_once_and_never_back() {
    let b = vec![draft("daily").validate(&[]).unwrap()];
    let mut m = Meters::default();
    let t = noon(2026, 12, 5);
    charge(&mut m, &b, ("acme/alice", "acme", "llm"), 500_000, t);
    let key = ("daily".to_string(), String::new());
    assert_eq!(m.meters[&key].spent, 500_000);
    // Another identity is not counted.
    charge(&mut m, &b, ("acme/bob", "acme", "llm"), 9, t);
    assert_eq!(m.meters.len(), 1);
    // The next day: from zero, once.
    let next = t + DAY;
    let _ = m.evaluate(&b, next, &periods(next), 60);
    charge(&mut m, &b, ("acme/alice", "acme", "llm"), 7, next);
    assert_eq!(m.meters[&key].spent, 7);
    let _ = m.evaluate(&b, next + 1, &periods(next + 1), 60);
    assert_eq!(m.meters[&key].spent, 7, "a second roll-over does not reset");
    // A wall clock stepped back to yesterday: the ledger's clock never
    // goes back (the accountant passes max(wall, ledger)), and a meter
    // asked about an earlier period keeps its own.
    let _ = m.evaluate(&b, t, &periods(t), 60);
    assert_eq!(m.meters[&key].spent, 7);
}

#[test]
fn the_forecast_gates_before_the_spend_crosses() {
    // 1.00 a day; deny at 100%.
    let b = vec![draft("daily").validate(&[]).unwrap()];
    let mut m = Meters::default();
    let t = noon(2026, 12, 5);
    // 0.01 a second for 10 s: spent 0.10, but 12 h left at that rate.
    for s in 0..10 {
        charge(&mut m, &b, ("acme/alice", "acme", "llm"), 10_000, t + s);
    }
    let (readings, changed, _, _) = m.evaluate(&b, t + 10, &periods(t + 10), 60);
    let r = &readings[0];
    assert_eq!(r.spent_micros, 100_000);
    assert!(r.forecast_micros > r.amount_micros, "{r:?}");
    assert_eq!(r.level.map(|l| l.action), Some(Action::Deny));
    assert_eq!(changed.len(), 1, "one transition");
    assert_eq!(changed[0].from, None);
    // Evaluated again: no new transition.
    let (_, again, _, _) = m.evaluate(&b, t + 11, &periods(t + 11), 60);
    assert!(again.is_empty());
    // The rate leaves the window: the forecast falls back to the spend,
    // and the action is lifted (a transition down).
    let later = t + 200;
    let (readings, down, _, _) = m.evaluate(&b, later, &periods(later), 60);
    assert_eq!(readings[0].forecast_micros, 100_000);
    assert_eq!(down.len(), 1);
    assert_eq!(down[0].from, Some(Action::Deny));
    assert_eq!(down[0].reading.level, None);
}

#[test]
fn rolling_windows_forget_spend_bucket_by_bucket() {
    let b = vec![
        BudgetDraft {
            period: "7d".into(),
            ..draft("week")
        }
        .validate(&[])
        .unwrap(),
    ];
    let mut m = Meters::default();
    let t = noon(2026, 12, 1);
    charge(&mut m, &b, ("acme/alice", "acme", "llm"), 100, t);
    charge(&mut m, &b, ("acme/alice", "acme", "llm"), 50, t + 3 * DAY);
    let key = ("week".to_string(), String::new());
    let _ = m.evaluate(&b, t + 7 * DAY - 1, &periods(t + 7 * DAY - 1), 60);
    assert_eq!(m.meters[&key].spent, 150);
    let _ = m.evaluate(&b, t + 7 * DAY + 3_600, &periods(t + 7 * DAY + 3_600), 60);
    assert_eq!(m.meters[&key].spent, 50, "the first day's spend left");
}

#[test]
fn the_strictest_budget_decides_and_an_approval_lets_one_identity_through() {
    let services = ["llm"];
    let budgets = vec![
        // Each identity: warn at 50% of 10.00 a month.
        BudgetDraft {
            identity: Some("*".into()),
            period: "month".into(),
            amount_micros: 10_000_000,
            thresholds: vec![(50, "warn".into())],
            ..draft("each")
        }
        .validate(&services)
        .unwrap(),
        // The tenant at the llm service: throttle at 100% of 1.00 a day.
        BudgetDraft {
            identity: None,
            tenant: Some("acme".into()),
            service: Some("llm".into()),
            thresholds: vec![(100, "throttle".into())],
            throttle_percent: Some(25),
            ..draft("acme-llm")
        }
        .validate(&services)
        .unwrap(),
    ];
    let mut m = Meters::default();
    let t = noon(2026, 12, 5);
    charge(
        &mut m,
        &budgets,
        ("acme/alice", "acme", "llm"),
        6_000_000,
        t - 3_600,
    );
    let (readings, _, _, _) = m.evaluate(&budgets, t, &periods(t), 60);
    let view = BudgetView {
        budgets: budgets.clone(),
        readings: readings
            .into_iter()
            .map(|r| ((r.budget.clone(), r.key.clone()), r))
            .collect(),
        approvals: m.approvals.clone(),
        at_secs: t,
    };
    let v = view.verdict("acme/alice", "acme", Some("llm"));
    assert_eq!(v.action, Some(Action::Throttle));
    assert_eq!(v.budget, "acme-llm");
    assert_eq!(v.throttle_percent, 25);
    assert_eq!(v.enforced(), Some(Action::Throttle));
    // Without the service only the per-identity budget applies: warn.
    let v = view.verdict("acme/alice", "acme", None);
    assert_eq!(
        (v.action, v.budget.as_str(), v.key.as_str()),
        (Some(Action::Warn), "each", "acme/alice")
    );
    assert_eq!(v.enforced(), None, "warn enforces nothing");
    // Another tenant's identity is under nothing.
    assert_eq!(
        view.verdict("other/carol", "other", Some("llm")).action,
        None
    );
    // An approval: through, until its amount is used.
    let mut m2 = m.clone();
    m2.approvals.insert(
        "acme/alice".into(),
        Approval {
            amount_micros: 1_000,
            used_micros: 0,
            until_secs: t + 3_600,
            granted_secs: t,
            by: "test".into(),
            reason: String::new(),
        },
    );
    let through = BudgetView {
        approvals: m2.approvals.clone(),
        ..view.clone()
    };
    let v = through.verdict("acme/alice", "acme", Some("llm"));
    assert!(v.approved && v.enforced().is_none());
    charge(
        &mut m2,
        &budgets,
        ("acme/alice", "acme", "llm"),
        1_000,
        t + 1,
    );
    let (_, _, ended, _) = m2.evaluate(&budgets, t + 2, &periods(t + 2), 60);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].why, "amount used");
    assert!(m2.approvals.is_empty());
    // Or its time.
    let mut m3 = m.clone();
    m3.approvals.insert(
        "acme/alice".into(),
        Approval {
            amount_micros: u64::MAX,
            used_micros: 0,
            until_secs: t + 10,
            granted_secs: t,
            by: "test".into(),
            reason: String::new(),
        },
    );
    let (_, _, ended, _) = m3.evaluate(&budgets, t + 10, &periods(t + 10), 60);
    assert_eq!(ended[0].why, "time up");
}

fn guard_cfg() -> ExtractionSection {
    ExtractionSection {
        egress_bytes_per_min: 0,
        ratio: 50,
        baseline_factor: 0,
        min_bytes_per_min: 1 << 20,
        ..ExtractionSection::default()
    }
}

#[test]
fn a_bulk_download_trips_the_guard_and_balanced_traffic_does_not() {
    let cfg = guard_cfg();
    let mut g = Guard::default();
    let now = SystemTime::now();
    let t = noon(2026, 12, 5);
    let mut opened = Vec::new();
    for s in 0..10 {
        let mut traffic = HashMap::new();
        // Request/response of equal size: 1 MiB each way a second.
        traffic.insert("acme/chat".to_string(), (1 << 20, 1 << 20));
        // A bulk download of the same total: all response.
        traffic.insert("acme/bulk".to_string(), (4_000, 2 << 20));
        opened.extend(g.observe(&cfg, now, t + s, &traffic));
    }
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0].subject, "acme/bulk");
    assert_eq!(opened[0].kind, "extraction");
    assert!(opened[0].detail.contains("ratio"), "{}", opened[0].detail);
    assert_eq!(g.capped().collect::<Vec<_>>(), ["acme/bulk"]);
    // Under the floor nothing fires, whatever the ratio.
    let mut small = Guard::default();
    let mut traffic = HashMap::new();
    traffic.insert("acme/tiny".to_string(), (1, 10_000));
    for s in 0..70 {
        assert!(small.observe(&cfg, now, t + s, &traffic).is_empty());
    }
}

#[test]
fn the_guard_uses_the_identitys_own_baseline() {
    let cfg = ExtractionSection {
        egress_bytes_per_min: 0,
        ratio: 0,
        baseline_factor: 5,
        baseline_minutes: 3,
        min_bytes_per_min: 1_000,
        ..ExtractionSection::default()
    };
    let mut g = Guard::default();
    let now = SystemTime::now();
    let t0 = days_from_civil(2026, 12, 5) * DAY;
    let steady: HashMap<String, (u64, u64)> =
        [("acme/a".to_string(), (100, 1_000))].into_iter().collect();
    for s in 0..(4 * 60) {
        assert!(
            g.observe(&cfg, now, t0 + s, &steady).is_empty(),
            "steady at {s}"
        );
    }
    let fig = g.figures("acme/a").unwrap();
    assert_eq!(fig.baseline_per_min, Some(60_000));
    // Ten times its usual output: over 5x its baseline.
    let burst: HashMap<String, (u64, u64)> = [("acme/a".to_string(), (100, 10_000))]
        .into_iter()
        .collect();
    let mut opened = Vec::new();
    for s in 0..60 {
        opened.extend(g.observe(&cfg, now, t0 + 240 + s, &burst));
    }
    assert_eq!(opened.len(), 1);
    assert!(opened[0].open);
}

#[test]
fn config_budgets_are_checked_with_the_field_path() {
    let base = "[kernel]\ninterfaces = [\"eth0\"]\n\n[[services]]\nname = \"llm\"\nport = 8000\n";
    let with = |b: &str| crate::config::Config::from_toml_str(&format!("{base}{b}"));
    let ok = with(
        "[[budgets]]\nname = \"a\"\ntenant = \"*\"\nservice = \"llm\"\nperiod = \"30d\"\namount_micros = 5\nthresholds = [{ percent = 100, action = \"deny\" }]\n",
    )
    .expect("a valid budget");
    assert_eq!(ok.budgets[0].period, Period::Rolling30d);
    for (text, field) in [
        (
            "[[budgets]]\nname = \"a\"\nservice = \"gpt\"\nperiod = \"day\"\namount_micros = 5\nthresholds = [{ percent = 100, action = \"deny\" }]\n",
            "budgets[0].service",
        ),
        (
            "[[budgets]]\nname = \"a\"\nidentity = \"x\"\nperiod = \"day\"\namount_micros = -1\nthresholds = [{ percent = 100, action = \"deny\" }]\n",
            "budgets[0].amount_micros",
        ),
        (
            "[[budgets]]\nname = \"a\"\nidentity = \"x\"\nperiod = \"day\"\namount_micros = 1\nthresholds = [{ percent = 100, action = \"deny\" }]\n[[budgets]]\nname = \"b\"\nidentity = \"x\"\nperiod = \"day\"\namount_micros = 2\nthresholds = [{ percent = 100, action = \"deny\" }]\n",
            "budgets.scope",
        ),
        (
            "[cost_control]\nforecast_window_secs = 0\n",
            "cost_control.forecast_window_secs",
        ),
        (
            "[cost_control.extraction]\nratio = -1\n",
            "cost_control.extraction.ratio",
        ),
    ] {
        let e = with(text).expect_err(field).to_string();
        assert!(e.starts_with(&format!("{field}:")), "{field}: {e}");
    }
}
