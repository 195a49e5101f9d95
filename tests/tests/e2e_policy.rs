//! Policy as code end to end: a client admitted under one policy set loses
//! its live connection within about a second of a policy change that stops
//! allowing it, its next knock is refused by policy, and a broken policy
//! edit keeps the previous set. Real agent, real XDP, two namespaces.

use portcullis_e2e::e2e;

use std::time::{Duration, Instant};

use e2e::{
    EchoLoop, PROTECTED_PORT, SERVICE,
    knock::{KnockEnv, KnockSettings},
    serial,
};
use portcullis_testkit::TempDir;

const PERMIT: &str = r#"@id("permit-all")
permit(principal, action, resource);
"#;

/// Forbids the test subject's tenant; forbid overrides the permit.
const FORBID_ACME: &str = r#"@id("no-acme")
forbid(principal, action, resource)
when { principal.tenant == "acme" };
"#;

#[test]
fn policy_change_revokes_a_live_admission_and_bad_edits_keep_the_old_set() {
    let _serial = serial();
    let policies = TempDir::new("policy").expect("policy dir");
    std::fs::write(policies.path().join("base.cedar"), PERMIT).expect("write policy");
    let settings = KnockSettings {
        policy_dir: Some(policies.path().to_path_buf()),
        ..KnockSettings::default()
    };
    let k = KnockEnv::start("polchg", &settings);
    assert!(
        k.wait_log("policy set loaded", Duration::from_secs(5)),
        "agent log:\n{}",
        k.log()
    );

    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let token = k.mint(&["model:llm:invoke"], Duration::from_secs(300));
    k.knock_ok(false, &token, SERVICE, &[]);
    let stream = k
        .env
        .connect(false, PROTECTED_PORT, Duration::from_secs(2))
        .expect("admitted client connects");
    let echo = EchoLoop::start(stream, Instant::now() + Duration::from_secs(15));
    assert!(echo.wait_for(20, Duration::from_secs(5)), "echo flows");

    // A broken edit: the agent keeps the previous set and says why.
    std::fs::write(policies.path().join("broken.cedar"), "permit(principal,").expect("write");
    assert!(
        k.wait_log("keeping the previous policy set", Duration::from_secs(5)),
        "agent log:\n{}",
        k.log()
    );
    assert!(
        echo.wait_for(60, Duration::from_secs(5)),
        "still admitted after the bad edit"
    );
    std::fs::remove_file(policies.path().join("broken.cedar")).expect("remove");

    // The change that stops allowing the client.
    std::fs::write(policies.path().join("tenant.cedar"), FORBID_ACME).expect("write");
    let changed = Instant::now();
    let out = echo.join();
    let (failed_at, why) = out
        .failed_at
        .expect("the connection is cut by the policy change");
    let after = failed_at.saturating_duration_since(changed);
    eprintln!("connection cut {after:?} after the policy change ({why})");
    // One re-read per second plus the re-evaluation and the next packet.
    assert!(
        after <= Duration::from_millis(2500),
        "cut {after:?} after the change"
    );
    assert!(k.wait_log(
        "admissions the new policy denies were revoked",
        Duration::from_secs(3)
    ));
    k.knock_refused(false, &token, SERVICE, "a knock under the new policy");
    assert!(
        k.wait_refused("policy", Duration::from_secs(5)),
        "agent log:\n{}",
        k.log()
    );
}
