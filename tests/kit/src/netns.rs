//! Network namespaces: [`Netns`], one named namespace, and [`Topology`],
//! a client and a server namespace joined by one veth pair.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::command::{
    MAX_IFNAME, NETNS_RUN_DIR, SETTLE_TIMEOUT, check_prefix, ip, next_id, poll_until, run_cmd,
    unique_name,
};

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
pub(crate) fn enter(handle: &File) -> io::Result<()> {
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

pub(crate) static TOPOLOGY_COUNTER: AtomicU32 = AtomicU32::new(0);

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
        prepare(&self.client)?;
        prepare(&self.server)?;
        veth(
            (
                &self.client,
                &self.client_if,
                &[
                    (IpAddr::V4(self.client_v4), false),
                    (IpAddr::V4(self.client_v4_alt), true),
                    (IpAddr::V6(self.client_v6), false),
                    (IpAddr::V6(self.client_v6_alt), true),
                ],
            ),
            (
                &self.server,
                &self.server_if,
                &[
                    (IpAddr::V4(self.server_v4), false),
                    (IpAddr::V6(self.server_v6), false),
                ],
            ),
        )
    }

    fn settle(&self) -> io::Result<()> {
        settle(&[
            (&self.client, &self.client_if),
            (&self.server, &self.server_if),
        ])
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

/// Makes addresses usable at once in `ns`: no duplicate address detection
/// (link-local too, instead of after about two seconds), loopback up.
pub(crate) fn prepare(ns: &Netns) -> io::Result<()> {
    ns.set_sysctl("net/ipv6/conf/all/accept_dad", "0")?;
    ns.set_sysctl("net/ipv6/conf/default/accept_dad", "0")?;
    ns.ip(&["link", "set", "dev", "lo", "up"])?;
    Ok(())
}

/// One side of a veth: its namespace, interface name and addresses (`true`
/// marks a secondary address).
pub(crate) type Side<'a> = (&'a Netns, &'a str, &'a [(IpAddr, bool)]);

/// A veth pair from `a` to `b`, created inside `a` with its peer placed
/// straight into `b` (nothing appears in the host namespace), addressed
/// (/24, /64) and up.
pub(crate) fn veth(a: Side, b: Side) -> io::Result<()> {
    a.0.ip(&[
        "link",
        "add",
        "name",
        a.1,
        "type",
        "veth",
        "peer",
        "name",
        b.1,
        "netns",
        b.0.name(),
    ])?;
    for (ns, ifname, addrs) in [a, b] {
        for (addr, alt) in addrs {
            let cidr = format!("{addr}/{}", if addr.is_ipv6() { 64 } else { 24 });
            let mut args = vec!["addr", "add", &cidr, "dev", ifname];
            if addr.is_ipv6() {
                args.push("nodad");
                if *alt {
                    // Deprecated: never picked as a source address unless
                    // a socket binds it explicitly. (An IPv4 secondary
                    // address is never picked anyway.)
                    args.extend(["preferred_lft", "0"]);
                }
            }
            ns.ip(&args)?;
        }
        ns.ip(&["link", "set", "dev", ifname, "up"])?;
    }
    Ok(())
}

/// Waits (bounded) until every link is up with a usable global IPv6
/// address.
pub(crate) fn settle(links: &[(&Netns, &str)]) -> io::Result<()> {
    let ready = |ns: &Netns, ifname: &str| -> bool {
        let link = ns.ip(&["link", "show", "dev", ifname]).unwrap_or_default();
        let addrs = ns
            .ip(&["-6", "addr", "show", "dev", ifname])
            .unwrap_or_default();
        link.contains("LOWER_UP") && !addrs.contains("tentative") && addrs.contains("scope global")
    };
    poll_until(SETTLE_TIMEOUT, || {
        links.iter().all(|(ns, i)| ready(ns, i)).then_some(())
    })
    .ok_or_else(|| {
        let names: Vec<&str> = links.iter().map(|(_, i)| *i).collect();
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "veth {} not up with usable IPv6 addresses after {SETTLE_TIMEOUT:?}",
                names.join("/")
            ),
        )
    })
}
