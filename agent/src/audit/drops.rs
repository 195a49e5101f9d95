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

use portcullis_common::{DROP_COUNTERS, DropEvent, Reason, SHADOW_COUNTERS};
use portcullis_proto::v1::{DropSummary, ReasonCount, SourceCount, TableFill};

use crate::loader::maps::bytes_addr;
use portcullis_trail::time::unix_ns;

/// The name of `PCL_DROPS[i]`: the reason's, or `shadow_<reason>` for what
/// a shadow-mode service would have dropped.
pub fn counter_name(i: usize) -> Option<String> {
    let i = u32::try_from(i).ok().filter(|i| *i < DROP_COUNTERS)?;
    match i.checked_sub(SHADOW_COUNTERS) {
        Some(r) => Reason::from_u32(r).map(|r| format!("shadow_{}", r.name())),
        None => Reason::from_u32(i).map(|r| r.name().to_string()),
    }
}

/// Whether counter `i` counts packets the kernel dropped (or, for a
/// shadow-mode service, would have).
fn counts_drops(i: usize) -> bool {
    let r = (i as u32) % SHADOW_COUNTERS;
    Reason::from_u32(r).is_some_and(Reason::is_drop)
}

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
    /// The kernel's cumulative counters as last added, and their map.
    totals: Vec<u64>,
    instance: String,
    /// This interval began before the agent (re)started.
    since_restart: bool,
    tables: Vec<TableFill>,
    /// Fill percent per table as last reported: a change is news.
    reported_fill: Vec<(String, u32)>,
}

impl DropAccumulator {
    pub fn new(start: SystemTime) -> DropAccumulator {
        DropAccumulator {
            start,
            reasons: HashMap::new(),
            sources: HashMap::new(),
            sampled: 0,
            totals: Vec::new(),
            instance: String::new(),
            since_restart: false,
            tables: Vec::new(),
            reported_fill: Vec::new(),
        }
    }

    /// The interval that began at `start`, before this agent started: its
    /// summary says so.
    pub fn since_restart(start: SystemTime) -> DropAccumulator {
        DropAccumulator {
            since_restart: true,
            ..DropAccumulator::new(start)
        }
    }

    /// Which counter map the totals come from (see
    /// `Maps::drops_instance`).
    pub fn set_instance(&mut self, instance: &str) {
        self.instance = instance.to_owned();
    }

    /// How full the kernel tables are, for the next summary.
    pub fn set_tables(&mut self, tables: Vec<TableFill>) {
        self.tables = tables;
    }

    /// The kernel's cumulative counters the summary will report.
    pub fn totals(&self) -> &[u64] {
        &self.totals
    }

