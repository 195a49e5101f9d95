//! Once a second: the figures the detections watch (refusals per service
//! from the kernel, knock refusals, the collector's acknowledgements) go to
//! `agent/src/findings.rs`, and the detections it returns go into the
//! audit trail and the log. Metrics read [`FindingsView`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::SystemTime,
};

use portcullis_common::Reason;
use portcullis_proto::v1::{Detection, event::Body};

use super::node::Node;
use crate::findings::Episodes;

/// What the metrics show of the detections.
#[derive(Debug, Default, Clone)]
pub struct FindingsView {
    /// (kind, subject) of each open episode.
    pub open: Vec<(String, String)>,
    /// Episodes opened since start, per kind.
    pub opened: BTreeMap<String, u64>,
    /// Seconds since the collector last acknowledged while events wait
    /// for it (0: nothing waits, or no collector).
    pub collector_lag_secs: u64,
}

pub struct Detector {
    flood: Episodes,
    refusals: Episodes,
    stall: Episodes,
    /// Last readings: per service id, refusals in all, the acknowledged
    /// seq and when it last moved.
    service_drops: HashMap<u32, u64>,
    refused: Option<u64>,
    acked: (u64, SystemTime),
}

impl Detector {
    pub fn new(now: SystemTime) -> Detector {
        Detector {
            flood: Episodes::default(),
            refusals: Episodes::default(),
            stall: Episodes::default(),
            service_drops: HashMap::new(),
            refused: None,
            acked: (0, now),
        }
    }

    /// One second's readings; records what opened or closed.
    pub fn tick(&mut self, node: &Node, view: &Mutex<FindingsView>, now: SystemTime) {
        let cfg = node.cfg();
        let f = cfg.findings;
        let mut found: Vec<Detection> = Vec::new();
        let read = node.enforcer.observe(|m| {
            Ok::<_, crate::loader::KernelError>((m.service_drops()?, m.reason_counts()?))
        });
        let (drops, counts) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(event = "findings_read_failed", error = %e, "detections skipped this second");
                return;
            }
        };
        for (id, total) in drops {
            let Some(svc) = cfg.services.iter().find(|s| s.id == id) else {
                continue;
            };
            // The first reading is the baseline, not a second's worth.
            let last = self.service_drops.insert(id, total).unwrap_or(total);
            let rate = total.saturating_sub(last);
            let shadow = node.enforcer.mode(id) == crate::config::ServiceMode::Shadow;
            found.extend(self.flood.observe(
                "flood",
                &svc.name,
                rate,
                f.flood_per_sec,
                f.quiet,
                now,
                || {
                    format!(
                        "port {}/{}{}",
                        svc.protocol.as_str(),
                        svc.port,
                        if shadow { ", shadow mode (passed)" } else { "" }
                    )
                },
            ));
        }
        let kernel_knock =
            counts[Reason::KnockSourceRate as usize] + counts[Reason::KnockGlobalRate as usize];
        let agent: u64 = node
            .knocks
            .as_ref()
            .map(|k| k.service.counters().snapshot().iter().map(|(_, n)| n).sum())
            .unwrap_or(0);
        let refused = kernel_knock + agent;
        let rate = refused.saturating_sub(self.refused.replace(refused).unwrap_or(refused));
        found.extend(self.refusals.observe(
            "refusal_storm",
            "node",
            rate,
            f.refusals_per_sec,
            f.quiet,
            now,
            || format!("{kernel_knock} over the kernel's knock limits, {agent} refused by the agent, since start"),
        ));
        let a = node.auditor.stats();
        if a.acked_seq != self.acked.0 {
            self.acked = (a.acked_seq, now);
        }
        let waiting = a.sealed_seq.saturating_sub(a.acked_seq);
        let stalled = if node.cfg().audit.collector.is_some() && waiting > 0 {
            now.duration_since(self.acked.1)
                .unwrap_or_default()
                .as_secs()
        } else {
            0
        };
        found.extend(self.stall.observe(
            "spool_stall",
            "node",
            stalled,
            f.spool_stall.as_secs(),
            f.quiet,
            now,
            || format!("{waiting} events wait for the collector"),
        ));
        for d in found {
            if d.open {
                tracing::warn!(event = "detection", kind = %d.kind, subject = %d.subject, rate = d.rate, threshold = d.threshold, "detection opened");
            } else {
                tracing::info!(event = "detection", kind = %d.kind, subject = %d.subject, peak = d.rate, total = d.total, duration_ms = d.duration_ms, "detection closed");
            }
            if let Err(e) = node.auditor.record(Body::Detection(d)) {
                tracing::error!(event = "audit_failed", error = %e, "detection not audited");
            }
        }
        let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
        v.collector_lag_secs = stalled;
        v.open = [
            ("flood", &self.flood),
            ("refusal_storm", &self.refusals),
            ("spool_stall", &self.stall),
        ]
        .iter()
        .flat_map(|(k, e)| e.open_subjects().map(|s| (k.to_string(), s.to_string())))
        .collect();
        for (k, e) in [
            ("flood", &self.flood),
            ("refusal_storm", &self.refusals),
            ("spool_stall", &self.stall),
        ] {
            v.opened.insert(k.to_string(), e.opened);
        }
    }
}
