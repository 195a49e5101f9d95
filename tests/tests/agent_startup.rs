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
    let issuer = portcullis_e2e::devtoken::keygen(&dir.0.join("issuer")).expect("keygen");
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
    let out = Command::new(portcullis_e2e::e2e::agent_binary())
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

fn kernel_failure_config(
    d: &std::path::Path,
    bpffs: &portcullis_testkit::BpffsMount,
) -> std::path::PathBuf {
    let cfg = d.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nnode_key = \"{d}/state/node.key\"\n[audit]\nspool_dir = \"{d}/state/spool\"\n\
             [accounting]\nledger = \"{d}/ledger/ledger.json\"\n[kernel]\ninterfaces = [\"pcl-absent0\"]\n\
             pin_dir = \"{pins}\"\nbpffs = \"{fs}\"\n[[services]]\nname = \"llm\"\nport = 8000\n",
            d = d.display(),
            pins = bpffs.pin_dir().display(),
            fs = bpffs.path().display(),
        ),
    )
    .unwrap();
    cfg
}

fn run_agent(cfg: &std::path::Path) -> (bool, String) {
    let out = Command::new(portcullis_e2e::e2e::agent_binary())
        .args(["agent", "--config"])
        .arg(cfg)
        .output()
        .expect("run the agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lifecycle_phases(spool: &std::path::Path) -> Vec<(i32, String)> {
    use portcullis_proto::v1::{Event, event::Body};
    use portcullis_trail::frame::read_segment_file;
    use prost::Message as _;
    let mut paths: Vec<_> = std::fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pcs"))
        .collect();
    paths.sort();
    let mut phases = Vec::new();
    for path in paths {
        for bytes in read_segment_file(&path).unwrap().frames {
            if let Some(Body::Lifecycle(l)) = Event::decode(bytes.as_slice()).unwrap().body {
                phases.push((l.phase, l.reason));
            }
        }
    }
    phases
}

/// A start that fails in the kernel (here: the interface does not exist)
/// on a new node leaves nothing behind: no node key, no spool, no ledger,
/// not even their directories.
#[test]
fn a_failed_first_start_leaves_no_files() {
    let bpffs = portcullis_testkit::BpffsMount::new().expect("bpffs");
    let dir = portcullis_testkit::TempDir::new("start-clean").unwrap();
    let d = dir.path();
    let cfg = kernel_failure_config(d, &bpffs);
    let (ok, err) = run_agent(&cfg);
    assert!(!ok, "{err}");
    assert!(err.contains("pcl-absent0"), "{err}");
    let mut left: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["agent.toml"], "{err}");
}

/// A start that fails in the kernel on a node with an audit trail ends the
/// trail's record of it: STARTED, then STOPPING saying why; the node key
/// and the trail stay.
#[test]
fn a_start_that_fails_in_the_kernel_is_on_record() {
    use portcullis_agent::{
        audit::auditor::{Auditor, StartInfo},
        config::Config,
    };
    use portcullis_proto::v1::lifecycle::Phase;
    use portcullis_trail::node_key::NodeKey;
    use std::sync::Arc;

    let bpffs = portcullis_testkit::BpffsMount::new().expect("bpffs");
    let dir = portcullis_testkit::TempDir::new("start-kernel").unwrap();
    let d = dir.path();
    let cfg_path = kernel_failure_config(d, &bpffs);
    // An earlier run's trail.
    let cfg = Config::load(&cfg_path).unwrap();
    let key = Arc::new(NodeKey::load_or_create(&cfg.agent.node_key).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (auditor, task) = Auditor::open(
            &cfg.audit,
            &cfg.agent.node_id,
            key,
            StartInfo {
                reason: "earlier run".into(),
                ..StartInfo::default()
            },
        )
        .unwrap();
        let task = tokio::spawn(task.run());
        auditor.shutdown("SIGTERM").await.unwrap();
        task.await.unwrap();
    });
    let (ok, err) = run_agent(&cfg_path);
    assert!(!ok, "{err}");
    assert!(err.contains("pcl-absent0"), "{err}");
    assert!(cfg.agent.node_key.exists(), "the node key existed: kept");
    let phases = lifecycle_phases(&cfg.audit.spool_dir);
    assert_eq!(phases.len(), 4, "{phases:?}");
    assert_eq!(phases[2].0, Phase::Started as i32);
    assert_eq!(phases[3].0, Phase::Stopping as i32);
    assert!(
        phases[3].1.starts_with("start failed") && phases[3].1.contains("pcl-absent0"),
        "{phases:?}"
    );
}
