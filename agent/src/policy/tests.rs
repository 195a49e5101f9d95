//! Unit tests of the policy engine (the examples and the directory store
//! have integration tests in `agent/tests/policy_*.rs`).

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::*;

/// Tuesday 2026-11-24 10:00:00 UTC.
fn tuesday_10() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_514_400)
}

fn request(action: &'static str, service: &str) -> Request {
    Request {
        principal: Principal {
            subject: "alice".into(),
            tenant: Some("acme".into()),
            roles: vec!["app".into()],
            scopes: vec![format!("model:{service}:{action}")],
            issuer: "https://idp.example".into(),
        },
        action,
        resource: Resource {
            service: service.into(),
            tenant: "acme".into(),
            version: "3".into(),
            sensitivity: "internal".into(),
            cost_tier: "premium".into(),
        },
        now: tuesday_10(),
        source: IpAddr::from([10, 1, 2, 3]),
        method: Method::Knock,
        token_age: Duration::from_secs(30),
        spend_month: 0,
        forecast_month: 0,
        budget_action: "",
        budget_forecast_percent: 0,
    }
}

fn set(files: &[(&str, &str)]) -> Result<PolicySet, PolicyError> {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    PolicySet::from_sources(&files, None)
}

fn one(text: &str) -> PolicySet {
    set(&[("p.cedar", text)]).unwrap_or_else(|e| panic!("{e}"))
}

const PERMIT_ALL: &str = "permit(principal, action, resource);";

#[test]
fn default_set_permits_and_names_itself() {
    let s = PolicySet::default_set();
    assert_eq!(s.len(), 1);
    assert_eq!(s.version().len(), 16);
    assert!(s.version().bytes().all(|b| b.is_ascii_hexdigit()));
    let d = s.decide(&request("invoke", "llm"));
    assert!(d.allow, "{d:?}");
    assert_eq!(d.determining, ["scopes-only"]);
    assert!(d.errors.is_empty());
    assert_eq!(d.ttl, None);
    assert_eq!(d.version, s.version());
    for a in ACTIONS {
        assert!(s.decide(&request(a, "llm")).allow, "{a}");
    }
}

#[test]
fn the_shipped_schema_is_the_default() {
    let shipped = include_str!("../../../examples/policy/portcullis.cedarschema");
    assert_eq!(shipped, DEFAULT_SCHEMA);
}

#[test]
fn policy_sets_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PolicySet>();
    check::<PolicyStore>();
}

#[test]
fn default_deny_names_nothing() {
    let s = one(
        r#"@id("only-read") permit(principal, action == Portcullis::Action::"read", resource);"#,
    );
    let d = s.decide(&request("invoke", "llm"));
    assert!(!d.allow);
    assert!(d.determining.is_empty());
    assert!(d.errors.is_empty());
    assert!(s.decide(&request("read", "llm")).allow);
}

#[test]
fn ids_come_from_annotations_or_file_and_index() {
    let s = set(&[
        (
            "b.cedar",
            "permit(principal, action, resource);\n@id(\"named\") permit(principal, action, resource);\npermit(principal, action, resource);",
        ),
        ("a.cedar", PERMIT_ALL),
    ])
    .unwrap();
    assert_eq!(
        s.ids().collect::<Vec<_>>(),
        ["a.cedar:0", "b.cedar:0", "named", "b.cedar:2"]
    );
    assert_eq!(s.location("b.cedar:2").unwrap(), "b.cedar:3:1");
    assert_eq!(s.location("named").unwrap(), "b.cedar:2:1");
    let d = s.decide(&request("invoke", "llm"));
    assert_eq!(
        d.determining,
        ["a.cedar:0", "b.cedar:0", "named", "b.cedar:2"]
    );
}

