//! A network-namespace harness for the end-to-end tests and the demo: real
//! TCP and UDP through the real XDP/TC programs, without touching the host.
//!
//! Everything here lives inside network namespaces this module creates:
//! - [`Netns`]: a named namespace (`ip netns add`), deleted on drop. Code
//!   runs inside it on a fresh thread ([`Netns::run`]); commands run inside
//!   it through `ip netns exec` ([`Netns::exec`]).
//! - [`Topology`]: a "client" and a "server" namespace joined by one veth
//!   pair with IPv4 and IPv6 addresses. The veth is created directly inside
//!   the namespaces, so no interface ever appears in the host namespace.
//! - [`BpffsMount`]: a private bpf filesystem for one agent's pins.
//! - [`AgentProcess`]: the `portcullis agent` daemon running inside a
//!   namespace, its output captured to a log file.
//! - TCP/UDP helpers: an echo server, connects with a timeout (optionally
//!   from a chosen source address), and a paced connection flood.
//!
//! Every resource is released by a guard's `Drop`, also when a test panics.
//! Names carry the process id and a per-process counter, so parallel tests
//! and parallel test processes never collide.
//!
//! A socket created by a thread that has entered a namespace belongs to
//! that namespace for its whole life, wherever it is used afterwards: the
//! helpers create sockets inside and hand them back to the caller.
//!
//! Requires root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and `ip` from iproute2.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read, Write},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Where `ip netns add` puts the namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// How long [`Topology::new`] waits for links and IPv6 addresses.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period while waiting for a condition with a deadline.
const POLL: Duration = Duration::from_millis(10);
/// An echo server stops by itself after this long even if never dropped.
const ECHO_MAX_LIFETIME: Duration = Duration::from_secs(600);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique within this process.
fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `pcl-<prefix>-<pid>-<n>`: unique per process and per call.
fn unique_name(prefix: &str) -> String {
    format!("pcl-{prefix}-{}-{}", std::process::id(), next_id())
}

fn check_prefix(prefix: &str) -> io::Result<()> {
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

fn describe(cmd: &Command) -> String {
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

// ---- temporary directories --------------------------------------------------

/// A private directory under /tmp, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        check_prefix(prefix)?;
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("netns: cannot remove {}: {e}", self.path.display());
        }
    }
}

// ---- namespaces -------------------------------------------------------------

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `pcl-<prefix>-<pid>-<n>` with `ip netns add`. Only the
    /// loopback device exists inside, and it is down.
    pub fn new(prefix: &str) -> io::Result<Netns> {
        check_prefix(prefix)?;
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        Ok(Netns { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace handle (`/run/netns/NAME`).
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns
    /// its result; sockets `f` creates belong to this namespace. A panic in
    /// `f` is resumed on the caller's thread.
    pub fn run<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let handle = File::open(self.path()).map_err(|e| {
            io::Error::new(e.kind(), format!("open {}: {e}", self.path().display()))
        })?;
        std::thread::scope(|s| {
            let thread = s.spawn(move || -> io::Result<R> {
                enter(&handle)?;
                Ok(f())
            });
            match thread.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A command that runs `program` inside this namespace
    /// (`ip netns exec NAME program`). `ip netns exec` execs the program
    /// in place, so the child's pid is the program's. It also gives the
    /// program its own mount namespace, in which mounts made before the
    /// spawn (such as a [`BpffsMount`]) are visible.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        run_cmd(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a `net.*` sysctl of this namespace, e.g.
    /// `set_sysctl("net/ipv6/conf/default/accept_dad", "0")`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        if !key.starts_with("net/") || key.contains("..") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{key:?} is not a net/ sysctl"),
            ));
        }
        let path = Path::new("/proc/sys").join(key);
        // /proc/sys/net shows the namespace of the thread that opens it.
        self.run(|| std::fs::write(&path, value))?.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} in {}: {e}", path.display(), self.name),
            )
        })
    }
}

