//! Names, commands and waiting: what every other part of the harness uses.

use std::{
    io,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Where `ip netns add` puts the namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// How long [`Topology::new`] waits for links and IPv6 addresses.
pub(crate) const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period while waiting for a condition with a deadline.
pub(crate) const POLL: Duration = Duration::from_millis(10);
/// An echo server stops by itself after this long even if never dropped.
pub(crate) const ECHO_MAX_LIFETIME: Duration = Duration::from_secs(600);

pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process.
pub(crate) fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `pcl-<prefix>-<pid>-<n>`: unique per process and per call.
pub(crate) fn unique_name(prefix: &str) -> String {
    format!("pcl-{prefix}-{}-{}", std::process::id(), next_id())
}

pub(crate) fn check_prefix(prefix: &str) -> io::Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 32
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("name prefix {prefix:?} must be 1-32 characters from a-z 0-9 -"),
        ))
    }
}

pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion; fails with its stderr when it exits non-zero.
/// Returns its stdout.
pub fn run_cmd(cmd: &mut Command) -> io::Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("could not start `{shown}`: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS...` in the caller's namespace.
pub fn ip(args: &[&str]) -> io::Result<String> {
    run_cmd(Command::new("ip").args(args))
}

/// Names of the network namespaces `ip netns list` shows.
pub fn list_netns() -> io::Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Calls `f` every [`POLL`] until it returns `Some` or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_veth_names_fit() {
        let a = unique_name("x");
        let b = unique_name("x");
        assert_ne!(a, b);
        let tag = format!("pc{:x}{:x}c", 0xff_ffffu32, 0xffffu32);
        assert!(tag.len() <= MAX_IFNAME, "{tag}");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("ok-1").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("Bad").is_err());
        assert!(check_prefix("a/b").is_err());
    }
}
