//! Hot reload: the store swaps in good changes only, keeps the previous
//! set on a bad one and says where the problem is.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use portcullis_agent::policy::{Method, PolicySet, PolicyStore, Principal, Request, Resource};
use portcullis_testkit::TempDir;

fn request(service: &str) -> Request {
    Request {
        principal: Principal {
            subject: "alice".into(),
            tenant: Some("acme".into()),
            ..Principal::default()
        },
        action: "invoke",
        resource: Resource {
            service: service.into(),
            tenant: "acme".into(),
            ..Resource::default()
        },
        now: SystemTime::now(),
        source: "10.0.0.1".parse().unwrap(),
        method: Method::Knock,
        token_age: Duration::ZERO,
        spend_month: 0,
        forecast_month: 0,
        budget_action: "",
        budget_forecast_percent: 0,
    }
}

const ALLOW: &str = "@id(\"allow\") permit(principal, action, resource);\n";
const DENY_LLM: &str =
    "@id(\"no-llm\") forbid(principal, action, resource == Portcullis::Model::\"llm\");\n";

#[test]
fn reload_good_bad_good() {
    let dir = TempDir::new("polstore").unwrap();
    let file = dir.path().join("main.cedar");
    std::fs::write(&file, ALLOW).unwrap();
    let store = PolicyStore::open(dir.path()).unwrap();
    let first = store.current();
    assert!(first.decide(&request("llm")).allow);
    assert_eq!(store.reload_if_changed().unwrap().map(|s| s.len()), None);

    // Bad: a syntax error on line 2. The old set stays, the error says where.
    std::fs::write(
        &file,
        format!("{ALLOW}forbid(principal, action, resource) when {{ ) }};\n"),
    )
    .unwrap();
    let e = store.reload_if_changed().unwrap_err();
    let want = format!("{}:2:", file.display());
    assert!(e.to_string().starts_with(&want), "{e}");
    assert_eq!(store.current().version(), first.version());
    assert!(store.current().decide(&request("llm")).allow);
    assert_eq!(store.last_error(), Some(e));
    // The same bad content is reported once.
    assert!(store.reload_if_changed().unwrap().is_none());
    assert!(store.last_error().is_some());

    // Good again, and different: swapped, with a new version.
    std::fs::write(dir.path().join("deny.cedar"), DENY_LLM).unwrap();
    std::fs::write(&file, ALLOW).unwrap();
    let new = store.reload_if_changed().unwrap().expect("swapped");
    assert_ne!(new.version(), first.version());
    assert_eq!(store.current().version(), new.version());
    assert!(store.last_error().is_none());
    let d = store.current().decide(&request("llm"));
    assert!(!d.allow);
    assert_eq!(d.determining, ["no-llm"]);
    assert_eq!(d.version, new.version());
    assert!(store.current().decide(&request("embed")).allow);
    // A decision in flight keeps the set it started with.
    assert!(first.decide(&request("llm")).allow);
    assert!(store.reload_if_changed().unwrap().is_none());

    // Back to exactly the first content: the first version again.
    std::fs::remove_file(dir.path().join("deny.cedar")).unwrap();
    let back = store.reload_if_changed().unwrap().expect("swapped");
    assert_eq!(back.version(), first.version());
}

#[test]
fn reload_reports_an_emptied_or_vanished_directory() {
    let dir = TempDir::new("polstore").unwrap();
    let file = dir.path().join("main.cedar");
    std::fs::write(&file, ALLOW).unwrap();
    let store = PolicyStore::open(dir.path()).unwrap();
    let version = store.current().version().to_owned();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(store.reload_if_changed().unwrap_err().kind(), "empty");
    assert_eq!(store.current().version(), version);
    std::fs::write(&file, ALLOW).unwrap();
    // The same content as the set in force: nothing to swap, error cleared.
    assert!(store.reload_if_changed().unwrap().is_none());
    assert!(store.last_error().is_none());
}

#[test]
fn reload_refuses_unknown_services_once_they_are_known() {
    let dir = TempDir::new("polstore").unwrap();
    std::fs::write(dir.path().join("main.cedar"), ALLOW).unwrap();
    let store = PolicyStore::open(dir.path()).unwrap();
    store.set_services(&["embed"]).unwrap();
    std::fs::write(dir.path().join("deny.cedar"), DENY_LLM).unwrap();
    let e = store.reload_if_changed().unwrap_err();
    assert_eq!(e.kind(), "unknown_service");
    let want = format!("{}:1:", dir.path().join("deny.cedar").display());
    assert!(e.to_string().starts_with(&want), "{e}");
    assert_eq!(store.current().len(), 1);

    let bad = PolicyStore::fixed(PolicySet::from_dir(dir.path()).unwrap());
    assert_eq!(
        bad.set_services(&["embed"]).unwrap_err().kind(),
        "unknown_service"
    );
    assert!(bad.set_services(&["embed", "llm"]).is_ok());
}

#[test]
fn a_fixed_store_never_reloads() {
    let store = PolicyStore::fixed(PolicySet::default_set());
    let set: Arc<PolicySet> = store.current();
    assert!(store.reload_if_changed().unwrap().is_none());
    assert!(store.dir().is_none());
    assert_eq!(set.version(), store.current().version());
}
