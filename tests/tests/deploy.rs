//! The deployment files in `deploy/` are what users apply, so they are
//! checked like code: every Kustomize overlay renders (`kubectl kustomize`)
//! and validates strictly against the Kubernetes OpenAPI schemas
//! (`kubernetes-validate`, from the project's Python environment; no
//! cluster needed), the DaemonSet keeps the properties the README promises,
//! the shipped agent configs load and the shipped policies validate with
//! this build, and the systemd units pass `systemd-analyze verify` with no
//! warning. Each checker is also shown to fail on a broken input.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use portcullis_e2e::e2e::{agent_binary, workspace_binary};
use portcullis_testkit::{TempDir, require_python};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.31.0";
const OVERLAYS: [&str; 3] = ["base", "overlays/privileged", "overlays/shadow-rollout"];

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `kubectl kustomize DIR`: the manifests as applied.
fn render(overlay: &str) -> String {
    let dir = deploy().join("kubernetes").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl (with its built-in kustomize) runs: `cargo xtask setup` checks for it");
    assert!(out.status.success(), "{overlay}: {}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("Warning"),
        "{overlay} uses deprecated kustomize fields: {stderr}"
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubernetes-validate --strict`: unknown fields are errors.
fn validate(yaml: &str, dir: &Path, name: &str) -> Output {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    Command::new(require_python())
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(["-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate runs")
}

/// The rendered documents as JSON (PyYAML, which kubernetes-validate
/// brings), so the test can read fields.
fn documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(require_python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    let tmp = TempDir::new("deploy-k8s").unwrap();
    for overlay in OVERLAYS {
        let yaml = render(overlay);
        let out = validate(&yaml, tmp.path(), &overlay.replace('/', "-"));
        assert!(out.status.success(), "{overlay}: {}", said(&out));
        let docs = documents(&yaml);
        for (kind, name) in [
            ("Namespace", "portcullis-system"),
            ("DaemonSet", "portcullis-agent"),
            ("StatefulSet", "portcullis-collector"),
            ("Service", "portcullis-collector"),
            ("NetworkPolicy", "portcullis-collector"),
            ("ServiceAccount", "portcullis-agent"),
            ("ConfigMap", "portcullis-agent-config"),
            ("ConfigMap", "portcullis-policies"),
            ("ConfigMap", "portcullis-jwks"),
        ] {
            find(&docs, kind, name);
        }
    }
}

#[test]
fn the_validator_refuses_an_unknown_field_and_a_wrong_type() {
    let tmp = TempDir::new("deploy-k8s-bad").unwrap();
    let yaml = render("base");
    for (what, bad) in [
        (
            "unknown field",
            yaml.replacen("hostNetwork: true", "hostNetwrk: true", 1),
        ),
        (
            "wrong type",
            yaml.replacen("replicas: 1", "replicas: one", 1),
        ),
    ] {
        assert_ne!(bad, yaml, "{what}: the mutation applies");
        let out = validate(&bad, tmp.path(), "bad");
        assert!(!out.status.success(), "{what} passed: {}", said(&out));
    }
}

#[test]
fn the_daemonset_runs_with_capabilities_on_the_hosts_bpffs_and_probes_the_control_socket() {
    let docs = documents(&render("base"));
    let ds = find(&docs, "DaemonSet", "portcullis-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert!(
        pod["nodeSelector"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu")
    );
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 0);
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false, "capabilities, not privilege");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let caps: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for need in ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"] {
        assert!(caps.contains(&need), "{need} missing from {caps:?}");
    }
    assert!(!caps.contains(&"SYS_ADMIN"), "{caps:?}");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let cmd = &c[probe]["exec"]["command"];
        assert_eq!(
            cmd,
            &serde_json::json!(["/portcullis", "ctl", "status", "--json"]),
            "{probe}"
        );
    }
    for key in ["requests", "limits"] {
        assert!(c["resources"][key]["memory"].is_string(), "{key}");
    }
    let mount = |name: &str| -> &Value {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount {name}"))
    };
    let volume = |name: &str| -> &Value {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    assert_eq!(mount("bpffs")["mountPath"], "/sys/fs/bpf");
    assert_eq!(volume("bpffs")["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(mount("bpffs")["mountPropagation"], "HostToContainer");
    assert_eq!(volume("state")["hostPath"]["path"], "/var/lib/portcullis");
    // The config files live where the shipped config says.
    assert_eq!(mount("config")["mountPath"], "/etc/portcullis/config");
    assert_eq!(mount("policies")["mountPath"], "/etc/portcullis/policies");
    assert_eq!(mount("jwks")["mountPath"], "/etc/portcullis/jwks");
    // ConfigMaps without a hash suffix: updated in place, re-read by the
    // agent, no rollout.
    assert_eq!(
        volume("config")["configMap"]["name"],
        "portcullis-agent-config"
    );

    // The privileged fallback: privileged, and Bidirectional propagation
    // (which Kubernetes grants only to privileged containers).
    let docs = documents(&render("overlays/privileged"));
    let c =
        &find(&docs, "DaemonSet", "portcullis-agent")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    let bpffs = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "bpffs")
        .unwrap();
    assert_eq!(bpffs["mountPropagation"], "Bidirectional");
}

/// The agent.toml each overlay ships loads with this build's config rules,
/// and the shadow overlay's really puts the service in shadow mode.
#[test]
fn the_shipped_agent_configs_load_and_the_policies_validate() {
    use portcullis_agent::config::{Config, ServiceMode};
    let tmp = TempDir::new("deploy-cfg").unwrap();
    for (overlay, mode) in [
        ("base", ServiceMode::Enforce),
        ("overlays/shadow-rollout", ServiceMode::Shadow),
    ] {
        let docs = documents(&render(overlay));
        let cm = find(&docs, "ConfigMap", "portcullis-agent-config");
        let text = cm["data"]["agent.toml"].as_str().unwrap();
        let file = tmp.path().join("agent.toml");
        std::fs::write(&file, text).unwrap();
        let cfg = Config::load(&file).unwrap_or_else(|e| panic!("{overlay}: {e}"));
        assert_eq!(cfg.services[0].mode, mode, "{overlay}");
        assert_eq!(
            cfg.policy_dir.as_deref(),
            Some(Path::new("/etc/portcullis/policies"))
        );
        // The policy ConfigMap, written out as the pod sees it.
        let pol = tmp.path().join(overlay.replace('/', "-"));
        std::fs::create_dir_all(&pol).unwrap();
        let data = find(&docs, "ConfigMap", "portcullis-policies")["data"]
            .as_object()
            .unwrap();
        assert!(!data.is_empty());
        for (name, body) in data {
            std::fs::write(pol.join(name), body.as_str().unwrap()).unwrap();
        }
        let out = Command::new(agent_binary())
            .args(["policy", "validate"])
            .arg(&pol)
            .output()
            .unwrap();
        assert!(out.status.success(), "{overlay}: {}", said(&out));
    }
}

/// A unit with its `/usr/local/bin/...` programs pointed at this build,
/// since `systemd-analyze verify` checks that they exist.
fn unit_for_test(name: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(deploy().join("systemd").join(name)).unwrap();
    let text = text
        .replace(
            "/usr/local/bin/portcullis-collector ",
            &format!("{} ", workspace_binary("portcullis-collector").display()),
        )
        .replace(
            "/usr/local/bin/portcullis ",
            &format!("{} ", agent_binary().display()),
        );
    assert!(!text.contains("/usr/local/bin/"), "{name}: {text}");
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn verify(unit: &Path) -> Output {
    Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze runs (Debian package systemd)")
}

#[test]
fn the_systemd_units_verify_without_a_warning() {
    let tmp = TempDir::new("deploy-sd").unwrap();
    for name in ["portcullis-agent.service", "portcullis-collector.service"] {
        let unit = unit_for_test(name, tmp.path());
        let out = verify(&unit);
        assert!(out.status.success(), "{name}: {}", said(&out));
        assert!(out.stderr.is_empty(), "{name} has warnings: {}", said(&out));
        let text = std::fs::read_to_string(&unit).unwrap();
        for must in [
            "Restart=always",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "StateDirectory=",
        ] {
            assert!(text.contains(must), "{name} lacks {must}");
        }
    }
    let agent = std::fs::read_to_string(tmp.path().join("portcullis-agent.service")).unwrap();
    for cap in [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_SYS_RESOURCE",
    ] {
        for line in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
            assert!(
                agent
                    .lines()
                    .any(|l| l.starts_with(line) && l.contains(cap)),
                "{line} lacks {cap}"
            );
        }
    }
    assert!(!agent.contains("CAP_SYS_ADMIN\n"));
    // The checker fails on a typo and on a missing program.
    let typo = tmp.path().join("typo.service");
    std::fs::write(&typo, agent.replace("ProtectHome=", "ProtectHom=")).unwrap();
    assert!(!verify(&typo).stderr.is_empty(), "a typo passed");
    let missing = tmp.path().join("missing.service");
    std::fs::write(
        &missing,
        agent.replace(
            &agent_binary().display().to_string(),
            "/nonexistent/portcullis",
        ),
    )
    .unwrap();
    assert!(
        !verify(&missing).status.success(),
        "a missing program passed"
    );
}

/// `enroll-nodes.sh` with a stand-in `kubectl` on PATH that answers as a
/// cluster with two agent pods would (`agent status` printing what
/// `portcullis agent status` prints) and runs the real `portcullis
/// collector enroll` for the collector: both nodes end up enrolled under
/// their own node ids, and a pod without a key makes the script fail.
#[test]
fn enroll_nodes_records_each_agents_key_at_the_collector() {
    let tmp = TempDir::new("deploy-enroll").unwrap();
    let bin = tmp.path().join("bin");
    let out = tmp.path().join("collector");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let keys = [
        ("gpu-node-a", portcullis_trail::hex::hex(&[0x11; 32])),
        ("gpu-node-b", portcullis_trail::hex::hex(&[0x22; 32])),
    ];
    let fake = format!(
        r#"#!/bin/sh
# A stand-in for kubectl: two agent pods and a collector.
case "$*" in
  *"get pods"*) printf 'pod/portcullis-agent-a\npod/portcullis-agent-b\n{extra}' ;;
  *"exec pod/portcullis-agent-a -- /portcullis agent status"*) printf 'passed 10\nnode_id {na}\nnode_key {ka}\npins host mount namespace\n' ;;
  *"exec pod/portcullis-agent-b -- /portcullis agent status"*) printf 'node_id {nb}\nnode_key {kb}\n' ;;
  *"exec pod/"*) printf 'node_id broken\nnode_key unreadable (no such file)\n' ;;
  *"exec statefulset/portcullis-collector -- /portcullis collector enroll"*)
      shift 5; shift 1
      # the arguments after `collector enroll`, with the collector's
      # directory replaced by this test's
      [ "$1 $2 $3" = "collector enroll --out" ] || exit 9
      shift 4
      exec "{portcullis}" collector enroll --out "{out}" "$@" ;;
  *) echo "unexpected: $*" >&2; exit 3 ;;
esac
"#,
        extra = "{extra}",
        na = keys[0].0,
        ka = keys[0].1,
        nb = keys[1].0,
        kb = keys[1].1,
        portcullis = agent_binary().display(),
        out = out.display(),
    );
    let script = deploy().join("kubernetes/enroll-nodes.sh");
    let run = |extra: &str| -> Output {
        let kubectl = bin.join("kubectl");
        std::fs::write(&kubectl, fake.replace("{extra}", extra)).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("sh")
            .arg(&script)
            .env("PATH", path)
            .output()
            .unwrap()
    };
    let ok = run("");
    assert!(ok.status.success(), "{}", said(&ok));
    for (node, key) in &keys {
        assert!(
            said(&ok).contains(&format!("{node}: enrolled {key}")),
            "{}",
            said(&ok)
        );
    }
    let enrolled = std::fs::read_dir(out.join("keys"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert!(enrolled >= 2, "keys recorded: {enrolled}: {}", said(&ok));
    // A third pod whose agent has no key yet: reported, exit status 1.
    let broken = run("pod/portcullis-agent-c\\n");
    assert!(!broken.status.success(), "{}", said(&broken));
    assert!(
        said(&broken).contains("no node key yet"),
        "{}",
        said(&broken)
    );
}