    /// Kernel drop-counter deltas since the previous call; `now` becomes
    /// the totals the next summary reports.
    pub fn add_counts(&mut self, before: &[u64], now: &[u64]) {
        self.totals = now.to_vec();
        for i in 0..DROP_COUNTERS as usize {
            let (Some(n), Some(name)) = (now.get(i), counter_name(i)) else {
                continue;
            };
            let delta = n.saturating_sub(before.get(i).copied().unwrap_or(0));
            if delta > 0 && counts_drops(i) {
                *self.reasons.entry(name).or_default() += delta;
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

    /// Whether a summary is due even without drops: the first one after a
    /// restart always goes out, so the trail records the counters it
    /// starts from.
    pub fn has_news(&self) -> bool {
        !self.is_empty() || self.since_restart || self.fill() != self.reported_fill
    }

    /// Whole-percent fill of each table: what counts as a change.
    fn fill(&self) -> Vec<(String, u32)> {
        self.tables
            .iter()
            .map(|t| {
                let pct = (u64::from(t.entries) * 100)
                    .checked_div(u64::from(t.capacity))
                    .unwrap_or(0);
                (t.map.clone(), pct as u32)
            })
            .collect()
    }

    /// The summary of everything accumulated, or `None` if nothing was
    /// dropped. Does not reset: call [`DropAccumulator::reset`] once the
    /// summary was recorded.
    pub fn summary(&self, now: SystemTime) -> Option<DropSummary> {
        if !self.has_news() {
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
            // Every reason; shadow counters once they count anything.
            kernel_totals: self
                .totals
                .iter()
                .enumerate()
                .filter(|(i, n)| *i < SHADOW_COUNTERS as usize || **n > 0)
                .filter_map(|(i, n)| {
                    counter_name(i).map(|reason| ReasonCount {
                        reason,
                        packets: *n,
                    })
                })
                .collect(),
            counters_instance: self.instance.clone(),
            since_restart: self.since_restart,
            tables: self.tables.clone(),
        })
    }

    /// Starts the next interval at `now` (same counters, same map; the
    /// table fill just reported is the one later changes are measured
    /// against).
    pub fn reset(&mut self, now: SystemTime) {
        let totals = std::mem::take(&mut self.totals);
        let instance = std::mem::take(&mut self.instance);
        let reported_fill = self.fill();
        let tables = std::mem::take(&mut self.tables);
        *self = DropAccumulator::new(now);
        self.totals = totals;
        self.instance = instance;
        self.reported_fill = reported_fill;
        self.tables = tables;
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

    fn fill(map: &str, entries: u32) -> TableFill {
        TableFill {
            map: map.into(),
            entries,
            capacity: 200,
            knob: "kernel.max_admissions".into(),
        }
    }

    /// A summary carries the kernel's totals, the map they come from and
    /// the table fill; a fill change alone is news, an unchanged one is
    /// not; the first summary after a restart always goes out.
    #[test]
    fn totals_restarts_and_table_fill() {
        let t0 = SystemTime::now();
        let mut acc = DropAccumulator::since_restart(t0);
        acc.set_instance("boot/9");
        let zero = vec![0u64; Reason::COUNT as usize];
        let mut now = zero.clone();
        now[Reason::Passed as usize] = 5;
        acc.add_counts(&zero, &now);
        acc.set_tables(vec![fill("PCL_ADMIT", 10)]);
        let s = acc.summary(t0).expect("a restart is always reported");
        assert!(s.since_restart && s.reasons.is_empty());
        assert_eq!(s.counters_instance, "boot/9");
        assert_eq!(s.kernel_totals[0].reason, "passed");
        assert_eq!(s.kernel_totals[0].packets, 5);
        assert_eq!(s.kernel_totals.len(), Reason::COUNT as usize);
        assert_eq!(s.tables.len(), 1);
        acc.reset(t0);
        // Same fill (10 of 200 and 11 of 200 are both 5%): nothing to say.
        acc.set_tables(vec![fill("PCL_ADMIT", 11)]);
        assert!(acc.summary(t0).is_none());
        acc.set_tables(vec![fill("PCL_ADMIT", 160)]);
        let s = acc.summary(t0).expect("80% full is news");
        assert!(!s.since_restart);
        assert_eq!(s.kernel_totals[0].packets, 5, "totals carry over a reset");
    }

    #[test]
    fn shadow_counters_are_reported_with_their_mark() {
        let mut d = DropAccumulator::new(SystemTime::UNIX_EPOCH);
        let before = vec![0u64; DROP_COUNTERS as usize];
        let mut now = before.clone();
        now[Reason::NoAdmission as usize] = 2;
        now[(SHADOW_COUNTERS + Reason::NoAdmission as u32) as usize] = 7;
        now[(SHADOW_COUNTERS + Reason::Passed as u32) as usize] = 0;
        d.add_counts(&before, &now);
        let s = d
            .summary(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
            .unwrap();
        let get =
            |v: &[ReasonCount], name: &str| v.iter().find(|r| r.reason == name).map(|r| r.packets);
        assert_eq!(get(&s.reasons, "no_admission"), Some(2));
        assert_eq!(get(&s.reasons, "shadow_no_admission"), Some(7));
        assert_eq!(get(&s.kernel_totals, "shadow_no_admission"), Some(7));
        // Shadow counters that never moved stay out of the totals.
        assert_eq!(get(&s.kernel_totals, "shadow_expired"), None);
        assert_eq!(counter_name(DROP_COUNTERS as usize), None);
        assert_eq!(counter_name(0).as_deref(), Some("passed"));
    }
}
