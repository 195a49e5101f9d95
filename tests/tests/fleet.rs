//! `cargo xtask fleet` stays true: three nodes with their own agents, one
//! client, one collector; every claim of `portcullis-fleet` must hold
//! (admission per node, fleet-wide revocation reported per node, every
//! node's chain at the collector without a gap across a SIGKILL, `audit
//! verify` passing for all three).

use std::process::Command;

#[test]
fn a_three_node_fleet_admits_per_node_revokes_everywhere_and_delivers_every_chain() {
    let _serial = portcullis_e2e::e2e::serial();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-fleet"))
        .args(["--nodes", "3", "--agent-bin"])
        .arg(portcullis_e2e::e2e::agent_binary())
        .output()
        .expect("run portcullis-fleet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("[FAIL]"), "{stdout}");
    for k in 0..3 {
        assert!(stdout.contains(&format!("== fleet-node-{k} (")), "{stdout}");
    }
    assert!(stdout.contains("(adopted)"), "{stdout}");
    assert!(stdout.contains("fleet complete"), "{stdout}");
}
