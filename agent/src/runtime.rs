//! `portcullis agent`: open (or adopt) the kernel state, apply the config,
//! listen for knocks, then every interval read counters, drain sampled
//! drops, reap expired admissions and reload keys, until SIGTERM/SIGINT.
//! Exiting leaves everything pinned: the kernel keeps enforcing (fail
//! static).

use std::{
    net::{Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use portcullis_common::Reason;
use tokio::{
    net::UdpSocket,
    signal::unix::{SignalKind, signal},
};

use portcullis_proto::v1::{self, event::Body};

use crate::{
    accounting::{Accountant, SpendBook},
    admission::{
        admitter::{Admitter, Denied, Granted, Refusal},
        jwk::JwksFile,
        revocations::RevocationFile,
        token::{TokenPolicy, Verifier},
    },
    apply,
    audit::{
        auditor::{Auditor, StartInfo},
        drops::DropAccumulator,
        export::{self, ExportStatus},
    },
    config::{Config, TokensSection},
    kernel::{Kernel, Maps, Origin, clock, maps::bytes_addr},
    nodekey::NodeKey,
    policy::{PolicySet, PolicyStore},
};

pub struct RunOptions {
    pub ready_file: Option<PathBuf>,
}

pub fn origin_word(o: Origin) -> &'static str {
    match o {
        Origin::Fresh => "fresh",
        Origin::Adopted => "adopted",
        Origin::Replaced => "replaced",
    }
}

/// How long a stopping agent waits for the collector to acknowledge its
/// last events.
const EXPORT_DRAIN: Duration = Duration::from_secs(2);

/// Identity slots nobody refers to are freed this often.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);

pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    // Files first: a bad key set, policy or audit spool must stop the agent
    // before it loads or changes anything in the kernel.
    let node = Arc::new(load_node_key(&cfg)?);
    let parts = match (&cfg.tokens, cfg.knock.enabled()) {
        (Some(tokens), true) => Some(prepare_knocks(&cfg, tokens, node.clone())?),
        _ => None,
    };
    let policy_version = parts.as_ref().map_or_else(
        || PolicySet::default_set().version().to_string(),
        |p| p.policies.current().version().to_string(),
    );
    // Spend to date: a corrupt ledger stops the agent here, before the
    // kernel, rather than silently starting the month from zero.
    let book = SpendBook::new();
    let mut acct = Accountant::open(&cfg, book.clone())
        .with_context(|| format!("accounting.ledger {}", cfg.accounting.ledger.display()))?;
    for a in &cfg.admissions {
        acct.know(&a.identity, "");
    }
    // The spool is opened (and a torn tail repaired) and the STARTED event
    // is durable before enforcement changes: every later decision is
    // chained after it.
    let (auditor, audit_task) = Auditor::open(
        &cfg.audit,
        &cfg.agent.node_id,
        node.clone(),
        StartInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            policy_version,
            reason: "start".to_string(),
        },
    )
    .with_context(|| format!("opening the audit spool {}", cfg.audit.spool_dir.display()))?;
    let audit_task = tokio::spawn(audit_task.run());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let export_status = ExportStatus::new();
    let exporter = cfg.audit.collector.clone().map(|target| {
        tokio::spawn(export::run(
            Arc::new(auditor.clone()),
            node.clone(),
            target,
            stop_rx.clone(),
            export_status.clone(),
        ))
    });
    let opened = Kernel::open(&apply::kernel_options(&cfg.kernel))
        .context("opening the kernel programs")
        .and_then(|kernel| {
            let origin = kernel.origin;
            let (mut maps, programs) = kernel.into_parts();
            let installed = apply::apply(&mut maps, &cfg, origin)
                .context("writing the configuration into the kernel maps")?;
            Ok((origin, maps, programs, installed))
        });
    // `_programs` lives as long as the agent runs.
    let (origin, maps, _programs, installed) = match opened {
        Ok(x) => x,
        Err(e) => {
            // The trail says why this start ended right after STARTED.
            let _ = auditor.shutdown(&format!("start failed: {e:#}")).await;
            return Err(e);
        }
    };
    if installed > 0 {
        audit_static_admissions(&auditor, &cfg);
    }
    let maps = Arc::new(Mutex::new(maps));

    // Knocks need a way to verify tokens; without [tokens] nobody can be
    // admitted by knock (the kernel still drops everything unadmitted).
    let knocks = match (&cfg.tokens, cfg.knock.enabled()) {
        (Some(tokens), true) => {
            let parts = parts.expect("prepared for [tokens] with knocking on");
            Some(
                start_knocks(
                    &cfg,
                    tokens,
                    parts,
                    maps.clone(),
                    auditor.clone(),
                    book.clone(),
                )
                .await?,
            )
        }
        (None, true) => {
            tracing::warn!(
                port = cfg.knock.port,
                "knock.port is set but there is no [tokens] section: knocks cannot admit anyone"
            );
            None
        }
        _ => None,
    };
    tracing::info!(
        event = "ready",
        origin = origin_word(origin),
        node = %cfg.agent.node_id,
        interfaces = ?cfg.kernel.interfaces,
        pin_dir = %cfg.kernel.pin_dir.display(),
        services = cfg.services.len(),
        static_admissions = installed,
        knock_port = knocks.as_ref().map(|_| cfg.knock.port),
        "portcullis agent enforcing"
    );
    if let Some(path) = &opts.ready_file {
        write_ready(path, origin_word(origin))?;
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(cfg.agent.stats_interval);
    // `events_per_sec` is a per-second budget the kernel only counts down.
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut reclaim = tokio::time::interval(RECLAIM_EVERY);
    let mut report_tick = tokio::time::interval(cfg.audit.report_interval);
    report_tick.tick().await;
    let mut last = lock(&maps)?.reason_counts()?;
    let mut last_refusals = Vec::new();
    let mut drops = DropAccumulator::new(SystemTime::now());
    let stop_reason = loop {
        tokio::select! {
            _ = tick.tick() => {
                last = report(&mut *lock(&maps)?, last, &mut drops)?;
                if let Some(k) = &knocks {
                    last_refusals = k.report(last_refusals, &mut drops);
                }
            }
            _ = report_tick.tick() => {
                let now = SystemTime::now();
                report_cost(&auditor, &mut acct, now);
                if let Some(summary) = drops.summary(now) {
                    // A full spool defers the summary: the counts keep
                    // accumulating into the next one.
                    match auditor.record(Body::DropSummary(summary)) {
                        Ok(()) => drops.reset(now),
                        Err(e) => tracing::warn!(event = "drop_summary_deferred", error = %e, "drop summary kept for the next interval"),
                    }
                }
            }
            _ = second.tick() => {
                lock(&maps)?.reset_event_budget()?;
                account(&maps, &mut acct)?;
                if let Some(k) = &knocks {
                    k.upkeep();
                }
            }
            _ = reclaim.tick() => {
                let freed = lock(&maps)?.reclaim_idle(clock::monotonic_ns())?;
                if freed > 0 {
                    tracing::info!(event = "identities_reclaimed", count = freed, "idle identity slots freed");
                }
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    tracing::info!(
        event = "stopping",
        reason = stop_reason,
        "agent stopping; programs stay pinned and keep enforcing"
    );
    // Usage up to the stop is charged and reported before the trail ends.
    account(&maps, &mut acct)?;
    report_cost(&auditor, &mut acct, SystemTime::now());
    // The STOPPING event and a final checkpoint are durable before exit;
    // whatever the collector has not acknowledged is sent after restart.
    if let Err(e) = auditor.shutdown(stop_reason).await {
        tracing::error!(event = "audit_shutdown_failed", error = %e, "final audit events not written");
    }
    // The exporter drains what is durable (the final events included) when
    // the auditor closes; a slow or absent collector gets them after the
    // next start instead.
    if let Some(mut x) = exporter
        && tokio::time::timeout(EXPORT_DRAIN, &mut x).await.is_err()
    {
        let _ = stop_tx.send(true);
        let _ = x.await;
    }
    drop(stop_tx);
    let _ = audit_task.await;
    Ok(())
}

/// One accounting tick: the kernel's cumulative usage becomes spend. A
/// ledger write error is logged; the next tick's write persists it.
fn account(maps: &Mutex<Maps>, acct: &mut Accountant) -> anyhow::Result<()> {
    let read = {
        let maps = lock(maps)?;
        maps.usage()
            .and_then(|rows| Ok((rows, maps.usage_instance()?)))
    };
    // A failed read skips this tick: the counters are cumulative, so the
    // next read charges what this one missed.
    let (rows, instance) = match read {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(event = "usage_read_failed", error = %e, "usage not charged this second");
            return Ok(());
        }
    };
    if let Err(e) = acct.tick(SystemTime::now(), &instance, &rows) {
        tracing::error!(event = "ledger_write_failed", error = %e, "spend to date not persisted");
    }
    Ok(())
}

/// The cost report of the interval, if there was usage. A full spool
/// defers it: the next report covers both intervals.
fn report_cost(auditor: &Auditor, acct: &mut Accountant, now: SystemTime) {
    let Some(report) = acct.take_report(now) else {
        return;
    };
    match auditor.record(Body::CostReport(report)) {
        Ok(()) => {
            if let Err(e) = acct.commit_report() {
                tracing::error!(event = "ledger_write_failed", error = %e, "cost report state not persisted");
            }
        }
        Err(e) => {
            acct.restore_report();
            tracing::warn!(event = "cost_report_deferred", error = %e, "cost report kept for the next interval");
        }
    }
}

fn load_node_key(cfg: &Config) -> anyhow::Result<NodeKey> {
    let node = NodeKey::load_or_create(&cfg.agent.node_key)
        .with_context(|| format!("agent.node_key {}", cfg.agent.node_key.display()))?;
    tracing::info!(
        event = "node_key",
        path = %cfg.agent.node_key.display(),
        public_key = %node.thumbprint(),
        "node signing key loaded"
    );
    Ok(node)
}

/// Static admissions are installed only into fresh kernel state; each is
/// audited as granted by configuration.
fn audit_static_admissions(auditor: &Auditor, cfg: &Config) {
    let now = SystemTime::now();
    for a in &cfg.admissions {
        let model_version = cfg
            .service(&a.service)
            .map(|s| s.model.version.clone())
            .unwrap_or_default();
        let action = cfg
            .service(&a.service)
            .map(|s| s.action.as_str())
            .unwrap_or_default();
        let ev = v1::AdmissionGranted {
            identity: a.identity.clone(),
            service: a.service.clone(),
            model_version,
            source: a.source.to_string(),
            source_port: u32::from(a.source_port),
            method: v1::AdmissionMethod::Static as i32,
            policies: vec!["config:admissions".to_string()],
            expires_unix_ms: clock::unix_ms(now + a.ttl),
            action: action.to_string(),
            ..Default::default()
        };
        if let Err(e) = auditor.record(Body::AdmissionGranted(ev)) {
            tracing::error!(event = "audit_failed", error = %e, identity = %a.identity, "static admission not audited");
        }
    }
}

fn lock(maps: &Mutex<Maps>) -> anyhow::Result<std::sync::MutexGuard<'_, Maps>> {
    maps.lock()
        .map_err(|_| anyhow::anyhow!("kernel state lock poisoned"))
}

/// The knock side of the agent: listener task, key reloads, counters.
struct Knocks {
    admitter: Arc<Admitter>,
    auditor: Auditor,
    jwks: Arc<JwksFile>,
    jwks_path: PathBuf,
    revocations: Option<RevocationFile>,
}

impl Knocks {
    /// Re-reads the revocations file and applies what changed.
    fn revocations(&self) {
        let Some(file) = &self.revocations else {
            return;
        };
        match file.reload() {
            Ok(None) => {}
            Ok(Some(change)) => match self.admitter.apply_revocations(&change, SystemTime::now()) {
                Ok(mut done)
                    if done != Default::default() || !change.removed.subjects.is_empty() =>
                {
                    for ev in done.events.drain(..) {
                        self.audit(Body::Revocation(ev));
                    }
                    tracing::info!(
                        event = "revocation",
                        jtis = done.jtis,
                        subjects = done.subjects,
                        identities = done.identities,
                        admissions = done.admissions,
                        unrevoked_subjects = change.removed.subjects.len(),
                        "revocations applied"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(event = "revocation_failed", error = %e, "revocation not applied to the kernel")
                }
            },
            Err(e) => tracing::warn!(
                event = "revocations_reload_failed",
                error = %e,
                "keeping the previous revocations"
            ),
        }
    }

    /// Records an event that must not be deferred; a failure is logged
    /// (the auditor counts it too).
    fn audit(&self, body: Body) {
        if let Err(e) = self.auditor.record(body) {
            tracing::error!(event = "audit_failed", error = %e, "event not recorded");
        }
    }

    /// Re-reads the policy directory; on a swap, decides every live
    /// admission again and revokes what the new set denies.
    fn policies(&self) {
        let store = self.admitter.policies();
        let old_version = store.current().version().to_string();
        match store.reload_if_changed() {
            Ok(None) => {}
            Ok(Some(set)) => {
                tracing::info!(
                    event = "policy_change",
                    version = set.version(),
                    policies = set.len(),
                    "policy set swapped"
                );
                self.audit(Body::PolicyChange(v1::PolicyChange {
                    old_version,
                    new_version: set.version().to_string(),
                    policies: u32::try_from(set.len()).unwrap_or(u32::MAX),
                    accepted: true,
                    error: String::new(),
                }));
                match self.admitter.reevaluate(SystemTime::now()) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(
                            event = "revocation",
                            reason = "policy_change",
                            admissions = n,
                            version = set.version(),
                            "admissions the new policy denies were revoked"
                        );
                        self.audit(Body::Revocation(v1::Revocation {
                            target_kind: "policy".into(),
                            target: set.version().to_string(),
                            reason: "the new policy set denies them".into(),
                            admissions_removed: u32::try_from(n).unwrap_or(u32::MAX),
                            identities: Vec::new(),
                        }));
                    }
                    Err(e) => {
                        tracing::error!(event = "revocation_failed", error = %e, "policy revocation not applied to the kernel")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(
                    event = "policy_reload_failed",
                    error = %e,
                    "keeping the previous policy set"
                );
                // Audited once per failing edit: the store does not retry
                // an unchanged bad file.
                self.audit(Body::PolicyChange(v1::PolicyChange {
                    old_version: old_version.clone(),
                    new_version: String::new(),
                    policies: u32::try_from(store.current().len()).unwrap_or(u32::MAX),
                    accepted: false,
                    error: e.to_string(),
                }));
            }
        }
    }

    fn upkeep(&self) {
        self.revocations();
        self.policies();
        match self.jwks.reload_if_changed() {
            Ok(true) => tracing::info!(
                event = "jwks_reloaded",
                path = %self.jwks_path.display(),
                keys = self.jwks.current().len(),
                "token keys reloaded"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                event = "jwks_reload_failed",
                path = %self.jwks_path.display(),
                error = %e,
                "keeping the previous token keys"
            ),
        }
        self.admitter.purge(SystemTime::now());
    }

    /// Logs refusals per reason since the last report and adds them to the
    /// interval's drop summary.
    fn report(
        &self,
        last: Vec<(&'static str, u64)>,
        drops: &mut DropAccumulator,
    ) -> Vec<(&'static str, u64)> {
        let now = self.admitter.counters.snapshot();
        for (reason, n) in &now {
            let before = last
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, n)| *n);
            drops.add_refusals(reason, n.saturating_sub(before));
            if *n > before {
                tracing::info!(
                    event = "knocks_refused",
                    reason,
                    count = n - before,
                    "knocks refused"
                );
            }
        }
        now
    }
}

/// What knock admission needs from files: loaded and checked before the
/// kernel is touched, so a bad key set, node key or policy stops the agent
/// without loading anything.
struct KnockParts {
    jwks: Arc<JwksFile>,
    verifier: Arc<Verifier>,
    node: Arc<NodeKey>,
    policies: Arc<PolicyStore>,
}

fn prepare_knocks(
    cfg: &Config,
    tokens: &TokensSection,
    node: Arc<NodeKey>,
) -> anyhow::Result<KnockParts> {
    let jwks = Arc::new(
        JwksFile::load(&tokens.jwks_file, tokens.allow_hs256)
            .with_context(|| format!("tokens.jwks_file {}", tokens.jwks_file.display()))?,
    );
    let verifier = Arc::new(Verifier::new(TokenPolicy::from(tokens), jwks.clone()));
    let policies = Arc::new(open_policies(cfg)?);
    Ok(KnockParts {
        jwks,
        verifier,
        node,
        policies,
    })
}

async fn start_knocks(
    cfg: &Arc<Config>,
    tokens: &TokensSection,
    parts: KnockParts,
    maps: Arc<Mutex<Maps>>,
    auditor: Auditor,
    book: Arc<SpendBook>,
) -> anyhow::Result<Knocks> {
    let KnockParts {
        jwks,
        verifier,
        node,
        policies,
    } = parts;
    let admitter =
        Arc::new(Admitter::new(cfg.clone(), verifier, maps, node, policies).with_spend_book(book));
    // One dual-stack socket: IPv4 knocks arrive as IPv4-mapped addresses.
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.knock.port));
    let sock = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding the knock listener on udp {addr}"))?;
    let knocks = Knocks {
        admitter: admitter.clone(),
        auditor: auditor.clone(),
        jwks,
        jwks_path: tokens.jwks_file.clone(),
        revocations: tokens.revocations_file.clone().map(RevocationFile::new),
    };
    // Revocations count before the first knock is heard.
    knocks.revocations();
    tokio::spawn(listen(Arc::new(sock), admitter, auditor));
    Ok(knocks)
}

