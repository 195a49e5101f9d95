//! The running agent's interval reports: kernel counters and sampled drops
//! into the drop record, spend into cost reports, the links' health into
//! lifecycle events.

use std::{collections::HashSet, path::Path, time::SystemTime};

use portcullis_common::Reason;
use portcullis_proto::v1::{self, event::Body, lifecycle::Phase};

use crate::{
    accounting::{Accountant, totals::CostTotals},
    audit::{
        auditor::Auditor,
        drop_marks::{self, DropMark},
        drops::DropAccumulator,
    },
    config::Config,
    enforce::Enforcer,
    loader::{
        LinkTrouble, LinkWatch,
        maps::{TableFill, bytes_addr},
    },
};

/// Tables this full are logged at every summary.
const TABLE_WARN_PERCENT: u32 = 80;

/// One interval: counter deltas, sampled drops, expired admissions.
pub fn report(
    enforcer: &Enforcer,
    last: Vec<u64>,
    drops: &mut DropAccumulator,
) -> anyhow::Result<Vec<u64>> {
    let (now, samples) = enforcer.observe(|m| {
        let counts = m.reason_counts().map(|c| c.to_vec());
        (counts, m.drain_events(1024))
    });
    let now = now?;
    drops.add_counts(&last, &now);
    for r in Reason::ALL {
        let delta = now[r as usize].saturating_sub(last.get(r as usize).copied().unwrap_or(0));
        if delta > 0 && r.is_drop() {
            tracing::info!(event = "drops", reason = r.name(), count = delta, "dropped");
        }
    }
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
    let reaped = enforcer.expire()?;
    if reaped > 0 {
        tracing::info!(event = "expired", count = reaped, "admissions expired");
    }
    Ok(now)
}

/// The drop record's starting point: the last summary's counters (from the
/// mark file or the spool) if they are of the kernel's current counter map,
/// zero if the map is new. The accumulator then holds everything since.
pub fn resume_drops(
    spool_dir: &Path,
    auditor: &Auditor,
    enforcer: &Enforcer,
) -> anyhow::Result<(DropAccumulator, Vec<u64>)> {
    let mark = drop_marks::recover(spool_dir, auditor).unwrap_or_else(|e| {
        tracing::error!(event = "drop_marks_unreadable", error = %e, "reporting every drop of the counter map");
        None
    });
    let instance = enforcer.observe(|m| m.drops_instance())?;
    let baseline = DropMark::baseline_for(mark.as_ref(), &instance);
    let since = mark
        .as_ref()
        .filter(|m| m.instance == instance)
        .map_or_else(SystemTime::now, |m| {
            portcullis_trail::time::from_unix_ns(m.at_unix_ns)
        });
    let mut drops = DropAccumulator::since_restart(since);
    drops.set_instance(&instance);
    let last = report(enforcer, baseline, &mut drops)?;
    Ok((drops, last))
}

/// Records the interval's drop summary (with the kernel's table fill) and,
/// once it is durable, the mark the next start reports from. A full spool
/// defers the summary: the counts keep accumulating into the next one.
pub async fn record_drops(
    auditor: &Auditor,
    cfg: &Config,
    enforcer: &Enforcer,
    drops: &mut DropAccumulator,
    flows_live: Option<u32>,
    now: SystemTime,
) {
    match enforcer.observe(|m| m.occupancy(flows_live)) {
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

fn table_fill(t: TableFill) -> v1::TableFill {
    v1::TableFill {
        map: t.map.to_string(),
        entries: t.entries,
        capacity: t.capacity,
        knob: t.knob.to_string(),
    }
}

/// Checks the pinned links; `Some(reason)` when enforcement is lost and
/// the agent must stop (its supervisor restarts it, which attaches anew).
pub fn watch_links(
    links: &LinkWatch,
    auditor: &Auditor,
    unpinned_reported: &mut HashSet<String>,
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
        key_id: portcullis_trail::chain::key_id(&auditor.public_key()),
        reason,
        ..Default::default()
    };
    if let Err(e) = auditor.record(Body::Lifecycle(ev)) {
        tracing::error!(event = "audit_failed", error = %e, "lifecycle event not recorded");
    }
}

/// One accounting tick: the kernel's cumulative usage becomes spend. A
/// ledger write error is logged; the next tick's write persists it.
pub fn account(enforcer: &Enforcer, acct: &mut Accountant) {
    let read = enforcer.observe(|m| m.usage().and_then(|rows| Ok((rows, m.usage_instance()?))));
    // A failed read skips this tick: the counters are cumulative, so the
    // next read charges what this one missed.
    let (rows, instance) = match read {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(event = "usage_read_failed", error = %e, "usage not charged this second");
            return;
        }
    };
    if let Err(e) = acct.tick(SystemTime::now(), &instance, &rows) {
        tracing::error!(event = "ledger_write_failed", error = %e, "spend to date not persisted");
    }
}

/// The cost report of the interval, if there was usage. A full spool
/// defers it: the next report covers both intervals.
pub fn report_cost(auditor: &Auditor, acct: &mut Accountant, costs: &CostTotals, now: SystemTime) {
    let Some(report) = acct.take_report(now) else {
        return;
    };
    let recorded = report.clone();
    match auditor.record(Body::CostReport(report)) {
        Ok(()) => {
            costs.add(&recorded);
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
