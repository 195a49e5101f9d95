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

use portcullis_proto::v1::lifecycle::Phase;

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
        drop_marks::{self, DropMark},
        drops::DropAccumulator,
        export::{self, ExportStatus},
    },
    config::{Config, TokensSection},
    kernel::{self, Kernel, LinkTrouble, LinkWatch, Maps, Origin, clock, maps::bytes_addr},
    nodekey::NodeKey,
    policy::{PolicySet, PolicyStore},
    start_files::StartFiles,
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
    let kopts = apply::kernel_options(&cfg.kernel);
    // Files that are only read come first: a bad key set or policy stops
    // the agent before it creates, mounts or loads anything.
    let parts = match (&cfg.tokens, cfg.knock.enabled()) {
        (Some(tokens), true) => Some(prepare_knocks(&cfg, tokens)?),
        _ => None,
    };
    // A start that fails removes what it created (and only that).
    let mut files = StartFiles::new();
    // The pins next: a bpf filesystem that would die with the agent refuses
    // the start before any file or kernel object exists.
    let pins = kernel::prepare_pins(&kopts).context("kernel.pin_dir")?;
    if pins.mounted {
        files.track_mount(&cfg.kernel.bpffs);
    }
    let durability = pins.durability;
    if !durability.outlives_agent() {
        tracing::warn!(
            event = "ephemeral_pins",
            pin_dir = %cfg.kernel.pin_dir.display(),
            "kernel.ephemeral_pins: the pins die with this agent's mount namespace; enforcement ends when the agent does"
        );
    }
    files.track(&cfg.agent.node_key);
    files.track_spool(&cfg.audit.spool_dir);
    files.track(&cfg.accounting.ledger);
    let node = Arc::new(load_node_key(&cfg)?);
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
            ephemeral_pins: !durability.outlives_agent(),
            pin_durability: durability.describe(),
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
    let started = start(&cfg, &kopts, parts, &node, &auditor, &book).await;
    let Started {
        maps,
        links,
        _programs,
        knocks,
        mut drops,
        mut last,
    } = match started {
        Ok(s) => s,
        Err(e) => {
            // The trail says why this start ended right after STARTED.
            let _ = auditor.shutdown(&format!("start failed: {e:#}")).await;
            let _ = audit_task.await;
            return Err(e);
        }
    };
    files.commit();
    if let Some(path) = &opts.ready_file {
        write_ready(path, origin_word(maps.origin))?;
    }
    let maps = maps.maps;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(cfg.agent.stats_interval);
    // `events_per_sec` is a per-second budget the kernel only counts down.
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut reclaim = tokio::time::interval(RECLAIM_EVERY);
    let mut report_tick = tokio::time::interval(cfg.audit.report_interval);
    report_tick.tick().await;
    let mut last_refusals = Vec::new();
    let mut flows_live = None;
    let mut unpinned_reported = std::collections::HashSet::new();
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
                record_drops(&auditor, &cfg, &maps, &mut drops, flows_live, now).await;
            }
            _ = second.tick() => {
                lock(&maps)?.reset_event_budget()?;
                account(&maps, &mut acct)?;
                if let Some(k) = &knocks {
                    k.upkeep();
                }
                if let Some(lost) = watch_links(&links, &auditor, &mut unpinned_reported) {
                    break lost;
                }
            }
            _ = reclaim.tick() => {
                let mut m = lock(&maps)?;
                match m.recount_flows(clock::monotonic_ns()) {
                    Ok(census) => {
                        if census.removed > 0 {
                            tracing::debug!(event = "flows_idle", removed = census.removed, live = census.live, "idle flows removed");
                        }
                        flows_live = Some(census.live);
                    }
                    Err(e) => tracing::warn!(event = "flow_recount_failed", error = %e, "flow counts not refreshed"),
                }
                let freed = m.reclaim_idle(clock::monotonic_ns())?;
                if freed > 0 {
                    tracing::info!(event = "identities_reclaimed", count = freed, "idle identity slots freed");
                }
            }
            _ = term.recv() => break "SIGTERM".to_string(),
            _ = int.recv() => break "SIGINT".to_string(),
        }
    };
    let failed = stop_reason.starts_with("enforcement lost");
    tracing::info!(
        event = "stopping",
        reason = %stop_reason,
        "agent stopping; programs stay pinned and keep enforcing"
    );
    // Drops up to the stop go into a final summary (the next start reports
    // what happens after it), usage up to the stop is charged and reported,
    // before the trail ends.
    let last_read = lock(&maps)
        .ok()
        .and_then(|mut m| report(&mut m, last, &mut drops).ok());
    if last_read.is_some() {
        if let Some(k) = &knocks {
            k.report(last_refusals, &mut drops);
        }
        record_drops(
            &auditor,
            &cfg,
            &maps,
            &mut drops,
            flows_live,
            SystemTime::now(),
        )
        .await;
    }
    account(&maps, &mut acct)?;
    report_cost(&auditor, &mut acct, SystemTime::now());
    // The STOPPING event and a final checkpoint are durable before exit;
    // whatever the collector has not acknowledged is sent after restart.
    if let Err(e) = auditor.shutdown(&stop_reason).await {
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
    if failed {
        anyhow::bail!("{stop_reason}");
    }
    Ok(())
}

