//! `portcullis-bench events [--secs N] [--inflight N] [--rate N]`: audit
//! events from the agent to the collector, sustained, against a baseline of
//! the same events written to the local spool only, in the same run.
//!
//! Both scenarios use the real [`Auditor`] with the agent's default audit
//! settings (256 MiB spool, 8 MiB segments, a signed checkpoint every 1000
//! events, fsync once per batch with group commit), in a temporary directory
//! on the same filesystem. One producer thread records a realistic mix: knock
//! admissions (`AdmissionGranted`, every field filled the way the admitter
//! fills it) and, every 1000th event, a `CostReport` of 16 lines. The
//! producer never runs more than `--inflight` events ahead of what is done
//! (durable for the baseline, acknowledged by the collector otherwise), so
//! memory and the spool stay bounded and the figures are rates the pipeline
//! sustains, not a queue filling up.
//!
//! - local file: no collector. The spool is trimmed as soon as a batch is
//!   durable (as if a collector acknowledged instantly), so disk use stays
//!   bounded. Done = durable (fsynced).
//! - to collector: the same, plus the real exporter
//!   (`audit::export::run`) streaming to a real `portcullis collector`
//!   child process (plaintext gRPC on 127.0.0.1, `--out` a temporary
//!   directory; it fsyncs each batch before acknowledging). Done =
//!   acknowledged by the collector. At the end the auditor shuts down, the
//!   exporter drains, the collector stops, and every seq 1..=head must be in
//!   the collector's output exactly once ("no loss").
//!
//! events/s counts chain seqs done during the window (so the checkpoints
//! the chain adds, one per 1000 events, are included). Delay is record →
//! durable (baseline) or record → acknowledged (collector), sampled on every
//! 64th event (recorded with `record_durable`; the ack time is taken where
//! the exporter reports the ack to the spool). Agent CPU is this process's
//! user+system time (`getrusage(RUSAGE_SELF)`) over the window: producer,
//! audit writer, exporter and runtime together. Collector CPU is the child's
//! utime+stime from `/proc/PID/stat`. Benchmarks report; they do not fail on
//! a missed target (a failed loss check does fail the run).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use portcullis_agent::{
    audit::{
        auditor::{AuditError, Auditor, StartInfo},
        export,
        export::{EventSource, ExportStatus},
    },
    config::{AuditSection, CollectorTarget, OnFull},
    identity::IdentityName,
};
use portcullis_collector::store;
use portcullis_proto::v1::{AdmissionGranted, AdmissionMethod, CostLine, CostReport, event::Body};
use portcullis_testkit::TempDir;
use portcullis_trail::node_key::NodeKey;
use tokio::{runtime::Handle, sync::watch};

use crate::support::number;

pub const USAGE: &str =
    "usage: portcullis-bench events [--secs N] [--inflight N] [--rate N] [--portcullis PATH]
  --secs N          seconds per scenario (default 30)
  --inflight N      most events recorded and not yet done (default 16384)
  --rate N          pace the producer at N events/s (default: as fast as it goes)
  --portcullis PATH the collector binary (default: portcullis next to this binary)";

const NODE: &str = "bench-node";
/// Every SAMPLE_EVERY-th event is timed.
const SAMPLE_EVERY: u64 = 64;
/// The target docs/benchmarks.md states.
const TARGET_PER_SEC: f64 = 100_000.0;
/// Bounds on the phases around the measured window.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

