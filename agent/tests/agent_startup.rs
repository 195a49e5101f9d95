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

/// A start that fails in the kernel (here: the interface does not exist)
/// ends the audit trail it began: STARTED, then STOPPING saying why.
#[test]
fn a_start_that_fails_in_the_kernel_is_on_record() {
    use portcullis_agent::{audit::spool::read_segment_file, netns::BpffsMount};
    use portcullis_proto::v1::{Event, event::Body, lifecycle::Phase};
    use prost::Message as _;

    let bpffs = BpffsMount::new().expect("bpffs");
    let dir = portcullis_agent::netns::TempDir::new("start-kernel").unwrap();
    let d = dir.path();
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nnode_key = \"{d}/node.key\"\n[audit]\nspool_dir = \"{d}/spool\"\n\
             [accounting]\nledger = \"{d}/ledger.json\"\n[kernel]\ninterfaces = [\"pcl-absent0\"]\n\
             pin_dir = \"{pins}\"\nbpffs = \"{fs}\"\n[[services]]\nname = \"llm\"\nport = 8000\n",
            d = d.display(),
            pins = bpffs.pin_dir().display(),
            fs = bpffs.path().display(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .output()
        .expect("run the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("pcl-absent0"), "{err}");

    let mut phases = Vec::new();
    for entry in std::fs::read_dir(d.join("spool")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "pcs") {
            for bytes in read_segment_file(&path).unwrap().frames {
                if let Some(Body::Lifecycle(l)) = Event::decode(bytes.as_slice()).unwrap().body {
                    phases.push((l.phase, l.reason));
                }
            }
        }
    }
    assert_eq!(phases.len(), 2, "{phases:?}");
    assert_eq!(phases[0].0, Phase::Started as i32);
    assert_eq!(phases[1].0, Phase::Stopping as i32);
    assert!(
        phases[1].1.starts_with("start failed") && phases[1].1.contains("pcl-absent0"),
        "{phases:?}"
    );
}
