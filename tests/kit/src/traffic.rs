//! TCP and UDP inside namespaces: an echo server, connects with a timeout
//! (optionally from a chosen source address), and a paced connection flood.

use std::{
    fs::File,
    io::{self, Read, Write},
    mem,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    command::{ECHO_MAX_LIFETIME, POLL},
    netns::{Netns, enter},
};

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

pub(crate) fn accept_loop(listener: TcpListener, stop: &Arc<AtomicBool>, accepted: &AtomicU32) {
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

pub(crate) fn echo_conn(mut stream: TcpStream, stop: &AtomicBool, end: Instant) {
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

pub(crate) fn flood(addr: SocketAddr, plan: FloodPlan) -> io::Result<FloodStats> {
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

pub(crate) fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
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
pub(crate) fn start_connect(src: Option<SocketAddr>, dst: SocketAddr) -> io::Result<OwnedFd> {
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
pub(crate) fn socket_error(fd: &OwnedFd) -> io::Result<()> {
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
pub(crate) fn wait_fd(
    fd: libc::c_int,
    events: libc::c_short,
    timeout: Duration,
) -> io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    ppoll(&mut fds, timeout)?;
    Ok(fds[0].revents != 0)
}

pub(crate) fn ppoll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
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
    fn sockaddr_lengths() {
        let (_, l4) = sockaddr(&"10.0.0.1:80".parse().unwrap());
        let (_, l6) = sockaddr(&"[fd00::1]:80".parse().unwrap());
        assert_eq!(l4 as usize, mem::size_of::<libc::sockaddr_in>());
        assert_eq!(l6 as usize, mem::size_of::<libc::sockaddr_in6>());
    }
}
