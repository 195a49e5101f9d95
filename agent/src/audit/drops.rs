//! Drop summaries: one event per report interval with the packets dropped
//! per reason (from the kernel's per-CPU counters), knocks refused before
//! authentication (per reason), and the sources seen most often in the
//! sampled ring buffer. Never one event per packet: a flood costs the audit
//! trail one line per interval.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use portcullis_common::{DropEvent, Reason};
use portcullis_proto::v1::{DropSummary, ReasonCount, SourceCount};

use crate::kernel::{clock::unix_ns, maps::bytes_addr};

/// Sources listed per summary.
pub const TOP_SOURCES: usize = 10;
/// Distinct sources remembered per interval; past it, new sources are only
/// counted in `sampled` (a spoofed-source flood cannot grow memory).
const MAX_TRACKED_SOURCES: usize = 4096;

/// Sampled drops of one source: in all, and per reason.
type SourceTally = (u64, HashMap<u32, u64>);

/// Accumulates one interval. When the audit spool cannot take the summary
/// (full), the caller keeps accumulating and the next summary covers both
/// intervals.
pub struct DropAccumulator {
    start: SystemTime,
    reasons: HashMap<String, u64>,
    sources: HashMap<IpAddr, SourceTally>,
    sampled: u64,
}

impl DropAccumulator {
    pub fn new(start: SystemTime) -> DropAccumulator {
        DropAccumulator {
            start,
            reasons: HashMap::new(),
            sources: HashMap::new(),
            sampled: 0,
        }
    }

    /// Kernel drop-counter deltas since the previous call.
    pub fn add_counts(&mut self, before: &[u64], now: &[u64]) {
        for r in Reason::ALL {
            let i = r as usize;
            let (Some(b), Some(n)) = (before.get(i), now.get(i)) else {
                continue;
            };
            let delta = n.saturating_sub(*b);
            if delta > 0 && r.is_drop() {
                *self.reasons.entry(r.name().to_string()).or_default() += delta;
            }
        }
    }

    /// Refusals outside the kernel (knocks refused before their token
    /// verified), named `knock_<reason>`.
    pub fn add_refusals(&mut self, reason: &str, count: u64) {
        if count > 0 {
            *self.reasons.entry(format!("knock_{reason}")).or_default() += count;
        }
    }

    pub fn add_samples(&mut self, events: &[DropEvent]) {
        for ev in events {
            self.sampled += 1;
            let src = bytes_addr(ev.src);
            let tracked = self.sources.len();
            if let Some(e) = self.sources.get_mut(&src) {
                e.0 += 1;
                *e.1.entry(ev.reason).or_default() += 1;
            } else if tracked < MAX_TRACKED_SOURCES {
                self.sources
                    .insert(src, (1, HashMap::from([(ev.reason, 1)])));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.reasons.is_empty() && self.sampled == 0
    }

    /// The summary of everything accumulated, or `None` if nothing was
    /// dropped. Does not reset: call [`DropAccumulator::reset`] once the
    /// summary was recorded.
    pub fn summary(&self, now: SystemTime) -> Option<DropSummary> {
        if self.is_empty() {
            return None;
        }
        let mut reasons: Vec<ReasonCount> = self
            .reasons
            .iter()
            .map(|(r, n)| ReasonCount {
                reason: r.clone(),
                packets: *n,
            })
            .collect();
        reasons.sort_by(|a, b| b.packets.cmp(&a.packets).then(a.reason.cmp(&b.reason)));
        let mut top: Vec<(&IpAddr, &SourceTally)> = self.sources.iter().collect();
        top.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
        let top_sources = top
            .into_iter()
            .take(TOP_SOURCES)
            .map(|(src, (n, by_reason))| {
                let reason = by_reason
                    .iter()
                    .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                    .map(|(r, _)| *r);
                SourceCount {
                    source: src.to_string(),
                    sampled: *n,
                    top_reason: reason
                        .and_then(Reason::from_u32)
                        .map_or("unknown", Reason::name)
                        .to_string(),
                }
            })
            .collect();
        Some(DropSummary {
            interval_start_unix_ns: unix_ns(self.start),
            interval_ns: u64::try_from(
                now.duration_since(self.start)
                    .unwrap_or(Duration::ZERO)
                    .as_nanos(),
            )
            .unwrap_or(u64::MAX),
            reasons,
            top_sources,
            sampled: self.sampled,
        })
    }

    /// Starts the next interval at `now`.
    pub fn reset(&mut self, now: SystemTime) {
        *self = DropAccumulator::new(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_common::v4_mapped;

    fn ev(src: [u8; 4], reason: Reason) -> DropEvent {
        DropEvent {
            src: v4_mapped(src),
            reason: reason as u32,
            ..DropEvent::default()
        }
    }

    #[test]
    fn counts_deltas_refusals_and_top_sources() {
        let t0 = SystemTime::now();
        let mut acc = DropAccumulator::new(t0);
        assert!(acc.summary(t0).is_none(), "nothing dropped: no event");
        let before = vec![0u64; Reason::COUNT as usize];
        let mut now = before.clone();
        now[Reason::NoAdmission as usize] = 7;
        now[Reason::Passed as usize] = 100; // not a drop: never summarised
        acc.add_counts(&before, &now);
        acc.add_refusals("stale", 2);
        acc.add_refusals("replay", 0);
        let mut samples = vec![ev([10, 0, 0, 1], Reason::NoAdmission); 5];
        samples.push(ev([10, 0, 0, 2], Reason::NoAdmission));
        samples.push(ev([10, 0, 0, 1], Reason::ConnRate));
        acc.add_samples(&samples);
        let s = acc
            .summary(t0 + Duration::from_secs(10))
            .expect("a summary");
        assert_eq!(s.interval_ns, 10_000_000_000);
        assert_eq!(s.sampled, 7);
        let reasons: Vec<(&str, u64)> = s
            .reasons
            .iter()
            .map(|r| (r.reason.as_str(), r.packets))
            .collect();
        assert_eq!(
            reasons,
            vec![(Reason::NoAdmission.name(), 7), ("knock_stale", 2)]
        );
        assert_eq!(s.top_sources[0].source, "10.0.0.1");
        assert_eq!(s.top_sources[0].sampled, 6);
        assert_eq!(s.top_sources[0].top_reason, Reason::NoAdmission.name());
        assert_eq!(s.top_sources[1].source, "10.0.0.2");
        acc.reset(t0);
        assert!(acc.is_empty());
    }

    #[test]
    fn a_spoofed_source_flood_is_bounded() {
        let mut acc = DropAccumulator::new(SystemTime::now());
        let flood: Vec<DropEvent> = (0..20_000u32)
            .map(|i| ev(i.to_be_bytes(), Reason::NoAdmission))
            .collect();
        acc.add_samples(&flood);
        assert_eq!(acc.sources.len(), MAX_TRACKED_SOURCES);
        let s = acc.summary(SystemTime::now()).unwrap();
        assert_eq!(s.sampled, 20_000);
        assert_eq!(s.top_sources.len(), TOP_SOURCES);
    }
}