/// Moves the calling thread into the network namespace behind `handle`.
fn enter(handle: &File) -> io::Result<()> {
    // SAFETY: a valid fd; setns only affects the calling thread for
    // CLONE_NEWNET.
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns: {e}");
        }
    }
}

// ---- the two-namespace topology --------------------------------------------

static TOPOLOGY_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Two namespaces joined by a veth pair:
///
/// ```text
///  client ns                                  server ns
///  client_if  10.200.N.1/24 (+ .3)  <-veth->  server_if  10.200.N.2/24
///             fd00:200:N::1/64 (+ ::3)                   fd00:200:N::2/64
/// ```
///
/// The `_alt` client addresses are a second source on the same interface,
/// for "another, unadmitted client" ([`connect_from`]). N is 1-250,
/// distinct for every topology of this process (different processes may
/// reuse an N, which is harmless: each topology is in its own namespaces).
/// Dropping it deletes the veth and both namespaces.
#[derive(Debug)]
pub struct Topology {
    pub client_if: String,
    pub server_if: String,
    pub index: u8,
    pub client_v4: Ipv4Addr,
    pub client_v4_alt: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub client_v6_alt: Ipv6Addr,
    pub server_v6: Ipv6Addr,
    // Dropped after the fields above; `Drop for Topology` deletes the veth
    // first.
    pub client: Netns,
    pub server: Netns,
}

impl Topology {
    /// Builds the topology and waits (bounded) until both links are up and
    /// no IPv6 address is tentative.
    pub fn new(prefix: &str) -> io::Result<Topology> {
        check_prefix(prefix)?;
        let client = Netns::new(&format!("{prefix}-c"))?;
        let server = Netns::new(&format!("{prefix}-s"))?;
        let pid = std::process::id();
        let n = TOPOLOGY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let index = ((pid.wrapping_add(n)) % 250 + 1) as u8;
        // "pc" + pid (hex, <= 6) + counter (hex, <= 4) + side: <= 15 bytes.
        let tag = format!("pc{:x}{:x}", pid & 0xff_ffff, next_id() & 0xffff);
        let client_if = format!("{tag}c");
        let server_if = format!("{tag}s");
        debug_assert!(client_if.len() <= MAX_IFNAME);
        let topo = Topology {
            client_if,
            server_if,
            index,
            client_v4: Ipv4Addr::new(10, 200, index, 1),
            client_v4_alt: Ipv4Addr::new(10, 200, index, 3),
            server_v4: Ipv4Addr::new(10, 200, index, 2),
            client_v6: Ipv6Addr::new(0xfd00, 0x200, index as u16, 0, 0, 0, 0, 1),
            client_v6_alt: Ipv6Addr::new(0xfd00, 0x200, index as u16, 0, 0, 0, 0, 3),
            server_v6: Ipv6Addr::new(0xfd00, 0x200, index as u16, 0, 0, 0, 0, 2),
            client,
            server,
        };
        // From here on, Drop cleans up whatever was created.
        topo.configure()?;
        topo.settle()?;
        Ok(topo)
    }

    fn configure(&self) -> io::Result<()> {
        for ns in [&self.client, &self.server] {
            // No duplicate address detection: addresses (link-local too)
            // are usable at once instead of after about two seconds.
            ns.set_sysctl("net/ipv6/conf/all/accept_dad", "0")?;
            ns.set_sysctl("net/ipv6/conf/default/accept_dad", "0")?;
            ns.ip(&["link", "set", "dev", "lo", "up"])?;
        }
        // Created inside the client namespace with its peer placed straight
        // into the server namespace: nothing appears in the host namespace.
        self.client.ip(&[
            "link",
            "add",
            "name",
            &self.client_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.server_if,
            "netns",
            self.server.name(),
        ])?;
        let sides = [
            (
                &self.client,
                &self.client_if,
                vec![
                    (IpAddr::V4(self.client_v4), false),
                    (IpAddr::V4(self.client_v4_alt), true),
                    (IpAddr::V6(self.client_v6), false),
                    (IpAddr::V6(self.client_v6_alt), true),
                ],
            ),
            (
                &self.server,
                &self.server_if,
                vec![
                    (IpAddr::V4(self.server_v4), false),
                    (IpAddr::V6(self.server_v6), false),
                ],
            ),
        ];
        for (ns, ifname, addrs) in sides {
            for (addr, alt) in addrs {
                let cidr = format!("{addr}/{}", if addr.is_ipv6() { 64 } else { 24 });
                let mut args = vec!["addr", "add", &cidr, "dev", ifname.as_str()];
                if addr.is_ipv6() {
                    args.push("nodad");
                    if alt {
                        // Deprecated: never picked as a source address
                        // unless a socket binds it explicitly. (An IPv4
                        // secondary address is never picked anyway.)
                        args.extend(["preferred_lft", "0"]);
                    }
                }
                ns.ip(&args)?;
            }
            ns.ip(&["link", "set", "dev", ifname, "up"])?;
        }
        Ok(())
    }

