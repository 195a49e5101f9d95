//! The flood generator of `portcullis-bench peers`: pre-built TCP SYNs
//! from 65,536 spoofed sources, sent round-robin from an AF_PACKET socket
//! (qdisc bypassed, `sendmmsg` batches) on the client's veth, from a
//! thread pinned to its own CPU, for a bounded time.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use portcullis_e2e::e2e::PROTECTED_PORT;
use portcullis_testkit::{Netns, packet::Packet};

/// Spoofed sources: 172.16.0.0/16.
pub const SOURCES: u32 = 65_536;
const BATCH: usize = 64;

/// Pre-built SYNs from every spoofed source, with the node's MAC (so the
/// stack does not discard them as another host's before any filter).
pub fn frames(dst: [u8; 6], src: [u8; 6], server: Ipv4Addr) -> Vec<Vec<u8>> {
    (0..SOURCES)
        .map(|i| {
            let from = Ipv4Addr::new(172, 16, (i >> 8) as u8, i as u8);
            let mut f = Packet::tcp4(from, server, 1024 + (i % 50_000) as u16, PROTECTED_PORT)
                .syn()
                .build();
            f[..6].copy_from_slice(&dst);
            f[6..12].copy_from_slice(&src);
            f
        })
        .collect()
}

/// A running generator: sends until [`Flood::finish`], drop, or its time
/// limit, whichever comes first.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Flood {
    /// Floods `ifname` in `ns` with `frames` from a thread pinned to `cpu`,
    /// for at most `limit`; at most `pps` packets a second when given (as
    /// fast as it goes otherwise).
    pub fn start(
        ns: &Netns,
        ifname: &str,
        frames: Arc<Vec<Vec<u8>>>,
        cpu: usize,
        limit: Duration,
        pps: Option<u64>,
    ) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            let (ns, ifname) = (ns.path(), ifname.to_string());
            std::thread::spawn(move || -> Result<()> {
                portcullis_testkit::enter_path(&ns)?;
                pin(cpu)?;
                flood(&ifname, &frames, &stop, &sent, limit, pps)
            })
        };
        Flood {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Packets sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the generator and reports its error, if it had one.
    pub fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the generator panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends the frames round-robin from an AF_PACKET socket on `ifname`
/// (qdisc bypassed) until `stop` or `limit`, paced to `pps` when given.
fn flood(
    ifname: &str,
    frames: &[Vec<u8>],
    stop: &AtomicBool,
    sent: &AtomicU64,
    limit: Duration,
    pps: Option<u64>,
) -> Result<()> {
    // Pacing spins on the clock: the generator owns its CPU, and a sleep
    // cannot keep a schedule of one batch every few tens of microseconds.
    let per_batch = pps.map(|r| Duration::from_secs_f64(BATCH as f64 / r.max(1) as f64));
    // SAFETY: plain libc calls with checked results; buffers outlive them.
    unsafe {
        let fd = packet_socket(ifname)?;
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let start = Instant::now();
        let mut due = start;
        let mut next = 0usize;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(BATCH);
        let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
        while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
            if let Some(step) = per_batch {
                while Instant::now() < due {
                    std::hint::spin_loop();
                }
                due += step;
            }
            iov.clear();
            msgs.clear();
            for _ in 0..BATCH {
                let f = &frames[next];
                next = (next + 1) % frames.len();
                iov.push(libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                });
            }
            for v in iov.iter_mut() {
                let mut m: libc::mmsghdr = std::mem::zeroed();
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                msgs.push(m);
            }
            let n = libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0);
            if n > 0 {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// An AF_PACKET raw socket bound to `ifname` for every protocol: it sends
/// frames as given and sees the device's packets both ways.
pub fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: plain libc calls with checked results; the descriptor is
    // owned by the returned OwnedFd from its creation.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        if ifindex == 0 {
            bail!("{ifname}: {}", io::Error::last_os_error());
        }
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if raw < 0 {
            bail!("AF_PACKET socket: {}", io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        if libc::bind(
            raw,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            bail!("bind AF_PACKET on {ifname}: {}", io::Error::last_os_error());
        }
        Ok(fd)
    }
}

pub fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pin to CPU {cpu}: {}", io::Error::last_os_error());
        }
    }
    Ok(())
}
