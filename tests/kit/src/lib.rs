//! The portcullis test harness: real TCP and UDP through the real XDP/TC
//! programs inside network namespaces, without touching the host; crafted
//! frames for BPF_PROG_TEST_RUN. It depends on no portcullis crate, so
//! every crate's tests may use it.
//!
//! - [`Netns`]: a named namespace (`ip netns add`), deleted on drop. Code
//!   runs inside it on a fresh thread ([`Netns::run`]); commands run inside
//!   it through `ip netns exec` ([`Netns::exec`]).
//! - [`Topology`]: a "client" and a "server" namespace joined by one veth
//!   pair with IPv4 and IPv6 addresses. The veth is created directly inside
//!   the namespaces, so no interface ever appears in the host namespace.
//! - [`BpffsMount`]: a private bpf filesystem for one agent's pins;
//!   [`TmpfsMount`]: a small filesystem to fill; [`TempDir`].
//! - [`AgentProcess`]: the `portcullis agent` daemon running inside a
//!   namespace, its output captured to a log file.
//! - TCP/UDP helpers: an echo server, connects with a timeout (optionally
//!   from a chosen source address), and a paced connection flood.
//! - [`packet`]: Ethernet/IPv4/IPv6/TCP/UDP frames, well formed or not.
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

mod command;
mod fleet;
mod interrupt;
mod mounts;
mod netns;
pub mod packet;
mod process;
mod python;
mod tempdir;
mod traffic;

pub use command::*;
pub use fleet::*;
pub use interrupt::*;
pub use mounts::*;
pub use netns::*;
pub use process::*;
pub use python::*;
pub use tempdir::*;
pub use traffic::*;

/// Pins the calling thread to the CPU it runs on: per-CPU maps and budgets
/// are per CPU, test runs execute on the calling CPU, and a measurement
/// keeps its caches.
pub fn pin_to_current_cpu() -> std::io::Result<()> {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
