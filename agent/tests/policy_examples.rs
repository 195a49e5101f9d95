//! The example policies in `examples/policy/`: they load against the
//! shipped schema, `policy test` passes on their requests file, each
//! intent is decided both ways, and a wrong expectation fails the test run.

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use portcullis_agent::policy::{self, Method, PolicySet, Principal, Request, Resource};
use portcullis_testkit::TempDir;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policy")
}

/// 2026-11-24 (a Tuesday) at `hour`:00 UTC.
fn tuesday(hour: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_478_400 + hour * 3600)
}

struct Ask {
    roles: &'static [&'static str],
    tenant: Option<&'static str>,
    action: &'static str,
    owner: &'static str,
    sensitivity: &'static str,
    now: SystemTime,
    source: &'static str,
    method: Method,
    forecast: u64,
}

impl Default for Ask {
    fn default() -> Self {
        Ask {
            roles: &["app"],
            tenant: Some("acme"),
            action: "invoke",
            owner: "acme",
            sensitivity: "internal",
            now: tuesday(10),
            source: "10.1.2.3",
            method: Method::Knock,
            forecast: 0,
        }
    }
}

fn decide(set: &PolicySet, a: Ask) -> (bool, Vec<String>) {
    let req = Request {
        principal: Principal {
            subject: "someone".into(),
            tenant: a.tenant.map(str::to_owned),
            roles: a.roles.iter().map(|r| r.to_string()).collect(),
            scopes: vec![format!("model:*:{}", a.action)],
            issuer: "https://idp.example".into(),
        },
        action: a.action,
        resource: Resource {
            service: "model".into(),
            tenant: a.owner.into(),
            version: "1".into(),
            sensitivity: a.sensitivity.into(),
            cost_tier: "standard".into(),
        },
        now: a.now,
        source: a.source.parse::<IpAddr>().unwrap(),
        method: a.method,
        token_age: Duration::from_secs(10),
        spend_month: 0,
        forecast_month: a.forecast,
        budget_action: "",
        budget_forecast_percent: 0,
    };
    let d = set.decide(&req);
    assert!(d.errors.is_empty(), "{:?}", d.errors);
    assert_eq!(d.version, set.version());
    (d.allow, d.determining)
}

fn set() -> PolicySet {
    PolicySet::from_dir(&examples()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_examples_load_cleanly() {
    let s = set();
    assert_eq!(s.len(), 7);
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());
    assert!(s.schema_origin().ends_with("portcullis.cedarschema"));
    assert!(s.check_services(&["anything"]).is_ok());
    assert!(policy::validate_cli(&examples()).is_ok());
}

#[test]
fn the_requests_file_passes() {
    policy::test_cli(&examples(), &examples().join("requests.toml"), false).unwrap();
}

#[test]
fn a_wrong_expectation_fails_the_run() {
    let text = std::fs::read_to_string(examples().join("requests.toml")).unwrap();
    let dir = TempDir::new("poltest").unwrap();
    let flipped = text.replacen("expect = \"allow\"", "expect = \"deny\"", 1);
    assert_ne!(flipped, text);
    let path = dir.path().join("flipped.toml");
    std::fs::write(&path, flipped).unwrap();
    let e = policy::test_cli(&examples(), &path, false).unwrap_err();
    assert!(e.to_string().contains("1 of"), "{e}");

    let wrong_ids = text.replacen(
        "expect_policies = [\"tenant-isolation\"]",
        "expect_policies = [\"spend-ceiling\"]",
        1,
    );
    assert_ne!(wrong_ids, text);
    std::fs::write(&path, wrong_ids).unwrap();
    assert!(policy::test_cli(&examples(), &path, false).is_err());

    std::fs::write(&path, "[[case]]\nname = \"x\"\n").unwrap();
    assert!(
        policy::test_cli(&examples(), &path, false).is_err(),
        "missing fields"
    );
    std::fs::write(&path, "").unwrap();
    assert!(
        policy::test_cli(&examples(), &path, false).is_err(),
        "no cases"
    );
}

/// `policy test --json`: one document with every case's decision and the
/// determining policies; a failing case is marked and the exit status is 1.
#[test]
fn the_json_report_names_each_decision_and_failure() {
    let run = |requests: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["policy", "test"])
            .arg(examples())
            .arg("--requests")
            .arg(requests)
            .arg("--json")
            .output()
            .unwrap()
    };
    let out = run(&examples().join("requests.toml"));
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() > 5);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["passed"].as_u64().unwrap() as usize, cases.len());
    assert!(cases.iter().all(|c| c["passed"] == true));
    let isolated = cases
        .iter()
        .find(|c| {
            c["policies"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "tenant-isolation")
        })
        .expect("a case decided by tenant-isolation");
    assert_eq!(isolated["decision"], "deny");

    let text = std::fs::read_to_string(examples().join("requests.toml")).unwrap();
    let dir = TempDir::new("poltestjson").unwrap();
    let path = dir.path().join("flipped.toml");
    std::fs::write(
        &path,
        text.replacen("expect = \"allow\"", "expect = \"deny\"", 1),
    )
    .unwrap();
    let out = run(&path);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failed"], 1);
    let bad: Vec<_> = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["decision"], "allow");
    assert_eq!(bad[0]["problems"][0], "expected deny");
}