    fn settle(&self) -> io::Result<()> {
        let ready = |ns: &Netns, ifname: &str| -> bool {
            let link = ns.ip(&["link", "show", "dev", ifname]).unwrap_or_default();
            let addrs = ns
                .ip(&["-6", "addr", "show", "dev", ifname])
                .unwrap_or_default();
            link.contains("LOWER_UP")
                && !addrs.contains("tentative")
                && addrs.contains("scope global")
        };
        poll_until(SETTLE_TIMEOUT, || {
            (ready(&self.client, &self.client_if) && ready(&self.server, &self.server_if))
                .then_some(())
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "veth {}/{} not up with usable IPv6 addresses after {SETTLE_TIMEOUT:?}",
                    self.client_if, self.server_if
                ),
            )
        })
    }

    pub fn server_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.server_v6.into()
        } else {
            self.server_v4.into()
        }
    }

    pub fn client_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.client_v6.into()
        } else {
            self.client_v4.into()
        }
    }

    pub fn client_alt_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.client_v6_alt.into()
        } else {
            self.client_v4_alt.into()
        }
    }

    /// The names of both namespaces.
    pub fn netns_names(&self) -> [&str; 2] {
        [self.client.name(), self.server.name()]
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting one end deletes the pair (and detaches any XDP/TC
        // program from it). Ignore "cannot find device": nothing to do.
        let _ = self.client.ip(&["link", "del", "dev", &self.client_if]);
        // The namespaces are deleted by their own Drop.
    }
}

// ---- bpffs ------------------------------------------------------------------

/// A fresh filesystem instance mounted on a private directory under /tmp;
/// unmounted (lazily, so an open file cannot make it fail) and removed on
/// drop, even when a test fails.
#[derive(Debug)]
struct FreshMount {
    path: PathBuf,
}

impl FreshMount {
    fn new(prefix: &str, fstype: &std::ffi::CStr, data: Option<&str>) -> io::Result<FreshMount> {
        let dir = TempDir::new(prefix)?;
        let path = dir.path().to_path_buf();
        // The directory now belongs to the mount guard.
        mem::forget(dir);
        let c = cstring(&path)?;
        let data = data
            .map(|d| {
                std::ffi::CString::new(d)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
            })
            .transpose()?;
        let data_ptr = data
            .as_ref()
            .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
        // SAFETY: valid NUL-terminated strings; `data` outlives the call.
        let rc = unsafe { libc::mount(fstype.as_ptr(), c.as_ptr(), fstype.as_ptr(), 0, data_ptr) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "mount {} on {}: {e}",
                    fstype.to_string_lossy(),
                    path.display()
                ),
            ));
        }
        Ok(FreshMount { path })
    }
}

impl Drop for FreshMount {
    fn drop(&mut self) {
        if let Ok(c) = cstring(&self.path) {
            // SAFETY: valid C string. MNT_DETACH: a process still holding a
            // file in it cannot make the unmount fail.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "netns: umount {}: {}",
                    self.path.display(),
                    io::Error::last_os_error()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("netns: rmdir {}: {e}", self.path.display());
        }
    }
}