/// The configured policy set, validated against the schema and the
/// configured services; without `[policy]`, the built-in scope-only set.
/// A bad set at start-up stops the agent: it never runs open.
fn open_policies(cfg: &Config) -> anyhow::Result<PolicyStore> {
    let Some(dir) = &cfg.policy_dir else {
        return Ok(PolicyStore::fixed(PolicySet::default_set()));
    };
    let store = PolicyStore::open(dir).with_context(|| format!("policy.dir {}", dir.display()))?;
    // Checked now and before every reload's swap: a policy naming a model
    // this node does not serve is a mistake, not a no-op.
    let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    store
        .set_services(&known)
        .with_context(|| format!("policy.dir {}", dir.display()))?;
    let set = store.current();
    tracing::info!(event = "policy_loaded", version = set.version(), policies = set.len(), dir = %dir.display(), "policy set loaded");
    Ok(store)
}

/// Receives knocks; answers only successes (refusals are silent). A
/// decided knock is finished in its own task: its grant must be durable in
/// the audit spool before the kernel changes, and concurrent grants share
/// one fsync (group commit) instead of queueing behind each other.
async fn listen(sock: Arc<UdpSocket>, admitter: Arc<Admitter>, auditor: Auditor) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "knock socket receive failed");
                continue;
            }
        };
        match admitter.check(&buf[..n], peer, SystemTime::now()) {
            Ok(decided) => {
                if !auditor.admissions_allowed() {
                    // Counted in the spool-pressure event that clears the
                    // condition; not one event per refusal into a full spool.
                    auditor.note_refused_admission();
                    let d = admitter.refuse_decided(&decided, Refusal::AuditFull);
                    tracing::warn!(event = "knock_refused", reason = d.refusal.reason(), %peer, "audit spool full");
                    continue;
                }
                let (sock, admitter, auditor) = (sock.clone(), admitter.clone(), auditor.clone());
                tokio::spawn(async move {
                    let body = Body::AdmissionGranted(decided.audit_event());
                    if let Err(e) = auditor.record_durable(body).await {
                        // The grant's record may still reach the spool once
                        // the disk recovers: the refusal follows it there, so
                        // the trail never shows a grant that was not made.
                        let d =
                            admitter.refuse_decided(&decided, Refusal::AuditFailed(e.to_string()));
                        tracing::error!(event = "knock_refused", reason = d.refusal.reason(), %peer, detail = %d.refusal);
                        refused(&auditor, &d, peer);
                        return;
                    }
                    match admitter.commit(decided) {
                        Ok(g) => granted(&sock, &admitter, &g, peer).await,
                        Err(d) => refused(&auditor, &d, peer),
                    }
                });
            }
            Err(d) => refused(&auditor, &d, peer),
        }
    }
}

