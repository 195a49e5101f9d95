//! The admitted client of `portcullis-bench peers`: a paced TCP upload from
//! the client's own (admitted) address to a sink on the node's protected
//! port, with connects probed beside it. Run once without the flood and
//! once under it, its goodput ratio says whether the node's filter leaves
//! room for legitimate work while it drops the attack.
//!
//! The upload is paced (a fixed offered rate) rather than as fast as it
//! goes: the generator owns the client's CPU during the flood, so an
//! unpaced sender would measure that contention instead of the node. What
//! falls short of the offered rate was lost or delayed at the node.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use portcullis_testkit::Netns;

use crate::flood::pin;

/// The upload's offered rate.
pub const OFFERED_MBIT: u64 = 500;
const CHUNK: usize = 64 * 1024;
/// A connect probe every this long.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// Long enough for one SYN retransmission (1 s): a probe that needed one
/// shows as a connect of a second or more.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A discard server on the node: counts what it receives.
pub struct Sink {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listens on `addr` inside `ns`; its threads run on `cpu`.
    pub fn start(ns: &Netns, addr: SocketAddr, cpu: usize) -> Result<Sink> {
        let listener = ns.run(|| TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (bytes, stop) = (bytes.clone(), stop.clone());
            std::thread::spawn(move || {
                let _ = pin(cpu);
                let mut readers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (bytes, stop) = (bytes.clone(), stop.clone());
                            readers.push(std::thread::spawn(move || {
                                let _ = pin(cpu);
                                discard(conn, &bytes, &stop)
                            }));
                        }
                        // Nothing pending: look again shortly (a server
                        // loop, not a wait for a condition).
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                for r in readers {
                    let _ = r.join();
                }
            })
        };
        Ok(Sink {
            addr,
            bytes,
            stop,
            thread: Some(thread),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn discard(mut conn: TcpStream, bytes: &AtomicU64, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// What the admitted client got in one window.
#[derive(Clone, Copy, Debug)]
pub struct Goodput {
    /// Bytes the sink received per second, in Mbit/s.
    pub mbit_s: f64,
    pub connect_p50: Duration,
    pub connect_p99: Duration,
    /// Probes that did not connect within [`PROBE_TIMEOUT`].
    pub connect_failed: usize,
    pub probes: usize,
}

/// Uploads at [`OFFERED_MBIT`] for `secs` from `client` (its main address)
/// to `sink`, probing connects every [`PROBE_EVERY`]; the sender runs on
/// `cpu` at real-time priority where allowed, so the flood generator
/// sharing that CPU does not starve it.
pub fn measure(client: &Netns, sink: &Sink, secs: u64, cpu: usize) -> Result<Goodput> {
    let to = sink.addr;
    let mut stream = client
        .run(|| TcpStream::connect_timeout(&to, PROBE_TIMEOUT))?
        .context("the admitted client could not connect")?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let window = Duration::from_secs(secs);
    let ns_path = client.path();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || probe(ns_path, to, &stop, window))
    };
    let before = sink.bytes();
    let start = Instant::now();
    let sent = std::thread::scope(|s| {
        s.spawn(|| {
            let _ = pin(cpu);
            realtime();
            paced_upload(&mut stream, window)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))?
    });
    let secs_taken = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut lat = prober
        .join()
        .map_err(|_| anyhow::anyhow!("the prober panicked"))??;
    sent?;
    let got = sink.bytes().saturating_sub(before);
    let probes = lat.len();
    let failed = lat.iter().filter(|l| l.is_none()).count();
    let mut ok: Vec<Duration> = lat.drain(..).flatten().collect();
    if ok.is_empty() {
        bail!("no connect probe succeeded ({probes} tried)");
    }
    ok.sort();
    let pct = |p: f64| ok[((ok.len() - 1) as f64 * p).round() as usize];
    Ok(Goodput {
        mbit_s: got as f64 * 8.0 / secs_taken / 1e6,
        connect_p50: pct(0.5),
        connect_p99: pct(0.99),
        connect_failed: failed,
        probes,
    })
}

/// Writes [`CHUNK`]s on a schedule of [`OFFERED_MBIT`] for `window`; a
/// sender behind schedule writes at once, one ahead sleeps (pacing).
fn paced_upload(stream: &mut TcpStream, window: Duration) -> Result<u64> {
    let chunk = vec![0x5au8; CHUNK];
    let per_chunk = Duration::from_secs_f64(CHUNK as f64 * 8.0 / (OFFERED_MBIT as f64 * 1e6));
    let start = Instant::now();
    let mut sent = 0u64;
    let mut due = start;
    while start.elapsed() < window {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        match stream.write_all(&chunk) {
            Ok(()) => sent += CHUNK as u64,
            // A stalled connection (write timeout): keep offering until
            // the window ends; what does not arrive is the result.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("upload"),
        }
        due += per_chunk;
    }
    Ok(sent)
}

/// Connects from the client namespace every [`PROBE_EVERY`] until `stop`
/// or `window` (bounded); `None` for a probe that failed.
fn probe(
    ns: PathBuf,
    to: SocketAddr,
    stop: &AtomicBool,
    window: Duration,
) -> Result<Vec<Option<Duration>>> {
    portcullis_testkit::enter_path(&ns)?;
    let start = Instant::now();
    let mut lat = Vec::new();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < window {
        let t = Instant::now();
        lat.push(
            TcpStream::connect_timeout(&to, PROBE_TIMEOUT)
                .ok()
                .map(|_| t.elapsed()),
        );
        let next = t + PROBE_EVERY;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    Ok(lat)
}

/// SCHED_FIFO priority 1 for this thread where permitted (root); ignored
/// where not, which only makes the paced sender less punctual.
fn realtime() {
    let p = libc::sched_param { sched_priority: 1 };
    // SAFETY: a valid policy and parameter for the calling thread.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &p);
    }
}