struct Opts {
    secs: u64,
    inflight: u64,
    rate: Option<u64>,
    portcullis: PathBuf,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Opts> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut o = Opts {
        secs: 30,
        inflight: 16_384,
        rate: None,
        portcullis: exe.with_file_name("portcullis"),
    };
    while let Some(flag) = args.next() {
        let mut num = |name: &str| number(name, args.next(), 1..=u64::MAX);
        match flag.as_str() {
            "--secs" => o.secs = num("--secs")?,
            "--inflight" => o.inflight = num("--inflight")?,
            "--rate" => o.rate = Some(num("--rate")?),
            "--portcullis" => {
                o.portcullis = args.next().context("--portcullis needs a path")?.into();
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

// ---- events -------------------------------------------------------------------

/// The event mix: knock admissions, a cost report every 1000th event.
struct Gen {
    i: u64,
    now_ms: i64,
    policy_version: String,
}

impl Gen {
    fn new() -> Gen {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Gen {
            i: 0,
            now_ms,
            policy_version: "9f2c4e7a1b3d5f60".repeat(4),
        }
    }

    fn next(&mut self) -> Body {
        self.i += 1;
        let i = self.i;
        if i.is_multiple_of(1000) {
            return self.cost(i);
        }
        let t = i % 40;
        let mut jti = [0u8; 32];
        for (k, chunk) in jti.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&splitmix(i * 4 + k as u64).to_le_bytes());
        }
        let identity = format!(
            "spiffe://acme.example/ns/t{t}/sa/inference-client-{}",
            i % 5000
        );
        let tenant = format!("tenant-{t}");
        Body::AdmissionGranted(AdmissionGranted {
            identity_name: IdentityName::new(Some(&tenant), &identity).display(),
            identity,
            tenant,
            service: "llm-inference".into(),
            model_version: "llama-3.1-70b-instruct@2026-10-01".into(),
            source: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            source_port: 0,
            method: AdmissionMethod::Knock as i32,
            policies: vec![format!("t{t}-app-inference"), "tenant-isolation".into()],
            policy_version: self.policy_version.clone(),
            jti_sha256: jti.to_vec(),
            expires_unix_ms: self.now_ms + 300_000 + (i % 1000) as i64,
            action: "invoke".into(),
        })
    }

    fn cost(&self, i: u64) -> Body {
        let lines = (0..16)
            .map(|k| CostLine {
                identity: format!("spiffe://acme.example/ns/t{k}/sa/inference-client-{k}"),
                tenant: format!("tenant-{k}"),
                service: "llm-inference".into(),
                connections: 40 + k,
                packets_in: 12_000 + i,
                bytes_in: 9_000_000 + i,
                packets_out: 30_000 + i,
                bytes_out: 41_000_000 + i,
                cost_micros: 1_250 + k,
                identity_month_micros: 81_000_000 + i,
                identity_day_micros: 2_700_000 + i,
                tenant_month_micros: 910_000_000 + i,
                ..Default::default()
            })
            .collect();
        Body::CostReport(CostReport {
            interval_start_unix_ns: self.now_ms * 1_000_000,
            interval_ns: 1_000_000_000,
            currency: "USD".into(),
            lines,
            month: "2026-11".into(),
            day: "2026-11-24".into(),
        })
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---- plumbing -----------------------------------------------------------------

/// The highest seq done (durable or acknowledged); the producer waits on it.
struct Mark {
    seq: Mutex<u64>,
    cv: Condvar,
}

impl Mark {
    fn new(seq: u64) -> Arc<Mark> {
        Arc::new(Mark {
            seq: Mutex::new(seq),
            cv: Condvar::new(),
        })
    }

    fn get(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, seq: u64) {
        let mut g = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        if seq > *g {
            *g = seq;
            self.cv.notify_all();
        }
    }

    /// Waits (bounded) until the mark moves past `seen`.
    fn wait_past(&self, seen: u64, at_most: Duration) {
        let g = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.cv.wait_timeout_while(g, at_most, |s| *s <= seen);
    }
}

/// The auditor as the exporter's source, noting when each ack arrives.
struct Timed {
    inner: Auditor,
    mark: Arc<Mark>,
    acks: Mutex<Vec<(Instant, u64)>>,
}

impl EventSource for Timed {
    type Error = AuditError;
    fn durable(&self) -> watch::Receiver<u64> {
        self.inner.durable()
    }
    fn read_after(&self, seq: u64, max_events: usize) -> Result<Vec<Vec<u8>>, AuditError> {
        self.inner.read_after(seq, max_events)
    }
    fn acknowledged(&self, seq: u64) {
        let now = Instant::now();
        if let Ok(mut a) = self.acks.lock() {
            a.push((now, seq));
        }
        self.mark.set(seq);
        self.inner.acknowledged(seq);
    }
    fn node_id(&self) -> &str {
        self.inner.node_id()
    }
    fn public_key(&self) -> [u8; 32] {
        self.inner.public_key()
    }
}

/// One timed event: recorded at `t0`, got `seq`, durable at `durable`.
#[derive(Clone, Copy)]
struct Sample {
    t0: Instant,
    seq: u64,
    durable: Instant,
}

/// What the producer did.
#[derive(Default)]
struct Produced {
    recorded: u64,
    refused: u64,
    first_error: Option<String>,
}

/// Records events until `deadline`, at most `inflight` ahead of `mark`.
fn produce(
    auditor: Auditor,
    rt: Handle,
    mark: Arc<Mark>,
    samples: Arc<Mutex<Vec<Sample>>>,
    deadline: Instant,
    inflight: u64,
    rate: Option<u64>,
) -> Produced {
    let mut events = Gen::new();
    let mut out = Produced::default();
    let start = Instant::now();
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    'run: loop {
        if out.recorded.is_multiple_of(SAMPLE_EVERY) {
            if Instant::now() >= deadline {
                break;
            }
            loop {
                let done = mark.get();
                let st = auditor.stats();
                let ahead = st.queued + st.durable_seq.saturating_sub(done);
                if ahead < inflight {
                    break;
                }
                mark.wait_past(done, Duration::from_millis(20));
                if Instant::now() >= deadline {
                    break 'run;
                }
            }
            if let Some(r) = rate {
                let due = start + Duration::from_secs_f64(out.recorded as f64 / r as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let (a, s, body) = (auditor.clone(), Arc::clone(&samples), events.next());
            let refused = Arc::clone(&refused);
            rt.spawn(async move {
                let t0 = Instant::now();
                match a.record_durable(body).await {
                    Ok(seq) => {
                        let durable = Instant::now();
                        if let Ok(mut v) = s.lock() {
                            v.push(Sample { t0, seq, durable });
                        }
                    }
                    Err(_) => {
                        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        } else if let Err(e) = auditor.record(events.next()) {
            out.refused += 1;
            out.first_error.get_or_insert_with(|| e.to_string());
        }
        out.recorded += 1;
    }
    out.refused += refused.load(std::sync::atomic::Ordering::Relaxed);
    out
}

fn cpu_now() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// utime + stime of another process.
fn cpu_of(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: field 3 (state) is f[0]; utime is 14, stime 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

fn audit_section(dir: &Path) -> AuditSection {
    // The agent's defaults (agent/src/config/validate.rs).
    AuditSection {
        spool_dir: dir.join("spool"),
        spool_max_bytes: 256 << 20,
        segment_bytes: 8 << 20,
        on_full: OnFull::RefuseAdmissions,
        checkpoint_events: 1000,
        checkpoint_interval: Duration::from_secs(10),
        report_interval: Duration::from_secs(60),
        collector: None,
    }
}

fn start_info() -> StartInfo {
    StartInfo {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        policy_version: "bench".into(),
        reason: "bench events".into(),
        ..StartInfo::default()
    }
}

/// A `portcullis collector` child, stopped (and its output removed) on drop.
struct CollectorProc {
    child: Child,
    addr: std::net::SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl CollectorProc {
    fn start(binary: &Path, out: &Path) -> Result<CollectorProc> {
        let mut child = Command::new(binary)
            .args(["collector", "--listen", "127.0.0.1:0", "--out"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} collector", binary.display()))?;
        let stderr = child.stderr.take().context("collector stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let keep = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("portcullis collector: listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(a.trim().to_string());
                }
                if let Ok(mut l) = keep.lock() {
                    if l.len() >= 200 {
                        l.remove(0);
                    }
                    l.push(line);
                }
            }
        });
        let mut me = CollectorProc {
            child,
            addr: "127.0.0.1:0".parse()?,
            log,
        };
        let addr = match rx.recv_timeout(CONNECT_TIMEOUT) {
            Ok(a) => a,
            Err(_) => bail!(
                "the collector did not announce its address; its log:\n{}",
                me.log_text()
            ),
        };
        me.addr = addr
            .parse()
            .with_context(|| format!("collector address {addr:?}"))?;
        Ok(me)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after 10 s.
    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("the collector did not stop on SIGTERM within 10 s (killed)")
    }
}

impl Drop for CollectorProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- scenarios ----------------------------------------------------------------

struct Outcome {
    name: &'static str,
    window: Duration,
    /// Seqs done (durable / acknowledged) in the window.
    done: u64,
    agent_cpu: Duration,
    collector_cpu: Option<Duration>,
    /// Record → done, sorted.
    delays: Vec<Duration>,
    /// Record → durable, sorted (the collector scenario reports it too).
    durable_delays: Vec<Duration>,
    produced: Produced,
    /// Seqs durable in the window (the collector scenario: written locally).
    durable_done: u64,
    extra: Vec<String>,
    /// Loss check (collector scenario only): None when not applicable.
    no_loss: Option<bool>,
}

impl Outcome {
    fn per_sec(&self) -> f64 {
        self.done as f64 / self.window.as_secs_f64()
    }
    fn cpu_ms_per_10k(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e3 * 10_000.0 / self.done.max(1) as f64
    }
}

fn pct(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

/// What one measured window saw.
struct Window {
    elapsed: Duration,
    cpu: Duration,
    collector_cpu: Option<Duration>,
    /// Seqs done (the mark) and made durable during the window.
    done: u64,
    durable: u64,
    produced: Produced,
}

/// Runs the producer for `o.secs` and measures.
fn window(
    rt: &tokio::runtime::Runtime,
    auditor: &Auditor,
    mark: &Arc<Mark>,
    samples: &Arc<Mutex<Vec<Sample>>>,
    o: &Opts,
    collector: Option<u32>,
) -> Window {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(o.secs);
    let (done0, durable0) = (mark.get(), auditor.stats().durable_seq);
    let (cpu0, ccpu0) = (cpu_now(), collector.and_then(cpu_of));
    let producer = {
        let (a, h, m, s) = (
            auditor.clone(),
            rt.handle().clone(),
            Arc::clone(mark),
            Arc::clone(samples),
        );
        let (inflight, rate) = (o.inflight, o.rate);
        std::thread::spawn(move || produce(a, h, m, s, deadline, inflight, rate))
    };
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let (done1, durable1) = (mark.get(), auditor.stats().durable_seq);
    let (cpu1, ccpu1) = (cpu_now(), collector.and_then(cpu_of));
    let elapsed = start.elapsed();
    let produced = producer.join().unwrap_or_default();
    let ccpu = match (ccpu0, ccpu1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    Window {
        elapsed,
        cpu: cpu1.saturating_sub(cpu0),
        collector_cpu: ccpu,
        done: done1 - done0,
        durable: durable1 - durable0,
        produced,
    }
}

fn sorted_delays(samples: &[Sample], f: impl Fn(&Sample) -> Option<Duration>) -> Vec<Duration> {
    let mut v: Vec<Duration> = samples.iter().filter_map(f).collect();
    v.sort();
    v
}

fn local_file(rt: &tokio::runtime::Runtime, o: &Opts) -> Result<Outcome> {
    let tmp = TempDir::new("bench-events-file")?;
    let key = Arc::new(NodeKey::generate()?);
    let (auditor, task) = Auditor::open(&audit_section(tmp.path()), NODE, key, start_info())
        .context("opening the auditor")?;
    let writer = rt.spawn(task.run());
    let mark = Mark::new(*auditor.durable().borrow());
    // Trim as soon as durable: the spool stays small.
    let trimmer = {
        let (a, m) = (auditor.clone(), Arc::clone(&mark));
        let mut rx = a.durable();
        rt.spawn(async move {
            while rx.changed().await.is_ok() {
                let d = *rx.borrow_and_update();
                a.acknowledged(d);
                m.set(d);
            }
        })
    };
    let samples = Arc::new(Mutex::new(Vec::new()));
    eprintln!("events: local file baseline, {} s ...", o.secs);
    let w = window(rt, &auditor, &mark, &samples, o, None);
    let spool_bytes = auditor.stats().spool_bytes;
    rt.block_on(async {
        auditor.shutdown("bench done").await?;
        let _ = writer.await;
        let _ = trimmer.await;
        Ok::<_, AuditError>(())
    })?;
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let delays = sorted_delays(&samples, |s| Some(s.durable - s.t0));
    Ok(Outcome {
        name: "local file (spool, fsync per batch)",
        window: w.elapsed,
        done: w.done,
        agent_cpu: w.cpu,
        collector_cpu: None,
        durable_delays: delays.clone(),
        delays,
        produced: w.produced,
        durable_done: w.durable,
        extra: vec![format!(
            "spool bytes at the end of the window: {spool_bytes}"
        )],
        no_loss: None,
    })
}

fn to_collector(rt: &tokio::runtime::Runtime, o: &Opts) -> Result<Outcome> {
    let tmp = TempDir::new("bench-events-coll")?;
    let out = tmp.path().join("collector");
    std::fs::create_dir(&out)?;
    if !o.portcullis.exists() {
        bail!(
            "{} not found: build it first (`cargo build --release`) or give --portcullis PATH",
            o.portcullis.display()
        );
    }
    let key = Arc::new(NodeKey::generate()?);
    // Enrolled, as an operator would before the node's first stream.
    portcullis_collector::enroll::enroll(&out.join("keys"), NODE, key.public_key(), false)?;
    let mut coll = CollectorProc::start(&o.portcullis, &out)?;
    let (auditor, task) = Auditor::open(
        &audit_section(tmp.path()),
        NODE,
        Arc::clone(&key),
        start_info(),
    )
    .context("opening the auditor")?;
    let writer = rt.spawn(task.run());
    let mark = Mark::new(0);
    let timed = Arc::new(Timed {
        inner: auditor.clone(),
        mark: Arc::clone(&mark),
        acks: Mutex::new(Vec::new()),
    });
    let status = ExportStatus::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let target = CollectorTarget {
        endpoint: format!("http://{}", coll.addr),
        tls: None,
        allow_plaintext: false,
        batch_max_events: 1024,
    };
    let mut exporter = Some(rt.spawn(export::run(
        Arc::clone(&timed),
        key,
        target,
        stop_rx,
        Arc::clone(&status),
    )));
    // Connected and the STARTED event acknowledged before the clock starts.
    let until = Instant::now() + CONNECT_TIMEOUT;
    while mark.get() < 1 {
        if Instant::now() >= until {
            bail!(
                "the exporter did not get an ack within {CONNECT_TIMEOUT:?} ({:?}); collector log:\n{}",
                status.snapshot().last_error,
                coll.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let samples = Arc::new(Mutex::new(Vec::new()));
    eprintln!(
        "events: to the collector at {} (pid {}), {} s ...",
        coll.addr,
        coll.pid(),
        o.secs
    );
    let w = window(rt, &auditor, &mark, &samples, o, Some(coll.pid()));
    let at_window_end = status.snapshot();

    // Drain: the auditor stops (STOPPING, final checkpoint), the exporter
    // delivers everything durable and ends.
    let drain_start = Instant::now();
    let stats_before_stop = auditor.stats();
    let drained = rt.block_on(async {
        auditor.shutdown("bench done").await?;
        let _ = writer.await;
        let mut handle = exporter.take().context("exporter")?;
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut handle).await {
            Ok(_) => Ok::<bool, anyhow::Error>(true),
            Err(_) => {
                let _ = stop_tx.send(true);
                let _ = handle.await;
                Ok(false)
            }
        }
    })?;
    let drain = drain_start.elapsed();
    let head = timed.inner.stats().durable_seq;
    let snap = status.snapshot();
    coll.stop()?;

    // Every seq 1..=head exactly once in the collector's output.
    let (mut counts, mut other, mut lines, mut bytes) =
        (vec![0u32; head as usize + 1], 0u64, 0u64, 0u64);
    for f in store::output_files(&out)? {
        bytes += std::fs::metadata(&f)?.len();
        for line in BufReader::with_capacity(1 << 20, std::fs::File::open(&f)?).lines() {
            let line = line?;
            lines += 1;
            let v: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}: line {lines} is not JSON", f.display()))?;
            match store::record_head(&v) {
                Some((node, h)) if node == NODE && h.seq >= 1 && h.seq <= head => {
                    counts[h.seq as usize] += 1;
                }
                _ => other += 1,
            }
        }
    }
    let missing = counts[1..].iter().filter(|&&c| c == 0).count();
    let duplicated = counts[1..].iter().filter(|&&c| c > 1).count();
    let no_loss = drained
        && snap.acked_seq == head
        && missing == 0
        && duplicated == 0
        && other == 0
        && w.produced.refused == 0;

    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let acks = timed.acks.lock().map(|a| a.clone()).unwrap_or_default();
    let acked_at = |seq: u64| -> Option<Instant> {
        let i = acks.partition_point(|&(_, s)| s < seq);
        acks.get(i).map(|&(t, _)| t)
    };
    let delays = sorted_delays(&samples, |s| acked_at(s.seq).map(|t| t - s.t0));
    let durable_delays = sorted_delays(&samples, |s| Some(s.durable - s.t0));
    let extra = vec![
        format!(
            "at the window's end: durable {} (sealed {}), acked {}, sent {}; spool {} bytes",
            stats_before_stop.durable_seq,
            stats_before_stop.sealed_seq,
            at_window_end.acked_seq,
            at_window_end.sent_seq,
            stats_before_stop.spool_bytes
        ),
        format!(
            "drain after the window: {:.2} s; head {head}, acked {}; exporter sessions {}, failures {}, last error {:?}",
            drain.as_secs_f64(),
            snap.acked_seq,
            snap.sessions,
            snap.failures,
            snap.last_error
        ),
        format!(
            "collector output: {lines} lines, {bytes} bytes ({:.0} bytes per record); missing {missing}, duplicated {duplicated}, other {other}",
            bytes as f64 / lines.max(1) as f64
        ),
    ];
    drop(coll);
    drop(tmp);
    Ok(Outcome {
        name: "to collector (exporter → `portcullis collector`, both fsync)",
        window: w.elapsed,
        done: w.done,
        agent_cpu: w.cpu,
        collector_cpu: w.collector_cpu,
        delays,
        durable_delays,
        produced: w.produced,
        durable_done: w.durable,
        extra,
        no_loss: Some(no_loss),
    })
}

pub fn main(args: impl Iterator<Item = String>) -> Result<()> {
    let o = parse(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let base = local_file(&rt, &o)?;
    let coll = to_collector(&rt, &o)?;
    let rows = [&base, &coll];

    let mut cmd = format!("cargo xtask bench events --secs {}", o.secs);
    if o.inflight != 16_384 {
        cmd += &format!(" --inflight {}", o.inflight);
    }
    if let Some(r) = o.rate {
        cmd += &format!(" --rate {r}");
    }
    println!();
    println!(
        "portcullis audit events, {} s per scenario, one producer, at most {} in flight{}: `{cmd}`",
        o.secs,
        o.inflight,
        o.rate
            .map_or(String::new(), |r| format!(", paced at {r} events/s"))
    );
    println!();
    println!(
        "| scenario | events/s | vs baseline | p50 delay ms | p99 delay ms | agent CPU ms per 10k events | vs baseline | collector CPU ms per 10k events |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let base_cpu = base.cpu_ms_per_10k(base.agent_cpu);
    for r in rows {
        let cpu = r.cpu_ms_per_10k(r.agent_cpu);
        println!(
            "| {} | {:.0} | {:.2}x | {} | {} | {:.1} | {:.2}x | {} |",
            r.name,
            r.per_sec(),
            r.per_sec() / base.per_sec(),
            ms(pct(&r.delays, 0.5)),
            ms(pct(&r.delays, 0.99)),
            cpu,
            cpu / base_cpu,
            r.collector_cpu
                .map_or("-".into(), |c| format!("{:.1}", r.cpu_ms_per_10k(c)))
        );
    }
    println!();
    println!("details:");
    for r in rows {
        println!(
            "- {}: window {:.2} s, {} events done ({} durable), {} recorded, {} refused{}; {} delay samples, record → durable p50 {} ms p99 {} ms; agent CPU {:.2} s ({:.0} % of one core){}",
            r.name,
            r.window.as_secs_f64(),
            r.done,
            r.durable_done,
            r.produced.recorded,
            r.produced.refused,
            r.produced
                .first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first: {e})")),
            r.delays.len(),
            ms(pct(&r.durable_delays, 0.5)),
            ms(pct(&r.durable_delays, 0.99)),
            r.agent_cpu.as_secs_f64(),
            100.0 * r.agent_cpu.as_secs_f64() / r.window.as_secs_f64(),
            r.collector_cpu.map_or(String::new(), |c| format!(
                "; collector CPU {:.2} s ({:.0} % of one core)",
                c.as_secs_f64(),
                100.0 * c.as_secs_f64() / r.window.as_secs_f64()
            )),
        );
        for e in &r.extra {
            println!("  - {e}");
        }
    }
    println!();
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!("targets:");
    println!(
        "- at least {TARGET_PER_SEC:.0} events/s to the collector with fsync per batch: {:.0} {}",
        coll.per_sec(),
        verdict(coll.per_sec() >= TARGET_PER_SEC)
    );
    let no_loss = coll.no_loss == Some(true);
    println!(
        "- no loss (every seq 1..=head in the collector's output exactly once, nothing refused): {}",
        if no_loss { "PASS" } else { "FAIL" }
    );
    println!();
    println!("notes:");
    println!(
        "- events/s counts chain seqs done in the window (durable for the baseline, acknowledged"
    );
    println!(
        "  by the collector otherwise), including the chain's own checkpoint per 1000 events."
    );
    println!(
        "- delays are sampled every {SAMPLE_EVERY}th event; the producer is bounded by --inflight, so at"
    );
    println!(
        "  saturation delay ≈ in-flight / throughput (use --rate to measure below saturation)."
    );
    println!(
        "- agent CPU is this whole process (producer, audit writer, exporter, runtime); the producer's"
    );
    println!("  share is in both rows, so the difference is the cost of export.");
    if !no_loss {
        bail!("events were lost or not acknowledged (see details)");
    }
    Ok(())
}