/// What a successful start hands the main loop.
struct Started {
    maps: OpenedMaps,
    links: LinkWatch,
    /// Lives as long as the agent runs.
    _programs: Option<aya::Ebpf>,
    knocks: Option<Knocks>,
    drops: DropAccumulator,
    last: Vec<u64>,
}

struct OpenedMaps {
    maps: Arc<Mutex<Maps>>,
    origin: Origin,
}

/// Opens (or adopts) the kernel programs, applies the config, reports the
/// drops since the last summary and starts listening for knocks.
async fn start(
    cfg: &Arc<Config>,
    kopts: &kernel::Options,
    parts: Option<KnockParts>,
    node: &Arc<NodeKey>,
    auditor: &Auditor,
    book: &Arc<SpendBook>,
) -> anyhow::Result<Started> {
    if let Some(p) = &parts {
        audit_key_set(auditor, &p.jwks, &p.jwks_path, None);
    }
    let kernel = Kernel::open(kopts).context("opening the kernel programs")?;
    let origin = kernel.origin;
    let (mut maps, links, programs) = kernel.into_parts();
    let installed = apply::apply(&mut maps, cfg, origin)
        .context("writing the configuration into the kernel maps")?;
    if installed > 0 {
        audit_static_admissions(auditor, cfg);
    }
    // Drops since the last summary before this start (while no agent ran,
    // or after a crash) open this run's record.
    let (mut drops, last) = resume_drops(&cfg.audit.spool_dir, auditor, &mut maps)?;
    let maps = Arc::new(Mutex::new(maps));
    record_drops(auditor, cfg, &maps, &mut drops, None, SystemTime::now()).await;

    // Knocks need a way to verify tokens; without [tokens] nobody can be
    // admitted by knock (the kernel still drops everything unadmitted).
    let knocks = match (&cfg.tokens, cfg.knock.enabled()) {
        (Some(tokens), true) => {
            let parts = parts.expect("prepared for [tokens] with knocking on");
            Some(
                start_knocks(
                    cfg,
                    tokens,
                    parts,
                    node.clone(),
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
        links = links.len(),
        services = cfg.services.len(),
        static_admissions = installed,
        knock_port = knocks.as_ref().map(|_| cfg.knock.port),
        "portcullis agent enforcing"
    );
    Ok(Started {
        maps: OpenedMaps { maps, origin },
        links,
        _programs: programs,
        knocks,
        drops,
        last,
    })
}

/// The drop record's starting point: the last summary's counters (from the
/// mark file or the spool) if they are of the kernel's current counter map,
/// zero if the map is new. The accumulator then holds everything since.
fn resume_drops(
    spool_dir: &std::path::Path,
    auditor: &Auditor,
    maps: &mut Maps,
) -> anyhow::Result<(DropAccumulator, Vec<u64>)> {
    let mark = drop_marks::recover(spool_dir, auditor).unwrap_or_else(|e| {
        tracing::error!(event = "drop_marks_unreadable", error = %e, "reporting every drop of the counter map");
        None
    });
    let instance = maps.drops_instance()?;
    let baseline = DropMark::baseline_for(mark.as_ref(), &instance);
    let since = mark
        .as_ref()
        .filter(|m| m.instance == instance)
        .map_or_else(SystemTime::now, |m| clock::from_unix_ns(m.at_unix_ns));
    let mut drops = DropAccumulator::since_restart(since);
    drops.set_instance(&instance);
    let last = report(maps, baseline, &mut drops)?;
    Ok((drops, last))
}

/// Records the interval's drop summary (with the kernel's table fill) and,
/// once it is durable, the mark the next start reports from. A full spool
/// defers the summary: the counts keep accumulating into the next one.
async fn record_drops(
    auditor: &Auditor,
    cfg: &Config,
    maps: &Mutex<Maps>,
    drops: &mut DropAccumulator,
    flows_live: Option<u32>,
    now: SystemTime,
) {
    match lock(maps).and_then(|mut m| Ok(m.occupancy(flows_live)?)) {
        Ok(tables) => {
            for t in tables.iter().filter(|t| t.percent() >= TABLE_WARN_PERCENT) {
                tracing::warn!(
                    event = "table_pressure",
                    map = t.map,
                    entries = t.entries,
                    capacity = t.capacity,
                    percent = t.percent(),
                    knob = t.knob,
                    "kernel table filling up"
                );
            }
            drops.set_tables(tables.into_iter().map(table_fill).collect());
        }
        Err(e) => tracing::warn!(event = "occupancy_failed", error = %e, "table fill not reported"),
    }
    let Some(summary) = drops.summary(now) else {
        return;
    };
    match auditor
        .record_durable(Body::DropSummary(summary.clone()))
        .await
    {
        Ok(seq) => {
            drops.reset(now);
            if let Some(mark) = DropMark::of(seq, &summary)
                && let Err(e) = drop_marks::save(&cfg.audit.spool_dir, &mark)
            {
                // The spool holds the summary: the next start finds it there.
                tracing::warn!(event = "drop_marks_not_saved", error = %e, "drop mark not saved");
            }
        }
        Err(e) => {
            tracing::warn!(event = "drop_summary_deferred", error = %e, "drop summary kept for the next interval")
        }
    }
}

/// Tables this full are logged at every summary.
const TABLE_WARN_PERCENT: u32 = 80;

fn table_fill(t: kernel::maps::TableFill) -> v1::TableFill {
    v1::TableFill {
        map: t.map.to_string(),
        entries: t.entries,
        capacity: t.capacity,
        knob: t.knob.to_string(),
    }
}

/// Checks the pinned links; `Some(reason)` when enforcement is lost and
/// the agent must stop (its supervisor restarts it, which attaches anew).
fn watch_links(
    links: &LinkWatch,
    auditor: &Auditor,
    unpinned_reported: &mut std::collections::HashSet<String>,
) -> Option<String> {
    for trouble in links.check() {
        match &trouble {
            LinkTrouble::Repinned { .. } => {
                tracing::warn!(event = "link_repinned", detail = %trouble, "a link pin was removed while the agent ran; pinned it again");
                audit_lifecycle(auditor, Phase::Repaired, trouble.to_string());
            }
            LinkTrouble::Unpinned { link, .. } => {
                tracing::error!(event = "link_unpinned", detail = %trouble, "enforcement now ends when this agent exits");
                if unpinned_reported.insert(link.clone()) {
                    audit_lifecycle(auditor, Phase::Repaired, trouble.to_string());
                }
            }
            LinkTrouble::Lost { .. } => {
                tracing::error!(event = "link_lost", detail = %trouble, "enforcement lost on a link; stopping so the agent is restarted and attaches again");
                return Some(format!("enforcement lost: {trouble}"));
            }
        }
    }
    None
}

fn audit_lifecycle(auditor: &Auditor, phase: Phase, reason: String) {
    let ev = v1::Lifecycle {
        phase: phase as i32,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        public_key: auditor.public_key().to_vec(),
        key_id: crate::audit::chain::key_id(&auditor.public_key()),
        reason,
        ..Default::default()
    };
    if let Err(e) = auditor.record(Body::Lifecycle(ev)) {
        tracing::error!(event = "audit_failed", error = %e, "lifecycle event not recorded");
    }
}

/// Audits the token keys in force and the ones the file holds but the
/// product refused (or that the file was rejected and the old set stays).
fn audit_key_set(
    auditor: &Auditor,
    jwks: &JwksFile,
    path: &std::path::Path,
    error: Option<String>,
) {
    let set = jwks.current();
    let refused: Vec<v1::RefusedKey> = set
        .skipped()
        .iter()
        .map(|k| v1::RefusedKey {
            kid: k.kid.clone().unwrap_or_default(),
            index: u32::try_from(k.index).unwrap_or(u32::MAX),
            reason: k.reason.to_string(),
        })
        .collect();
    for k in set.skipped() {
        let kid = k.kid.as_deref().unwrap_or("");
        if k.reason.is_unsupported() {
            tracing::info!(event = "jwk_skipped", path = %path.display(), kid, index = k.index, reason = %k.reason, "token key not for this product; skipped");
        } else {
            tracing::warn!(event = "jwk_refused", path = %path.display(), kid, index = k.index, reason = %k.reason, "token key refused; the other keys are used");
        }
    }
    let ev = v1::KeySetChange {
        path: path.display().to_string(),
        keys: u32::try_from(set.len()).unwrap_or(u32::MAX),
        refused: if error.is_some() { Vec::new() } else { refused },
        accepted: error.is_none(),
        error: error.unwrap_or_default(),
    };
    if let Err(e) = auditor.record(Body::KeySetChange(ev)) {
        tracing::error!(event = "audit_failed", error = %e, "key set change not audited");
    }
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
                    if done != Default::default()
                        || !change.removed.subjects.is_empty()
                        || !change.removed.identities.is_empty() =>
                {
                    for ev in done.events.drain(..) {
                        self.audit(Body::Revocation(ev));
                    }
                    tracing::info!(
                        event = "revocation",
                        jtis = done.jtis,
                        subjects = done.subjects,
                        named_identities = done.named,
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
            Ok(true) => {
                tracing::info!(
                    event = "jwks_reloaded",
                    path = %self.jwks_path.display(),
                    keys = self.jwks.current().len(),
                    refused = self.jwks.current().skipped().len(),
                    "token keys reloaded"
                );
                audit_key_set(&self.auditor, &self.jwks, &self.jwks_path, None);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(
                    event = "jwks_reload_failed",
                    path = %self.jwks_path.display(),
                    error = %e,
                    "keeping the previous token keys"
                );
                audit_key_set(
                    &self.auditor,
                    &self.jwks,
                    &self.jwks_path,
                    Some(e.to_string()),
                );
            }
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
    jwks_path: PathBuf,
    verifier: Arc<Verifier>,
    policies: Arc<PolicyStore>,
}

fn prepare_knocks(cfg: &Config, tokens: &TokensSection) -> anyhow::Result<KnockParts> {
    let jwks = Arc::new(
        JwksFile::load(&tokens.jwks_file, tokens.allow_hs256)
            .with_context(|| format!("tokens.jwks_file {}", tokens.jwks_file.display()))?,
    );
    let verifier = Arc::new(Verifier::new(TokenPolicy::from(tokens), jwks.clone()));
    let policies = Arc::new(open_policies(cfg)?);
    Ok(KnockParts {
        jwks,
        jwks_path: tokens.jwks_file.clone(),
        verifier,
        policies,
    })
}

async fn start_knocks(
    cfg: &Arc<Config>,
    tokens: &TokensSection,
    parts: KnockParts,
    node: Arc<NodeKey>,
    maps: Arc<Mutex<Maps>>,
    auditor: Auditor,
    book: Arc<SpendBook>,
) -> anyhow::Result<Knocks> {
    let KnockParts {
        jwks,
        jwks_path: _,
        verifier,
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
        e @ (Refusal::SlotsExhausted | Refusal::Kernel(_) | Refusal::TableFull { .. }) => {
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
    last: Vec<u64>,
    drops: &mut DropAccumulator,
) -> anyhow::Result<Vec<u64>> {
    let now = maps.reason_counts()?.to_vec();
    drops.add_counts(&last, &now);
    for r in Reason::ALL {
        let delta = now[r as usize].saturating_sub(last.get(r as usize).copied().unwrap_or(0));
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