#[test]
fn forbid_overrides_permit() {
    let s = one(r#"
        @id("all") permit(principal, action, resource);
        @id("no-globex") forbid(principal, action, resource) when { resource.tenant == "globex" };
        "#);
    let mut r = request("invoke", "llm");
    assert_eq!(s.decide(&r).determining, ["all"]);
    r.resource.tenant = "globex".into();
    let d = s.decide(&r);
    assert!(!d.allow);
    assert_eq!(d.determining, ["no-globex"]);
    assert_eq!(d.ttl, None);
}

#[test]
fn ttl_is_the_minimum_of_the_determining_permits() {
    let s = one(r#"
        @id("long") @ttl("3600") permit(principal, action, resource);
        @id("short") @ttl("300") permit(principal, action == Portcullis::Action::"invoke", resource);
        @id("none") permit(principal, action == Portcullis::Action::"read", resource);
        @id("unused") @ttl("5") permit(principal, action, resource) when { context.hour == 3 };
        "#);
    let d = s.decide(&request("invoke", "llm"));
    assert_eq!(d.determining, ["long", "short"]);
    assert_eq!(d.ttl, Some(Duration::from_secs(300)));
    let d = s.decide(&request("read", "llm"));
    assert_eq!(d.determining, ["long", "none"]);
    assert_eq!(d.ttl, Some(Duration::from_secs(3600)));
    let d = s.decide(&request("retrain", "llm"));
    assert_eq!(d.ttl, Some(Duration::from_secs(3600)));
}

#[test]
fn bad_ttl_and_duplicate_ids_are_located() {
    let e = set(&[(
        "t.cedar",
        "@ttl(\"5m\") permit(principal, action, resource);\n\n  @ttl(\"60\") forbid(principal, action, resource) when { context.hour == 1 };",
    )])
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, PolicyError::Invalid(_)), "{e:?}");
    assert!(text.contains("t.cedar:1:1: @ttl(\"5m\")"), "{text}");
    assert!(
        text.contains("t.cedar:3:3: @ttl only applies to permit"),
        "{text}"
    );

    let e = set(&[
        ("a.cedar", "@id(\"x\") permit(principal, action, resource);"),
        (
            "b.cedar",
            "permit(principal, action, resource);\n@id(\"x\") permit(principal, action, resource);",
        ),
    ])
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "b.cedar:2:1: policy id `x` is already used at a.cedar:1:1"
    );
}

#[test]
fn syntax_errors_name_file_line_and_column() {
    let e = set(&[
        ("good.cedar", PERMIT_ALL),
        (
            "bad.cedar",
            "// a comment\npermit(principal, action, resource)\nwhen { context.hour >= };\n",
        ),
    ])
    .unwrap_err();
    assert_eq!(e.kind(), "syntax");
    let p = &e.problems()[0];
    assert_eq!((p.file.as_str(), p.line), ("bad.cedar", 3), "{e}");
    assert!(p.column > 1, "{e}");
    assert!(e.to_string().starts_with("bad.cedar:3:"), "{e}");
}

#[test]
fn templates_are_refused() {
    let e = set(&[(
        "t.cedar",
        "\npermit(principal == ?principal, action, resource);",
    )])
    .unwrap_err();
    assert_eq!(e.kind(), "syntax");
    assert!(e.to_string().starts_with("t.cedar:2:1: templates"), "{e}");
}

#[test]
fn schema_violations_are_located() {
    // Unknown attribute.
    let e = set(&[(
        "a.cedar",
        "permit(principal, action, resource)\n  when { principal.department == \"x\" };",
    )])
    .unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    let p = &e.problems()[0];
    assert_eq!((p.file.as_str(), p.line), ("a.cedar", 2), "{e}");
    assert!(p.message.contains("department"), "{e}");

    // Unknown entity type.
    let e = set(&[(
        "b.cedar",
        "permit(principal in Portcullis::Group::\"ops\", action, resource);",
    )])
    .unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    assert!(e.to_string().starts_with("b.cedar:1:"), "{e}");
    assert!(e.to_string().contains("Group"), "{e}");

    // Unknown action.
    let e = set(&[(
        "c.cedar",
        "permit(principal, action == Portcullis::Action::\"delete\", resource);",
    )])
    .unwrap_err();
    assert!(e.to_string().contains("delete"), "{e}");

    // Type error.
    let e = set(&[(
        "d.cedar",
        "permit(principal, action, resource) when { context.hour == \"ten\" };",
    )])
    .unwrap_err();
    assert_eq!(e.kind(), "invalid", "{e}");
    assert!(e.to_string().starts_with("d.cedar:1:"), "{e}");
}

