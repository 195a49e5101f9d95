//! The README's main job stays true: `portcullis-demo --non-interactive`
//! runs every step of the story with the node binary and succeeds (it
//! exits non-zero if any claim fails), and Ctrl-C in the middle removes
//! everything it made.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use portcullis_e2e::e2e::{agent_binary, serial};

#[test]
fn demo_runs_every_step_successfully() {
    let _serial = serial();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-demo"))
        .arg("--non-interactive")
        .arg("--agent-bin")
        .arg(agent_binary())
        .output()
        .expect("run portcullis-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    for shown in [
        "origin: adopted",
        "no RST",
        "over IPv6",
        "tenant-isolation",
        "drop reason conn_rate",
        "\"activity_name\": \"Cost Report\"",
        "OK: ",
        "demo complete",
    ] {
        assert!(stdout.contains(shown), "{shown:?} not shown:\n{stdout}");
    }
}

/// What of the kit's resources (namespaces, temp dirs, mounts) carry the
/// pid: `pcl-<prefix>-<pid>-<n>`.
fn leftovers(pid: u32) -> Vec<String> {
    let tag = format!("-{pid}-");
    let mut found = Vec::new();
    for dir in ["/run/netns", "/tmp"] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("pcl-") && name.contains(&tag) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains("/pcl-") && l.contains(&tag))
            .map(str::to_owned),
    );
    found
}

#[test]
fn ctrl_c_in_the_middle_removes_every_namespace_mount_and_file() {
    let _serial = serial();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis-demo"))
        .arg("--non-interactive")
        .arg("--agent-bin")
        .arg(agent_binary())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run portcullis-demo");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    // Read until the demo is in its second chapter: namespaces, mounts,
    // the agent and the collector all exist then.
    let mut seen = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("2. a client gets a token") {
            break;
        }
    }
    assert!(seen.contains("2. a client"), "{seen}");
    assert!(
        !leftovers(pid).is_empty(),
        "the demo made nothing to clean up?"
    );
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let status =
        portcullis_testkit::poll_until(Duration::from_secs(20), || child.try_wait().ok().flatten())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("the demo did not stop within 20 s of Ctrl-C")
            });
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}
