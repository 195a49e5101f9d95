//! The README's main job stays true: `portcullis-demo` runs every step of
//! the story with the node binary and succeeds (it exits non-zero if any
//! claim fails).

use std::process::Command;

#[test]
fn demo_runs_every_step_successfully() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-demo"))
        .arg("--agent-bin")
        .arg(portcullis_e2e::e2e::agent_binary())
        .output()
        .expect("run portcullis-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("origin: adopted"), "{stdout}");
    assert!(stdout.contains("demo complete"), "{stdout}");
}
