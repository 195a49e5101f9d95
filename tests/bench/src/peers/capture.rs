//! The node's side of `portcullis-bench peers knock`: knock-in and
//! reply-out times on the node's veth, from the kernel's timestamps of the
//! packets an AF_PACKET tap in the node's namespace sees.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use portcullis_testkit::Topology;

use super::knock::KNOCK_PORT;

/// linux/sockios.h: the last received (or looped-back sent) packet's
/// kernel timestamp as a timespec.
const SIOCGSTAMPNS: libc::c_ulong = 0x8907;
/// Knock-in and reply-out times on the node's veth, from the kernel's
/// receive and transmit timestamps of an AF_PACKET socket in the node's
/// namespace: the node-side time of each knock (its reply is sent after
/// the admission is written, so it bounds that from above by the reply's
/// signing, about 40 µs).
pub struct NodeSide {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Vec<Duration>>>>,
}

impl NodeSide {
    pub fn start(topo: &Topology) -> Result<NodeSide> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ifname = topo.server_if.clone();
        let fd = topo
            .server
            .run(move || packet_socket(&ifname))
            .context("enter the node's namespace")??;
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || capture(fd, &stop))
        };
        Ok(NodeSide {
            stop,
            thread: Some(thread),
        })
    }

    pub fn finish(mut self) -> Result<Vec<Duration>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => bail!("the capture thread panicked"),
        }
    }
}

impl Drop for NodeSide {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The device's packets both ways, with a 100 ms receive timeout so its
/// reader can notice a stop.
fn packet_socket(ifname: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd = crate::flood::packet_socket(ifname)?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a valid option and value for an open socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

/// Reads until `stop`; pairs each reply leaving the knock port with the
/// last knock that came in from the same address.
fn capture(
    fd: std::os::fd::OwnedFd,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Duration>> {
    use std::os::fd::AsRawFd;
    let mut pending: std::collections::HashMap<[u8; 4], Duration> = Default::default();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: buffers sized as passed; the descriptor is open.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            continue; // the receive timeout: look at `stop` again
        }
        let f = &buf[..n as usize];
        // Ethernet (14) + IPv4 (IHL) + UDP ports.
        if f.len() < 14 + 20 + 4
            || f[12..14] != [0x08, 0x00]
            || f[14 + 9] != libc::IPPROTO_UDP as u8
        {
            continue;
        }
        let ihl = usize::from(f[14] & 0x0f) * 4;
        let Some(udp) = f.get(14 + ihl..14 + ihl + 4) else {
            continue;
        };
        let (sport, dport) = (
            u16::from_be_bytes([udp[0], udp[1]]),
            u16::from_be_bytes([udp[2], udp[3]]),
        );
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: SIOCGSTAMPNS fills a timespec with the last packet's
        // kernel timestamp.
        if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSTAMPNS, &mut ts) } != 0 {
            continue;
        }
        let at = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        let addr = |o: usize| -> [u8; 4] { f[14 + o..14 + o + 4].try_into().unwrap_or_default() };
        if dport == KNOCK_PORT && from.sll_pkttype != libc::PACKET_OUTGOING {
            pending.insert(addr(12), at);
        } else if sport == KNOCK_PORT
            && from.sll_pkttype == libc::PACKET_OUTGOING
            && let Some(t) = pending.remove(&addr(16))
        {
            out.push(at.saturating_sub(t));
        }
    }
    Ok(out)
}