fn cstring(p: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A fresh bpf filesystem instance on a private directory; dropping it also
/// drops every pin in it (programs whose only reference was a pinned link
/// detach).
#[derive(Debug)]
pub struct BpffsMount {
    mnt: FreshMount,
}

impl BpffsMount {
    pub fn new() -> io::Result<BpffsMount> {
        Ok(BpffsMount {
            mnt: FreshMount::new("bpffs", c"bpf", None)?,
        })
    }

    /// The mount point (`kernel.bpffs` in the agent config).
    pub fn path(&self) -> &Path {
        &self.mnt.path
    }

    /// `<mount>/portcullis` (`kernel.pin_dir` in the agent config).
    pub fn pin_dir(&self) -> PathBuf {
        self.mnt.path.join("portcullis")
    }
}

/// A tmpfs of `size_bytes` on a private directory (mode 0700): a real disk
/// that fills up, for ENOSPC tests.
#[derive(Debug)]
pub struct TmpfsMount {
    mnt: FreshMount,
}

impl TmpfsMount {
    pub fn new(size_bytes: u64) -> io::Result<TmpfsMount> {
        let data = format!("size={size_bytes},mode=0700");
        Ok(TmpfsMount {
            mnt: FreshMount::new("tmpfs", c"tmpfs", Some(&data))?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.mnt.path
    }
}

// ---- the agent process ------------------------------------------------------

/// `portcullis agent --config F --ready-file R [extra...]` running inside a
/// namespace; stdout and stderr go to a log file. Dropping it kills the
/// process (SIGKILL) and reaps it; if the thread is panicking the log is
/// printed to stderr first, so a failing test shows what the agent said.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    ready_file: PathBuf,
    log_file: PathBuf,
    // Last: removed after the child is gone.
    dir: TempDir,
}

impl AgentProcess {
    pub fn spawn(
        binary: &Path,
        ns: &Netns,
        config: &Path,
        extra_args: &[&str],
    ) -> io::Result<AgentProcess> {
        if !binary.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("agent binary {} is missing", binary.display()),
            ));
        }
        let dir = TempDir::new("agent")?;
        let ready_file = dir.path().join("ready");
        let log_file = dir.path().join("agent.log");
        let log = File::create(&log_file)?;
        let child = ns
            .exec(binary)
            .arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(AgentProcess {
            child: Some(child),
            ready_file,
            log_file,
            dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the agent has printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Waits until the agent has written its ready file and returns the
    /// file's content (the origin: `fresh`, `adopted` or `replaced`). Fails
    /// if the agent exits first or `timeout` passes, quoting its log.
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready_file) {
                let word = text.trim();
                if !word.is_empty() {
                    return Ok(word.to_owned());
                }
            }
            if let Some(status) = self.try_wait()? {
                return Err(io::Error::other(format!(
                    "agent exited ({status}) before it was ready; log:\n{}",
                    self.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("agent not ready after {timeout:?}; log:\n{}", self.log()),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// SIGKILL and reap: the agent gets no chance to clean up.
    pub fn kill9(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout` for the exit (SIGKILL after it).
    /// Returns the exit status of a graceful exit.
    pub fn terminate(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let Some(mut c) = self.child.take() else {
            return Err(io::Error::other("agent already stopped"));
        };
        // SAFETY: plain kill(2) on our own child, which is not yet reaped.
        if unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        match poll_until(timeout, || c.try_wait().ok().flatten()) {
            Some(status) => Ok(status),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("agent ignored SIGTERM for {timeout:?}; killed"),
                ))
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ({}) ----\n{}---- end of agent log ----",
                self.log_file.display(),
                self.log()
            );
        }
    }
}

/// Runs `binary ARGS...` inside `ns` and waits for it (the agent's one-shot
/// subcommands: `agent status`, `agent admit`, ...). The output is returned
/// whatever the exit status.
pub fn run_in(ns: &Netns, binary: &Path, args: &[&str]) -> io::Result<Output> {
    ns.exec(binary).args(args).stdin(Stdio::null()).output()
}

// ---- TCP and UDP helpers ----------------------------------------------------

/// A TCP echo server inside a namespace. Stops (and joins its threads) on
/// drop, or by itself after ten minutes.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

/// Starts an echo server listening on `addr` inside `ns`.
pub fn tcp_echo_server(ns: &Netns, addr: SocketAddr) -> io::Result<EchoServer> {
    let listener = ns.run(|| TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU32::new(0));
    let thread = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::Builder::new()
            .name(format!("echo-{addr}"))
            .spawn(move || accept_loop(listener, &stop, &accepted))?
    };
    Ok(EchoServer {
        addr,
        stop,
        accepted,
        thread: Some(thread),
    })
}

impl EchoServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: &Arc<AtomicBool>, accepted: &AtomicU32) {
    let end = Instant::now() + ECHO_MAX_LIFETIME;
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let stop = stop.clone();
                if let Ok(h) = std::thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || echo_conn(stream, &stop, end))
                {
                    handlers.push(h);
                }
                handlers.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = wait_fd(
                    listener.as_raw_fd(),
                    libc::POLLIN,
                    Duration::from_millis(50),
                );
            }
            Err(_) => {
                // Transient (ECONNABORTED, EMFILE): back off briefly.
                let _ = wait_fd(
                    listener.as_raw_fd(),
                    libc::POLLIN,
                    Duration::from_millis(50),
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handlers {
        let _ = h.join();
    }
}

fn echo_conn(mut stream: TcpStream, stop: &AtomicBool, end: Instant) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Connects to `addr` from inside `ns`, giving up after `timeout` (a
/// dropped SYN is retransmitted only after a second, so a short timeout
/// means "no answer"). The stream stays in `ns` and can be used from any
/// thread.
pub fn try_connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    ns.run(|| TcpStream::connect_timeout(&addr, timeout))?
}

/// Like [`try_connect`] but from the source address `src` (port chosen by
/// the kernel), e.g. a topology's `_alt` address.
pub fn connect_from(
    ns: &Netns,
    src: IpAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect_bound(ns, SocketAddr::new(src, 0), addr, timeout)
}

/// Connects from exactly `src` (address, and port unless 0) to `addr`
/// inside `ns`, giving up after `timeout`.
pub fn connect_bound(
    ns: &Netns,
    src: SocketAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    ns.run(|| connect_bound_here(src, addr, timeout))?
}

/// [`connect_bound`] in whatever namespace the calling thread is in (a
/// thread that entered one with [`enter_path`]).
pub fn connect_bound_here(
    src: SocketAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd = start_connect(Some(src), addr)?;
    if !wait_fd(fd.as_raw_fd(), libc::POLLOUT, timeout)? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect {src} -> {addr}: no answer within {timeout:?}"),
        ));
    }
    socket_error(&fd)?;
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Moves the calling thread into the network namespace at `path` for the
/// rest of its life (for a long-running thread that cannot borrow the
/// [`Netns`]).
pub fn enter_path(path: &Path) -> io::Result<()> {
    let handle = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    enter(&handle)
}

/// Writes `payload` and reads the same bytes back within `timeout`.
pub fn echo_roundtrip(stream: &mut TcpStream, payload: &[u8], timeout: Duration) -> io::Result<()> {
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(payload)?;
    let deadline = Instant::now() + timeout;
    let mut got = vec![0u8; payload.len()];
    let mut filled = 0;
    while filled < got.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "echo timed out"));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut got[filled..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "echo: connection closed",
                ));
            }
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "echo timed out"));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got != payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "echo returned other bytes",
        ));
    }
    Ok(())
}

/// How a [`connect_flood`] attempts connections.
#[derive(Clone, Copy, Debug)]
pub struct FloodPlan {
    /// How long new attempts are started.
    pub duration: Duration,
    /// Time between attempt starts (the attempt rate is 1/interval).
    pub interval: Duration,
    /// An attempt without an answer is abandoned after this long.
    pub attempt_timeout: Duration,
    /// At most this many attempts in flight (a bound on open sockets).
    pub max_pending: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodStats {
    pub attempts: u32,
    pub connected: u32,
    /// Refused or otherwise failed with an error.
    pub failed: u32,
    /// Abandoned after `attempt_timeout`.
    pub timed_out: u32,
    /// From the first attempt to the last one started.
    pub elapsed: Duration,
}

/// Starts TCP connections to `addr` from inside `ns` at a steady pace
/// (non-blocking, many in flight), closing each as soon as it connects or
/// times out. Bounded by `plan.duration + plan.attempt_timeout`.
pub fn connect_flood(ns: &Netns, addr: SocketAddr, plan: FloodPlan) -> io::Result<FloodStats> {
    ns.run(|| flood(addr, plan))?
}

fn flood(addr: SocketAddr, plan: FloodPlan) -> io::Result<FloodStats> {
    let mut st = FloodStats::default();
    let start = Instant::now();
    let stop_starting = start + plan.duration;
    let mut next = start;
    let mut last_start = start;
    let mut pending: Vec<(OwnedFd, Instant)> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= stop_starting && pending.is_empty() {
            break;
        }
        if now < stop_starting && now >= next && pending.len() < plan.max_pending.max(1) {
            pending.push((start_connect(None, addr)?, now));
            st.attempts += 1;
            last_start = now;
            next += plan.interval;
            if next < now {
                // Fell behind (max_pending reached, slow machine): resume the
                // pace from now rather than bursting to catch up.
                next = now;
            }
        }
        let wait = if now < stop_starting {
            next.saturating_duration_since(Instant::now())
        } else {
            POLL
        };
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        ppoll(&mut fds, wait)?;
        let now = Instant::now();
        let mut i = 0;
        pending.retain(|(fd, started)| {
            let revents = fds[i].revents;
            i += 1;
            if revents != 0 {
                match socket_error(fd) {
                    Ok(()) => st.connected += 1,
                    Err(_) => st.failed += 1,
                }
                false
            } else if now.duration_since(*started) >= plan.attempt_timeout {
                st.timed_out += 1;
                false
            } else {
                true
            }
        });
    }
    st.elapsed = last_start.duration_since(start);
    Ok(st)
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A non-blocking TCP socket with a connect to `dst` under way.
fn start_connect(src: Option<SocketAddr>, dst: SocketAddr) -> io::Result<OwnedFd> {
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if let Some(src) = src {
        if src.port() != 0 {
            // A chosen port may be reused right after a connection on it
            // closed.
            let one: libc::c_int = 1;
            // SAFETY: valid fd and option buffer.
            let rc = unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&one as *const libc::c_int).cast(),
                    mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let (ss, len) = sockaddr(&src);
        // SAFETY: ss holds a valid sockaddr of length len.
        if unsafe { libc::bind(raw, &ss as *const _ as *const libc::sockaddr, len) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("bind {src}: {e}")));
        }
    }
    let (ss, len) = sockaddr(&dst);
    // SAFETY: as above.
    if unsafe { libc::connect(raw, &ss as *const _ as *const libc::sockaddr, len) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(io::Error::new(e.kind(), format!("connect {dst}: {e}")));
        }
    }
    Ok(fd)
}

/// The pending error of a socket (SO_ERROR) as a Result.
fn socket_error(fd: &OwnedFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd and out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

/// Waits up to `timeout` for `events` on `fd`; true when they occurred.
fn wait_fd(fd: libc::c_int, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    ppoll(&mut fds, timeout)?;
    Ok(fds[0].revents != 0)
}

fn ppoll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: fds is a valid slice of pollfd; ts a valid timespec.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(rc as usize)
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

    #[test]
    fn sockaddr_lengths() {
        let (_, l4) = sockaddr(&"10.0.0.1:80".parse().unwrap());
        let (_, l6) = sockaddr(&"[fd00::1]:80".parse().unwrap());
        assert_eq!(l4 as usize, mem::size_of::<libc::sockaddr_in>());
        assert_eq!(l6 as usize, mem::size_of::<libc::sockaddr_in6>());
    }
}
