//! `portcullis agent`: open (or adopt) the kernel state, apply the config,
//! listen for knocks, then every interval read counters, drain sampled
//! drops, reap expired admissions and reload keys, until SIGTERM/SIGINT.
//! Exiting leaves everything pinned: the kernel keeps enforcing (fail
//! static).
//!
//! This file wires the parts together; the knock path is
//! [`knock_service`], the reloads [`upkeep`], the interval reports
//! [`reports`].

pub mod budgets;
pub mod detect;
pub mod knock_service;
pub mod node;
pub mod reload;
pub mod reports;
pub mod services;
pub mod upkeep;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use portcullis_proto::v1::{self, event::Body};
use portcullis_trail::node_key::NodeKey;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    accounting::{Accountant, SpendBook, totals::CostTotals},
    admission::{admitter::Admitter, revocations::RevocationFile},
    audit::{
        auditor::{Auditor, StartInfo},
        drops::DropAccumulator,
        export::{self, ExportStatus},
    },
    config::Config,
    control,
    enforce::{self, Enforcer},
    loader::{self, Kernel, LinkWatch, Origin},
    metrics,
    policy::PolicySet,
    start_files::StartFiles,
};
use knock_service::KnockService;
use upkeep::{KnockParts, Knocks, audit_key_set};

