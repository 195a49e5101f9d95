//! Calling a test agent's control API: the real `portcullis ctl` as root or
//! as another uid/gid (a subprocess, so the socket's peer credentials are
//! that user's), and an in-process client for streams.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use portcullis_proto::v1::control_client::ControlClient;
use tonic::transport::Channel;

use super::{Env, agent_binary};

/// The agent's control socket in `env` (see `state_sections`).
pub fn socket(env: &Env) -> PathBuf {
    env.state_dir().join("control.sock")
}

/// Lets other uids reach the socket: the test's directories are 0700.
pub fn open_to_other_users(env: &Env) {
    let mut dir: Option<&Path> = Some(env.state_dir());
    while let Some(d) = dir {
        if d == Path::new("/") || d == Path::new("/tmp") {
            break;
        }
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711));
        dir = d.parent();
    }
}

/// `portcullis ctl --socket S --json ARGS...`, as root or as `(uid, gid)`
/// with no supplementary groups.
pub fn ctl(env: &Env, user: Option<(u32, u32)>, args: &[&str]) -> Output {
    let mut cmd = Command::new(agent_binary());
    cmd.arg("ctl")
        .arg("--socket")
        .arg(socket(env))
        .arg("--json")
        .args(args);
    if let Some((uid, gid)) = user {
        // std drops root's supplementary groups when it changes the uid.
        cmd.gid(gid).uid(uid);
    }
    cmd.output().expect("run portcullis ctl")
}

/// `ctl` that must succeed; its JSON output.
pub fn ctl_json(env: &Env, user: Option<(u32, u32)>, args: &[&str]) -> serde_json::Value {
    let out = ctl(env, user, args);
    assert!(
        out.status.success(),
        "`portcullis ctl {}` as {user:?} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`portcullis ctl {}` printed no JSON ({e}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `ctl` that must fail; its stderr (the server's status and message).
pub fn ctl_refused(env: &Env, user: Option<(u32, u32)>, args: &[&str]) -> String {
    let out = ctl(env, user, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "`portcullis ctl {}` as {user:?} should fail:\nstdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// An in-process client over the socket, as root (the `ctl` command's own
/// connector).
pub async fn client(env: &Env) -> ControlClient<Channel> {
    portcullis_agent::ctl::connect(&socket(env))
        .await
        .expect("connect to the control socket")
}