#[test]
fn tenant_isolation_both_ways() {
    let s = set();
    assert_eq!(
        decide(&s, Ask::default()),
        (true, vec!["app-invoke-business-hours".into()])
    );
    let other = decide(
        &s,
        Ask {
            owner: "globex",
            ..Ask::default()
        },
    );
    assert_eq!(other, (false, vec!["tenant-isolation".into()]));
    assert!(
        decide(
            &s,
            Ask {
                owner: "",
                ..Ask::default()
            }
        )
        .0,
        "shared model"
    );
    assert!(
        !decide(
            &s,
            Ask {
                tenant: None,
                ..Ask::default()
            }
        )
        .0
    );
    assert!(
        decide(
            &s,
            Ask {
                tenant: None,
                owner: "",
                ..Ask::default()
            }
        )
        .0
    );
}

#[test]
fn read_only_analysts_both_ways() {
    let s = set();
    let read = |roles, action| {
        decide(
            &s,
            Ask {
                roles,
                action,
                ..Ask::default()
            },
        )
    };
    assert_eq!(
        read(&["analyst"], "read"),
        (true, vec!["analysts-read".into()])
    );
    for action in ["invoke", "retrain", "export_weights"] {
        assert!(!read(&["analyst"], action).0, "{action}");
    }
    assert!(!read(&["app"], "read").0);
}

#[test]
fn business_hours_inference_both_ways() {
    let s = set();
    let at = |now| {
        decide(
            &s,
            Ask {
                now,
                ..Ask::default()
            },
        )
        .0
    };
    assert!(at(tuesday(8)));
    assert!(at(tuesday(17)));
    assert!(!at(tuesday(7)));
    assert!(!at(tuesday(18)));
    let saturday = tuesday(10) + Duration::from_secs(4 * 86_400);
    assert!(!at(saturday));
    assert!(at(saturday - Duration::from_secs(86_400)), "Friday");
    assert!(
        !decide(
            &s,
            Ask {
                roles: &["dev"],
                ..Ask::default()
            }
        )
        .0
    );
}

#[test]
fn retraining_from_the_training_network_both_ways() {
    let s = set();
    let retrain = |roles, source| {
        decide(
            &s,
            Ask {
                roles,
                action: "retrain",
                source,
                ..Ask::default()
            },
        )
    };
    assert_eq!(
        retrain(&["retrainer"], "10.20.200.1"),
        (true, vec!["retrainers-retrain".into()])
    );
    assert_eq!(
        retrain(&["retrainer"], "10.21.0.1"),
        (false, vec!["retrain-from-training-network-only".into()])
    );
    assert!(!retrain(&["retrainer"], "::ffff:192.0.2.1").0);
    assert!(retrain(&["retrainer"], "::ffff:10.20.0.1").0, "IPv4-mapped");
    assert_eq!(retrain(&["app"], "10.20.0.1"), (false, vec![]));
}

#[test]
fn spend_ceiling_both_ways() {
    let s = set();
    let spend = |forecast| {
        decide(
            &s,
            Ask {
                forecast,
                ..Ask::default()
            },
        )
    };
    assert!(spend(100_000_000).0);
    assert_eq!(spend(100_000_001), (false, vec!["spend-ceiling".into()]));
    assert_eq!(spend(u64::MAX), (false, vec!["spend-ceiling".into()]));
    // Reads are not metered.
    let read = decide(
        &s,
        Ask {
            roles: &["analyst"],
            action: "read",
            forecast: u64::MAX,
            ..Ask::default()
        },
    );
    assert!(read.0);
}

#[test]
fn weight_export_both_ways() {
    let s = set();
    let export = |method, sensitivity| {
        decide(
            &s,
            Ask {
                roles: &["model-owner"],
                action: "export_weights",
                method,
                sensitivity,
                ..Ask::default()
            },
        )
        .0
    };
    assert!(export(Method::AdmitRpc, "internal"));
    assert!(!export(Method::Knock, "internal"));
    assert!(!export(Method::AdmitRpc, "restricted"));
}

#[test]
fn ttls_come_from_the_annotations() {
    let s = set();
    let req = |roles: &[&str], action: &'static str, source: &str| Request {
        principal: Principal {
            subject: "x".into(),
            tenant: Some("acme".into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            scopes: vec![],
            issuer: String::new(),
        },
        action,
        resource: Resource {
            service: "m".into(),
            tenant: "acme".into(),
            ..Resource::default()
        },
        now: tuesday(10),
        source: source.parse().unwrap(),
        method: Method::Knock,
        token_age: Duration::ZERO,
        spend_month: 0,
        forecast_month: 0,
        budget_action: "",
        budget_forecast_percent: 0,
    };
    let ttl = |r: Request| s.decide(&r).ttl.map(|t| t.as_secs());
    assert_eq!(ttl(req(&["app"], "invoke", "10.0.0.1")), Some(3600));
    assert_eq!(ttl(req(&["analyst"], "read", "10.0.0.1")), Some(900));
    assert_eq!(ttl(req(&["retrainer"], "retrain", "10.20.0.1")), Some(1800));
    assert_eq!(ttl(req(&["app"], "retrain", "10.20.0.1")), None, "denied");
}