#[test]
fn empty_inputs_are_errors() {
    let e = PolicySet::from_sources(&[], None).unwrap_err();
    assert_eq!(e.kind(), "empty");
    let e = set(&[("only-comments.cedar", "// nothing here\n")]).unwrap_err();
    assert_eq!(e.kind(), "empty");
    assert!(e.to_string().contains("only-comments.cedar"), "{e}");
}

#[test]
fn unknown_services_are_located() {
    let s = one(
        "permit(principal, action, resource == Portcullis::Model::\"llm\");\n\
         permit(principal, action, resource)\n  when { resource == Portcullis::Model::\"typo\" };",
    );
    assert!(s.check_services(&["llm", "typo", "embed"]).is_ok());
    let e = s.check_services(&["llm", "embed"]).unwrap_err();
    assert_eq!(e.kind(), "unknown_service");
    assert_eq!(e.problems().len(), 1, "{e}");
    let p = &e.problems()[0];
    assert_eq!((p.line, p.column), (3, 41), "{e}");
    assert!(p.message.contains("\"typo\""), "{e}");
}

#[test]
fn an_evaluation_error_denies_and_is_reported() {
    let s = one("@id(\"all\") permit(principal, action, resource);\n\
         @id(\"overflow\")\npermit(principal, action, resource)\n  when { context.spend_month + 9223372036854775807 > 0 };");
    let ok = s.decide(&request("invoke", "llm"));
    assert!(ok.allow, "{ok:?}");
    let mut r = request("invoke", "llm");
    r.spend_month = 1;
    let d = s.decide(&r);
    assert!(!d.allow);
    assert_eq!(d.determining, ["overflow"]);
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].starts_with("p.cedar:4:"), "{:?}", d.errors);
    assert!(d.errors[0].contains("overflow"), "{:?}", d.errors);
}

