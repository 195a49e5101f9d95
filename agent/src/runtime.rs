//! `portcullis agent`: open (or adopt) the kernel state, apply the config,
//! then every interval read counters, drain sampled drops and reap expired
//! admissions, until SIGTERM/SIGINT. Exiting leaves everything pinned: the
//! kernel keeps enforcing (fail static).

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use portcullis_common::Reason;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    apply,
    config::Config,
    kernel::{Kernel, Maps, Origin, clock, maps::bytes_addr},
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

pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<()> {
    let kopts = apply::kernel_options(&cfg.kernel);
    let mut kernel = Kernel::open(&kopts).context("opening the kernel programs")?;
    let installed = apply::apply(&mut kernel.maps, &cfg, kernel.origin)
        .context("writing the configuration into the kernel maps")?;
    tracing::info!(
        event = "ready",
        origin = origin_word(kernel.origin),
        node = %cfg.agent.node_id,
        interfaces = ?cfg.kernel.interfaces,
        pin_dir = %cfg.kernel.pin_dir.display(),
        services = cfg.services.len(),
        static_admissions = installed,
        "portcullis agent enforcing"
    );
    if let Some(path) = &opts.ready_file {
        write_ready(path, origin_word(kernel.origin))?;
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(cfg.agent.stats_interval);
    // `events_per_sec` is a per-second budget the kernel only counts down.
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut last = kernel.maps.reason_counts()?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                last = report(&mut kernel.maps, last)?;
            }
            _ = second.tick() => {
                kernel.maps.reset_event_budget()?;
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
