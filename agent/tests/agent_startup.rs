//! A bad policy set stops the agent at start-up with a clear error, before
//! it loads or changes anything in the kernel: it never runs open. The
//! config names an interface that does not exist, so an agent that reached
//! the kernel would fail with a different error (and nothing real is ever
//! attached).

use std::process::Command;

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_with_policy(tag: &str, files: &[(&str, &str)]) -> (bool, String) {
    let dir = TempDir(std::env::temp_dir().join(format!("pcl-start-{tag}-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let issuer = portcullis_agent::devtoken::keygen(&dir.0.join("issuer")).expect("keygen");
    let policy = dir.0.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    for (name, text) in files {
        std::fs::write(policy.join(name), text).unwrap();
    }
    let cfg = dir.0.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
node_key = "{d}/node.key"
[audit]
spool_dir = "{d}/spool"
[accounting]
ledger = "{d}/ledger.json"
[kernel]
interfaces = ["pcl-absent0"]
pin_dir = "{d}/bpf/portcullis"
bpffs = "{d}/bpf"
[tokens]
jwks_file = "{jwks}"
issuer = "https://dev"
audience = "pc"
[policy]
dir = "{policy}"
[[services]]
name = "llm"
port = 8000
"#,
            d = dir.0.display(),
            jwks = issuer.jwks_path.display(),
            policy = policy.display(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .output()
        .expect("run the agent");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !dir.0.join("bpf").exists(),
        "the kernel side was touched (bpffs dir created):\n{text}"
    );
    (out.status.success(), text)
}

#[test]
fn a_syntax_error_stops_the_agent_naming_file_and_line() {
    let (ok, err) = start_with_policy("syntax", &[("bad.cedar", "permit(principal,\n")]);
    assert!(!ok, "{err}");
    assert!(err.contains("bad.cedar:"), "{err}");
    assert!(
        !err.contains("pcl-absent0"),
        "stopped before the kernel: {err}"
    );
}

#[test]
fn an_empty_policy_directory_stops_the_agent() {
    let (ok, err) = start_with_policy("empty", &[]);
    assert!(!ok, "{err}");
    assert!(err.contains("policy.dir"), "{err}");
}

#[test]
fn a_policy_naming_an_unknown_service_stops_the_agent() {
    let (ok, err) = start_with_policy(
        "unknown",
        &[(
            "x.cedar",
            "permit(principal, action, resource == Portcullis::Model::\"nosuch\");\n",
        )],
    );
    assert!(!ok, "{err}");
    assert!(err.contains("nosuch"), "{err}");
}