async fn granted(sock: &UdpSocket, admitter: &Admitter, g: &Granted, peer: SocketAddr) {
    tracing::info!(
        event = "admission_granted",
        subject = %g.subject,
        tenant = g.tenant.as_deref().unwrap_or(""),
        service = %g.service,
        source = %g.source,
        source_port = g.source_port,
        slot = g.slot,
        policies = ?g.policies,
        policy_version = %g.policy_version,
        ttl_secs = g.expires.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs()),
        "knock admitted"
    );
    if let Some(reply) = admitter.reply(g)
        && let Err(e) = sock.send_to(&reply, peer).await
    {
        tracing::warn!(error = %e, %peer, "knock reply not sent");
    }
}

/// A refusal with a verified identity is audited; pre-authentication
/// refusals are only counted (they reach the drop summary).
fn refused(auditor: &Auditor, d: &Denied, peer: SocketAddr) {
    match &d.refusal {
        // Operator problems are warnings; a client's bad knock is debug.
        e @ (Refusal::SlotsExhausted | Refusal::Kernel(_)) => {
            tracing::warn!(event = "knock_refused", reason = e.reason(), %peer, detail = %e)
        }
        e => tracing::debug!(event = "knock_refused", reason = e.reason(), %peer, detail = %e),
    }
    if let Some(ev) = d.audit_event()
        && let Err(e) = auditor.record(Body::AdmissionDenied(ev))
    {
        tracing::error!(event = "audit_failed", error = %e, "refusal not audited");
    }
}

