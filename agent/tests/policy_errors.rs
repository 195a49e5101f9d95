//! Bad policy directories: every problem names its file and line.

use std::path::Path;

use portcullis_agent::policy::{self, PolicyError, PolicySet};
use portcullis_testkit::TempDir;

const PERMIT: &str = "@id(\"all\") permit(principal, action, resource);\n";

fn dir_with(files: &[(&str, &[u8])]) -> TempDir {
    let dir = TempDir::new("polerr").unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn load_err(dir: &TempDir) -> PolicyError {
    let e = PolicySet::from_dir(dir.path()).unwrap_err();
    assert!(policy::validate_cli(dir.path()).is_err());
    e
}

fn at(dir: &TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

#[test]
fn a_syntax_error_names_file_line_and_column() {
    let dir = dir_with(&[
        ("10-ok.cedar", PERMIT.as_bytes()),
        (
            "20-bad.cedar",
            b"// tenants\n@id(\"x\")\nforbid(principal, action, resource)\n  when { principal.tenant == };\n",
        ),
    ]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "syntax");
    let want = format!("{}:4:", at(&dir, "20-bad.cedar"));
    assert!(e.to_string().starts_with(&want), "{e}");
}

#[test]
fn a_schema_violation_names_file_and_line() {
    let dir = dir_with(&[(
        "a.cedar",
        b"@id(\"ok\") permit(principal, action, resource);\n\n@id(\"typed\")\npermit(principal, action, resource)\n  when { context.hour == \"noon\" };\n",
    )]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "invalid");
    let want = format!("{}:5:", at(&dir, "a.cedar"));
    assert!(e.to_string().starts_with(&want), "{e}");
}

#[test]
fn an_unknown_attribute_or_entity_type_names_file_and_line() {
    let dir = dir_with(&[(
        "a.cedar",
        b"permit(principal, action, resource)\n  when { resource.owner == \"acme\" };\npermit(principal in Portcullis::Team::\"ops\", action, resource);\n",
    )]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "invalid");
    let text = e.to_string();
    assert!(
        text.contains(&format!("{}:2:", at(&dir, "a.cedar"))),
        "{text}"
    );
    assert!(text.contains("owner"), "{text}");
    assert!(
        text.contains(&format!("{}:3:", at(&dir, "a.cedar"))),
        "{text}"
    );
    assert!(text.contains("Portcullis::Team"), "{text}");
}

#[test]
fn an_empty_directory_is_an_error() {
    let dir = dir_with(&[]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "empty");
    assert!(e.to_string().contains("no *.cedar files"), "{e}");

    let dir = dir_with(&[
        ("README.md", b"policies go here"),
        ("a.cedar", b"// later\n"),
    ]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "empty");
    assert!(e.to_string().contains("a.cedar"), "{e}");

    let missing = Path::new("/nonexistent/portcullis/policies");
    let e = PolicySet::from_dir(missing).unwrap_err();
    assert_eq!(e.kind(), "io");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/portcullis/policies:"),
        "{e}"
    );
}

#[test]
fn an_unknown_service_names_file_and_line() {
    let dir = dir_with(&[(
        "models.cedar",
        b"@id(\"llm\") permit(principal, action, resource == Portcullis::Model::\"llm\");\n@id(\"old\")\npermit(principal, action, resource)\n  when { resource in [Portcullis::Model::\"llm\", Portcullis::Model::\"llm-v1\"] };\n",
    )]);
    let set = PolicySet::from_dir(dir.path()).unwrap();
    assert!(set.check_services(&["llm", "llm-v1"]).is_ok());
    let e = set.check_services(&["llm", "embed"]).unwrap_err();
    assert_eq!(e.kind(), "unknown_service");
    let p = &e.problems()[0];
    assert_eq!(p.file, at(&dir, "models.cedar"));
    assert_eq!(p.line, 4);
    assert!(p.message.contains("\"llm-v1\""), "{e}");
    assert!(p.message.contains("embed, llm"), "{e}");
}

#[test]
fn unreadable_and_conflicting_files_are_errors() {
    let dir = dir_with(&[(
        "a.cedar",
        b"permit(principal, action, resource) when { \xff };",
    )]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "io");
    assert!(e.to_string().contains("not UTF-8"), "{e}");
    assert!(e.to_string().starts_with(&at(&dir, "a.cedar")), "{e}");

    let schema = policy::DEFAULT_SCHEMA.as_bytes();
    let dir = dir_with(&[
        ("a.cedar", PERMIT.as_bytes()),
        ("a.cedarschema", schema),
        ("b.cedarschema", schema),
    ]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "schema");
    assert!(e.to_string().starts_with(&at(&dir, "b.cedarschema")), "{e}");
}

#[test]
fn a_schema_file_in_the_directory_is_used_and_checked() {
    let dir = dir_with(&[
        ("a.cedar", PERMIT.as_bytes()),
        ("portcullis.cedarschema", b"namespace Portcullis {\n  entity Role;\n  entity Identity in [Role] { tenant: String };\n  entity Model;\n  action invoke appliesTo { principal: Identity, resource: Model };\n}\n"),
    ]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "schema");
    assert!(e.to_string().contains("portcullis.cedarschema"), "{e}");

    let dir = dir_with(&[
        ("a.cedar", PERMIT.as_bytes()),
        (
            "portcullis.cedarschema",
            b"namespace Portcullis {\n  entity Role\n}\n",
        ),
    ]);
    let e = load_err(&dir);
    assert_eq!(e.kind(), "schema");
    let want = format!("{}:3:", at(&dir, "portcullis.cedarschema"));
    assert!(e.to_string().starts_with(&want), "{e}");
}

#[test]
fn an_evaluation_error_denies_with_its_location() {
    let dir = dir_with(&[(
        "money.cedar",
        b"@id(\"all\") permit(principal, action, resource);\n@id(\"double\")\nforbid(principal, action, resource)\n  when { context.forecast_month * 2 < 0 };\n",
    )]);
    let set = PolicySet::from_dir(dir.path()).unwrap();
    let req = portcullis_agent::policy::Request {
        principal: Default::default(),
        action: "invoke",
        resource: Default::default(),
        now: std::time::SystemTime::now(),
        source: "10.0.0.1".parse().unwrap(),
        method: portcullis_agent::policy::Method::Knock,
        token_age: std::time::Duration::ZERO,
        spend_month: 0,
        forecast_month: u64::MAX,
        budget_action: "",
        budget_forecast_percent: 0,
    };
    let d = set.decide(&req);
    assert!(!d.allow);
    assert_eq!(d.determining, ["double"]);
    let want = format!("{}:4:", at(&dir, "money.cedar"));
    assert!(d.errors[0].starts_with(&want), "{:?}", d.errors);
    assert!(d.errors[0].contains("overflow"), "{:?}", d.errors);
    assert!(
        set.decide(&portcullis_agent::policy::Request {
            forecast_month: 1,
            budget_action: "",
            budget_forecast_percent: 0,
            ..req
        })
        .allow
    );
}
