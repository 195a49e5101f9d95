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

use crate::{
    admission::{
        admitter::{Admitter, Refusal},
        jwk::JwksFile,
        revocations::RevocationFile,
        token::{TokenPolicy, Verifier},
    },
    apply,
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

/// Identity slots nobody refers to are freed this often.
const RECLAIM_EVERY: Duration = Duration::from_secs(5);

pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    // Files first: a bad key set or policy must stop the agent before it
    // loads or changes anything in the kernel.
    let parts = match (&cfg.tokens, cfg.knock.enabled()) {
        (Some(tokens), true) => Some(prepare_knocks(&cfg, tokens)?),
        _ => None,
    };
    let kopts = apply::kernel_options(&cfg.kernel);
    let kernel = Kernel::open(&kopts).context("opening the kernel programs")?;
    let origin = kernel.origin;
    let (mut maps, _programs) = kernel.into_parts();
    let installed = apply::apply(&mut maps, &cfg, origin)
        .context("writing the configuration into the kernel maps")?;
    let maps = Arc::new(Mutex::new(maps));

    // Knocks need a way to verify tokens; without [tokens] nobody can be
    // admitted by knock (the kernel still drops everything unadmitted).
    let knocks = match (&cfg.tokens, cfg.knock.enabled()) {
        (Some(tokens), true) => {
            let parts = parts.expect("prepared for [tokens] with knocking on");
            Some(start_knocks(&cfg, tokens, parts, maps.clone()).await?)
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
    let mut last = lock(&maps)?.reason_counts()?;
    let mut last_refusals = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                last = report(&mut *lock(&maps)?, last)?;
                if let Some(k) = &knocks {
                    last_refusals = k.report(last_refusals);
                }
            }
            _ = second.tick() => {
                lock(&maps)?.reset_event_budget()?;
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
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        event = "stopping",
        "agent stopping; programs stay pinned and keep enforcing"
    );
    Ok(())
}

fn lock(maps: &Mutex<Maps>) -> anyhow::Result<std::sync::MutexGuard<'_, Maps>> {
    maps.lock()
        .map_err(|_| anyhow::anyhow!("kernel state lock poisoned"))
}

/// The knock side of the agent: listener task, key reloads, counters.
struct Knocks {
    admitter: Arc<Admitter>,
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
                Ok(done) if done != Default::default() || !change.removed.subjects.is_empty() => {
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

    /// Re-reads the policy directory; on a swap, decides every live
    /// admission again and revokes what the new set denies.
    fn policies(&self) {
        let store = self.admitter.policies();
        match store.reload_if_changed() {
            Ok(None) => {}
            Ok(Some(set)) => {
                tracing::info!(
                    event = "policy_change",
                    version = set.version(),
                    policies = set.len(),
                    "policy set swapped"
                );
                match self.admitter.reevaluate(SystemTime::now()) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        event = "revocation",
                        reason = "policy_change",
                        admissions = n,
                        version = set.version(),
                        "admissions the new policy denies were revoked"
                    ),
                    Err(e) => {
                        tracing::error!(event = "revocation_failed", error = %e, "policy revocation not applied to the kernel")
                    }
                }
            }
            Err(e) => tracing::warn!(
                event = "policy_reload_failed",
                error = %e,
                "keeping the previous policy set"
            ),
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

    /// Logs refusals per reason since the last report.
    fn report(&self, last: Vec<(&'static str, u64)>) -> Vec<(&'static str, u64)> {
        let now = self.admitter.counters.snapshot();
        for (reason, n) in &now {
            let before = last
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, n)| *n);
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

fn prepare_knocks(cfg: &Config, tokens: &TokensSection) -> anyhow::Result<KnockParts> {
    let jwks = Arc::new(
        JwksFile::load(&tokens.jwks_file, tokens.allow_hs256)
            .with_context(|| format!("tokens.jwks_file {}", tokens.jwks_file.display()))?,
    );
    let verifier = Arc::new(Verifier::new(TokenPolicy::from(tokens), jwks.clone()));
    let node = Arc::new(
        NodeKey::load_or_create(&cfg.agent.node_key)
            .with_context(|| format!("agent.node_key {}", cfg.agent.node_key.display()))?,
    );
    tracing::info!(
        event = "node_key",
        path = %cfg.agent.node_key.display(),
        public_key = %node.thumbprint(),
        "node signing key loaded"
    );
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
) -> anyhow::Result<Knocks> {
    let KnockParts {
        jwks,
        verifier,
        node,
        policies,
    } = parts;
    let admitter = Arc::new(Admitter::new(cfg.clone(), verifier, maps, node, policies));
    // One dual-stack socket: IPv4 knocks arrive as IPv4-mapped addresses.
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.knock.port));
    let sock = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding the knock listener on udp {addr}"))?;
    let knocks = Knocks {
        admitter: admitter.clone(),
        jwks,
        jwks_path: tokens.jwks_file.clone(),
        revocations: tokens.revocations_file.clone().map(RevocationFile::new),
    };
    // Revocations count before the first knock is heard.
    knocks.revocations();
    tokio::spawn(listen(sock, admitter));
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

/// Receives knocks; answers only successes (refusals are silent).
async fn listen(sock: UdpSocket, admitter: Arc<Admitter>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "knock socket receive failed");
                continue;
            }
        };
        match admitter.handle(&buf[..n], peer, SystemTime::now()) {
            Ok(g) => {
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
                if let Some(reply) = admitter.reply(&g)
                    && let Err(e) = sock.send_to(&reply, peer).await
                {
                    tracing::warn!(error = %e, %peer, "knock reply not sent");
                }
            }
            // Operator problems are warnings; a client's bad knock is debug
            // (counted and summarised every interval either way).
            Err(e @ (Refusal::SlotsExhausted | Refusal::Kernel(_))) => {
                tracing::warn!(event = "knock_refused", reason = e.reason(), %peer, detail = %e)
            }
            Err(e) => {
                tracing::debug!(event = "knock_refused", reason = e.reason(), %peer, detail = %e)
            }
        }
    }
}

/// One interval: counter deltas, sampled drops, expired admissions.
fn report(
    maps: &mut Maps,
    last: [u64; Reason::COUNT as usize],
) -> anyhow::Result<[u64; Reason::COUNT as usize]> {
    let now = maps.reason_counts()?;
    for r in Reason::ALL {
        let delta = now[r as usize].saturating_sub(last[r as usize]);
        if delta > 0 && r.is_drop() {
            tracing::info!(event = "drops", reason = r.name(), count = delta, "dropped");
        }
    }
    for ev in maps.drain_events(1024) {
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