#[test]
fn context_carries_time_source_and_money() {
    let s = one(r#"
        @id("weekday") permit(principal, action == Portcullis::Action::"invoke", resource)
          when { context.weekday == 2 && context.hour == 10 && context.method == "knock" };
        @id("cidr") permit(principal, action == Portcullis::Action::"read", resource)
          when { context.source.isInRange(ip("10.0.0.0/8")) };
        @id("money") permit(principal, action == Portcullis::Action::"retrain", resource)
          when { context.spend_month == 5 && context.forecast_month == 9223372036854775807
                 && context.token_age == 30 };
        "#);
    assert!(s.decide(&request("invoke", "llm")).allow);
    let mut r = request("invoke", "llm");
    r.method = Method::AdmitRpc;
    assert!(!s.decide(&r).allow);
    r.method = Method::Knock;
    r.now += Duration::from_secs(86_400);
    assert!(!s.decide(&r).allow);

    let mut r = request("read", "llm");
    assert!(s.decide(&r).allow);
    r.source = "::ffff:10.9.9.9".parse().unwrap();
    assert!(s.decide(&r).allow, "IPv4-mapped IPv6 is IPv4");
    r.source = "192.0.2.1".parse().unwrap();
    assert!(!s.decide(&r).allow);
    r.source = "2001:db8::1".parse().unwrap();
    assert!(!s.decide(&r).allow);

    let mut r = request("retrain", "llm");
    r.spend_month = 5;
    r.forecast_month = u64::MAX;
    assert!(s.decide(&r).allow, "saturates at i64::MAX");
}

#[test]
fn principal_and_resource_attributes() {
    let s = one(r#"
        @id("p") permit(principal in Portcullis::Role::"ops", action, resource == Portcullis::Model::"llm")
          when { principal.tenant == "" && principal.issuer == "https://idp.example"
                 && principal.scopes.contains("model:llm:invoke") && principal.subject like "ali*"
                 && resource.version == "3" && resource.sensitivity == "internal"
                 && resource.cost_tier == "premium" };
        "#);
    let mut r = request("invoke", "llm");
    r.principal.tenant = None;
    r.principal.roles = vec!["dev".into(), "ops".into()];
    assert!(s.decide(&r).allow);
    r.principal.roles = vec!["dev".into()];
    assert!(!s.decide(&r).allow);
    r.principal.roles = vec!["ops".into()];
    r.resource.service = "other".into();
    r.principal.scopes = vec!["model:other:invoke".into()];
    assert!(!s.decide(&r).allow);
}

#[test]
fn scope_slices_keep_the_semantics() {
    // Policies scoped to resources and actions, and unscoped ones: the
    // decision for each (service, action) must match evaluating all.
    let s = one(r#"
        @id("a-invoke") permit(principal, action == Portcullis::Action::"invoke", resource == Portcullis::Model::"a");
        @id("b-any") permit(principal, action, resource in Portcullis::Model::"b");
        @id("read-or-retrain") permit(principal, action in [Portcullis::Action::"read", Portcullis::Action::"retrain"], resource is Portcullis::Model);
        @id("no-c-export") forbid(principal, action == Portcullis::Action::"export_weights", resource) when { resource.tenant == "acme" };
        "#);
    let expect = |action: &'static str, service: &str, ids: &[&str]| {
        for _ in 0..2 {
            let d = s.decide(&request(action, service));
            assert_eq!(d.determining, ids, "{action} {service}");
        }
    };
    expect("invoke", "a", &["a-invoke"]);
    expect("invoke", "b", &["b-any"]);
    expect("invoke", "c", &[]);
    expect("read", "a", &["read-or-retrain"]);
    expect("retrain", "b", &["b-any", "read-or-retrain"]);
    expect("export_weights", "b", &["no-c-export"]);
    expect("export_weights", "a", &["no-c-export"]);
}

#[test]
fn unknown_action_denies_with_an_error() {
    let s = PolicySet::default_set();
    let d = s.decide(&request("fly", "llm"));
    assert!(!d.allow);
    assert!(d.errors[0].contains("unknown action"), "{d:?}");
}

#[test]
fn versions_hash_names_and_contents() {
    let a = set(&[("a.cedar", PERMIT_ALL), ("b.cedar", PERMIT_ALL)]).unwrap();
    let b = set(&[("b.cedar", PERMIT_ALL), ("a.cedar", PERMIT_ALL)]).unwrap();
    assert_eq!(a.version(), b.version());
    let c = set(&[("a.cedar", PERMIT_ALL), ("c.cedar", PERMIT_ALL)]).unwrap();
    assert_ne!(a.version(), c.version());
    let d = set(&[
        ("a.cedar", PERMIT_ALL),
        ("b.cedar", "permit(principal,action,resource);"),
    ])
    .unwrap();
    assert_ne!(a.version(), d.version());
    let custom = PolicySet::from_sources(
        &[
            ("a.cedar".into(), PERMIT_ALL.into()),
            ("b.cedar".into(), PERMIT_ALL.into()),
        ],
        Some(&format!("{DEFAULT_SCHEMA}\n")),
    )
    .unwrap();
    assert_ne!(a.version(), custom.version());
}

#[test]
fn schema_errors_are_located() {
    let bad = "namespace Portcullis {\n  entity Role;\n  entity Identity in [Role] {\n    tenant: Strin,\n  };\n}\n";
    let e =
        PolicySet::from_sources(&[("a.cedar".into(), PERMIT_ALL.into())], Some(bad)).unwrap_err();
    assert_eq!(e.kind(), "schema", "{e}");
    assert!(e.to_string().contains("schema.cedarschema:"), "{e}");

    let syntax = "namespace Portcullis {\n  entity Role\n  entity Identity;\n}\n";
    let e = PolicySet::from_sources(&[("a.cedar".into(), PERMIT_ALL.into())], Some(syntax))
        .unwrap_err();
    assert_eq!(e.kind(), "schema", "{e}");
    assert!(e.to_string().starts_with("schema.cedarschema:3:"), "{e}");
}

#[test]
fn a_schema_that_does_not_match_what_portcullis_provides_is_refused() {
    // Valid Cedar, but Identity lacks `issuer` (and has an extra attribute).
    let schema = DEFAULT_SCHEMA.replace("issuer: String,", "department: String,");
    let e = PolicySet::from_sources(&[("a.cedar".into(), PERMIT_ALL.into())], Some(&schema))
        .unwrap_err();
    assert_eq!(e.kind(), "schema", "{e}");
    assert!(e.to_string().contains("does not describe"), "{e}");

    let schema = DEFAULT_SCHEMA.replace("retrain, ", "");
    let e = PolicySet::from_sources(&[("a.cedar".into(), PERMIT_ALL.into())], Some(&schema))
        .unwrap_err();
    assert!(e.to_string().contains("retrain"), "{e}");
}

#[test]
fn action_groups_in_a_custom_schema_work() {
    let schema = DEFAULT_SCHEMA
        .replace(
            "action invoke, read, retrain, export_weights appliesTo",
            "action mutate;\n  action invoke, read appliesTo {\n    principal: [Identity],\n    resource: [Model],\n    context: RequestContext,\n  };\n  action retrain, export_weights in [mutate] appliesTo",
        );
    let s = PolicySet::from_sources(
        &[(
            "g.cedar".into(),
            "@id(\"mut\") permit(principal, action in Portcullis::Action::\"mutate\", resource);"
                .into(),
        )],
        Some(&schema),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(s.decide(&request("retrain", "llm")).allow);
    assert!(s.decide(&request("export_weights", "llm")).allow);
    assert!(!s.decide(&request("invoke", "llm")).allow);
}

#[test]
fn problems_display_without_a_line() {
    let p = Problem {
        file: "x.cedar".into(),
        line: 0,
        column: 0,
        message: "m".into(),
    };
    assert_eq!(p.to_string(), "x.cedar: m");
}

#[test]
fn decisions_are_memoized_on_the_inputs_policies_can_see() {
    // No policy mentions token_age or hour: requests differing only in
    // those share one memo entry.
    let s = one(
        r#"@id("cidr") permit(principal, action, resource) when { context.source.isInRange(ip("10.0.0.0/8")) };"#,
    );
    let mut r = request("invoke", "llm");
    assert!(s.decide(&r).allow);
    r.token_age = Duration::from_secs(31);
    r.now += Duration::from_secs(7200);
    assert!(s.decide(&r).allow);
    assert_eq!(s.decisions.len(), 1);
    r.source = "192.0.2.1".parse().unwrap();
    assert!(!s.decide(&r).allow);
    assert_eq!(s.decisions.len(), 2);
    r.principal.roles.push("x".into());
    assert!(!s.decide(&r).allow);
    assert_eq!(s.decisions.len(), 3);

    // A policy that mentions token_age makes it part of the key.
    let s =
        one(r#"@id("fresh") permit(principal, action, resource) when { context.token_age < 60 };"#);
    let mut r = request("invoke", "llm");
    assert!(s.decide(&r).allow);
    r.token_age = Duration::from_secs(61);
    assert!(!s.decide(&r).allow);
    r.token_age = Duration::from_secs(59);
    assert!(s.decide(&r).allow);
    assert_eq!(s.decisions.len(), 3);
}

#[test]
fn context_use_is_found_in_every_form() {
    let uses = |text: &str| {
        let s = one(text);
        s.policies[0].context_use
    };
    assert_eq!(uses(PERMIT_ALL), 0);
    assert_eq!(
        uses("permit(principal, action, resource) when { context.hour > 1 };"),
        1
    );
    assert_eq!(
        uses("permit(principal, action, resource) when { context has token_age };"),
        1 << 4
    );
    assert_eq!(
        uses("permit(principal, action, resource) when { context[\"forecast_month\"] > 1 };"),
        1 << 6
    );
    assert_eq!(
        uses("permit(principal, action, resource) when { context[\"spend\\u{5f}month\"] > 1 };"),
        1 << 5
    );
}