pub struct RunOptions {
    pub ready_file: Option<PathBuf>,
    /// The config file, re-read on SIGHUP and when its bytes change.
    pub config_path: Option<PathBuf>,
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
    let kopts = enforce::kernel_options(&cfg.kernel);
    // Files that are only read come first: a bad key set or policy stops
    // the agent before it creates, mounts or loads anything.
    let parts = match (&cfg.tokens, cfg.knock.enabled()) {
        (Some(tokens), true) => Some(KnockParts::load(&cfg, tokens)?),
        _ => None,
    };
    // A start that fails removes what it created (and only that).
    let mut files = StartFiles::new();
    // The pins next: a bpf filesystem that would die with the agent refuses
    // the start before any file or kernel object exists.
    let pins = loader::prepare_pins(&kopts).context("kernel.pin_dir")?;
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
    let costs = Arc::new(CostTotals::default());
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
        enforcer,
        origin,
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
    // The control API last: everything it acts on exists. A socket another
    // agent serves on stops this one (nothing of the kernel's changes).
    // The outside interfaces last: everything they act on exists. A
    // control socket another agent serves on, or a metrics address in use,
    // stops this one (nothing of the kernel's changes).
    let node = Arc::new(node::Node {
        enforcer: enforcer.clone(),
        auditor: auditor.clone(),
        knocks: knocks.clone(),
        origin,
        pin_durability: durability.describe(),
        book: book.clone(),
        costs: costs.clone(),
        accountant: std::sync::Mutex::new(acct),
        service_edits: Default::default(),
        findings: Default::default(),
        budget_state: Default::default(),
    });
    let mut detector = detect::Detector::new(SystemTime::now());
    let mut budget_loop = budgets::BudgetLoop::default();
    let bound = async {
        let control = control::bind(&cfg.control).await?;
        let metrics = metrics::bind(&cfg.metrics).await?;
        anyhow::Ok((control, metrics))
    };
    let (control, metrics) = match bound.await {
        Ok(b) => b,
        Err(e) => {
            let _ = auditor.shutdown(&format!("start failed: {e:#}")).await;
            let _ = audit_task.await;
            return Err(e);
        }
    };
    let (control_stop, control_stopped) = tokio::sync::watch::channel(false);
    let mut outside = Vec::new();
    if let Some(listening) = control {
        outside.push(tokio::spawn(
            listening.serve(node.clone(), control_stopped.clone()),
        ));
    }
    if let Some(listening) = metrics {
        outside.push(tokio::spawn(listening.serve(node.clone(), control_stopped)));
    }
    files.commit();
    if let Some(path) = &opts.ready_file {
        write_ready(path, origin_word(origin))?;
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(cfg.agent.stats_interval);
    // `events_per_sec` is a per-second budget the kernel only counts down.
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut reclaim = tokio::time::interval(RECLAIM_EVERY);
    let mut report_tick = tokio::time::interval(cfg.audit.report_interval);
    report_tick.tick().await;
    let mut last_refusals = Vec::new();
    let mut flows_live = None;
    let mut unpinned_reported = HashSet::new();
    let mut config_watch = opts.config_path.as_deref().map(reload::ConfigWatch::new);
    let stop_reason = loop {
        tokio::select! {
            _ = tick.tick() => {
                last = reports::report(&enforcer, last, &mut drops)?;
                if let Some(k) = &knocks {
                    last_refusals = k.report(last_refusals, &mut drops);
                }
            }
            _ = report_tick.tick() => {
                let now = SystemTime::now();
                reports::report_cost(&auditor, &mut node.accountant(), &costs, now);
                reports::record_drops(&auditor, &cfg, &enforcer, &mut drops, flows_live, now).await;
            }
            _ = second.tick() => {
                detector.tick(&node, &node.findings, SystemTime::now());
                enforcer.reset_event_budget()?;
                reports::account(&enforcer, &mut node.accountant());
                budget_loop.tick(&node, &node.budget_state, SystemTime::now());
                if let Some(k) = &knocks {
                    k.upkeep();
                }
                if let Some(w) = &mut config_watch
                    && w.changed()
                {
                    reload::reload_config(&node, w.path(), "config file changed");
                }
                if let Some(lost) = reports::watch_links(&links, &auditor, &mut unpinned_reported) {
                    break lost;
                }
            }
            _ = reclaim.tick() => {
                match enforcer.recount_flows() {
                    Ok(census) => {
                        if census.removed > 0 {
                            tracing::debug!(event = "flows_idle", removed = census.removed, live = census.live, "idle flows removed");
                        }
                        flows_live = Some(census.live);
                    }
                    Err(e) => tracing::warn!(event = "flow_recount_failed", error = %e, "flow counts not refreshed"),
                }
                let freed = enforcer.reclaim_idle()?;
                if freed > 0 {
                    tracing::info!(event = "identities_reclaimed", count = freed, "idle identity slots freed");
                }
            }
            _ = hup.recv() => {
                // Policy, keys and revocations now rather than within the
                // second; the config file's services and findings applied,
                // the rest of its changes reported.
                tracing::info!(event = "sighup", "reloading policy, token keys and revocations");
                if let Some(k) = &knocks {
                    k.upkeep();
                }
                if let Some(w) = &mut config_watch {
                    w.changed();
                    reload::reload_config(&node, w.path(), "SIGHUP");
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
    if reports::report(&enforcer, last, &mut drops).is_ok() {
        if let Some(k) = &knocks {
            k.report(last_refusals, &mut drops);
        }
        reports::record_drops(
            &auditor,
            &cfg,
            &enforcer,
            &mut drops,
            flows_live,
            SystemTime::now(),
        )
        .await;
    }
    {
        let mut acct = node.accountant();
        reports::account(&enforcer, &mut acct);
        reports::report_cost(&auditor, &mut acct, &costs, SystemTime::now());
    }
    // Control calls end before the trail does: each one's record is in it.
    let _ = control_stop.send(true);
    for t in outside {
        let _ = t.await;
    }
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
    enforcer: Arc<Enforcer>,
    origin: Origin,
    links: LinkWatch,
    /// Lives as long as the agent runs.
    _programs: Option<aya::Ebpf>,
    knocks: Option<Arc<Knocks>>,
    drops: DropAccumulator,
    last: Vec<u64>,
}

/// Opens (or adopts) the kernel programs, applies the config, reports the
/// drops since the last summary and starts listening for knocks.
async fn start(
    cfg: &Arc<Config>,
    kopts: &loader::Options,
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
    let (maps, links, programs) = kernel.into_parts();
    let enforcer = Arc::new(Enforcer::new(maps, cfg.clone()));
    let installed = enforcer
        .configure(origin)
        .context("writing the configuration into the kernel maps")?;
    if installed > 0 {
        audit_static_admissions(auditor, cfg);
    }
    // Drops since the last summary before this start (while no agent ran,
    // or after a crash) open this run's record.
    let (mut drops, last) = reports::resume_drops(&cfg.audit.spool_dir, auditor, &enforcer)?;
    reports::record_drops(auditor, cfg, &enforcer, &mut drops, None, SystemTime::now()).await;

    // Knocks need a way to verify tokens; without [tokens] nobody can be
    // admitted by knock (the kernel still drops everything unadmitted).
    let knocks = match (&cfg.tokens, cfg.knock.enabled(), parts) {
        (Some(tokens), true, Some(parts)) => {
            let admitter = Arc::new(
                Admitter::new(cfg.clone(), parts.verifier, parts.policies)
                    .with_spend_book(book.clone()),
            );
            let service = Arc::new(KnockService::new(
                admitter,
                enforcer.clone(),
                auditor.clone(),
                node.clone(),
                cfg.knock.reply,
            ));
            let sock = KnockService::bind(cfg.knock.port).await?;
            let knocks = Knocks {
                service: service.clone(),
                enforcer: enforcer.clone(),
                auditor: auditor.clone(),
                jwks: parts.jwks,
                jwks_path: tokens.jwks_file.clone(),
                revocations: tokens.revocations_file.clone().map(RevocationFile::new),
                revoking: std::sync::Mutex::new(()),
                policy_reloads: Default::default(),
                policy_rejects: Default::default(),
                policy_edit: std::sync::Mutex::new(()),
            };
            // Revocations count before the first knock is heard.
            knocks.revocations();
            tokio::spawn(service.listen(sock));
            Some(Arc::new(knocks))
        }
        (None, true, _) => {
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
        enforcer,
        origin,
        links,
        _programs: programs,
        knocks,
        drops,
        last,
    })
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
            expires_unix_ms: portcullis_trail::time::unix_ms(now + a.ttl),
            action: action.to_string(),
            ..Default::default()
        };
        if let Err(e) = auditor.record(Body::AdmissionGranted(ev)) {
            tracing::error!(event = "audit_failed", error = %e, identity = %a.identity, "static admission not audited");
        }
    }
}

fn write_ready(path: &Path, word: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{word}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