/// One interval: counter deltas, sampled drops, expired admissions.
fn report(
    maps: &mut Maps,
    last: [u64; Reason::COUNT as usize],
    drops: &mut DropAccumulator,
) -> anyhow::Result<[u64; Reason::COUNT as usize]> {
    let now = maps.reason_counts()?;
    drops.add_counts(&last, &now);
    for r in Reason::ALL {
        let delta = now[r as usize].saturating_sub(last[r as usize]);
        if delta > 0 && r.is_drop() {
            tracing::info!(event = "drops", reason = r.name(), count = delta, "dropped");
        }
    }
    let samples = maps.drain_events(1024);
    drops.add_samples(&samples);
    for ev in samples {
        tracing::debug!(
            event = "drop_sample",
            reason = Reason::from_u32(ev.reason).map(Reason::name).unwrap_or("unknown"),
            src = %bytes_addr(ev.src),
            sport = ev.sport,
            dst = %bytes_addr(ev.dst),
            dport = ev.dport,
            proto = ev.proto,
            service = ev.service,
        );
    }
    let reaped = maps.reap_expired(clock::monotonic_ns())?;
    if reaped > 0 {
        tracing::info!(event = "expired", count = reaped, "admissions expired");
    }
    Ok(now)
}

fn write_ready(path: &std::path::Path, word: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{word}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
