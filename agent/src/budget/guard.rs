//! The extraction guard: per identity, response bytes over the last
//! minute against `[cost_control.extraction]`: a ceiling, a ratio to the
//! request bytes of the same minute, and a multiple of the identity's own
//! trailing per-minute average. Crossing any of them (once the minute's
//! output is at least `min_bytes_per_min`) opens an "extraction" episode:
//! a Detection (OCSF Detection Finding) with the figures, and the
//! identity's egress capped in TC until its output has stayed under for
//! `hold`. Decisions only: the budget loop writes the cap and records the
//! detection (`agent/src/daemon/budgets.rs`).

use std::{
    collections::{HashMap, VecDeque},
    time::SystemTime,
};

use portcullis_proto::v1::Detection;

use crate::{config::ExtractionSection, findings::Episodes};

/// Seconds one reading covers.
const WINDOW_SECS: i64 = 60;

#[derive(Debug, Default)]
struct Track {
    /// (second, bytes in, bytes out) of the last minute.
    secs: VecDeque<(i64, u64, u64)>,
    /// Totals of the last completed minutes (not those it was over in),
    /// newest last, and the minute being filled.
    minutes: VecDeque<u64>,
    minute: i64,
    minute_out: u64,
    minute_over: bool,
    last_traffic: i64,
}

/// One identity's last reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub out_per_min: u64,
    pub in_per_min: u64,
    /// The trailing per-minute average, once `baseline_minutes` are known.
    pub baseline_per_min: Option<u64>,
    /// The lowest of the thresholds that apply now.
    pub threshold: u64,
}

impl Figures {
    /// Response bytes per request byte (request bytes of 0 count as 1).
    pub fn ratio(&self) -> u64 {
        self.out_per_min / self.in_per_min.max(1)
    }
}

#[derive(Default)]
pub struct Guard {
    tracks: HashMap<String, Track>,
    episodes: Episodes,
    last: HashMap<String, Figures>,
}

impl Guard {
    /// One second: `traffic` is each identity's (bytes in, bytes out) of
    /// the second (kernel counters, all services), `t` the second. Returns
    /// the detections that opened or closed.
    pub fn observe(
        &mut self,
        cfg: &ExtractionSection,
        now: SystemTime,
        t: i64,
        traffic: &HashMap<String, (u64, u64)>,
    ) -> Vec<Detection> {
        for (who, &(bytes_in, bytes_out)) in traffic {
            let tr = self.tracks.entry(who.clone()).or_default();
            tr.secs.push_back((t, bytes_in, bytes_out));
            tr.last_traffic = t;
        }
        let mut found = Vec::new();
        let keep_for = WINDOW_SECS * (i64::from(cfg.baseline_minutes) + 1);
        self.last.clear();
        let open: Vec<String> = self.episodes.open_subjects().map(str::to_string).collect();
        self.tracks
            .retain(|who, tr| tr.last_traffic > t - keep_for || open.iter().any(|o| o == who));
        for (who, tr) in &mut self.tracks {
            while tr
                .secs
                .front()
                .is_some_and(|(s, _, _)| *s <= t - WINDOW_SECS)
            {
                tr.secs.pop_front();
            }
            let (in_min, out_min) = tr.secs.iter().fold((0u64, 0u64), |(i, o), (_, a, b)| {
                (i.saturating_add(*a), o.saturating_add(*b))
            });
            // Per-minute totals for the baseline.
            let minute = t.div_euclid(WINDOW_SECS);
            if minute != tr.minute {
                if tr.minute != 0 && !tr.minute_over {
                    tr.minutes.push_back(tr.minute_out);
                    // Minutes with no traffic at all count as zero.
                    let gap = (minute - tr.minute - 1).clamp(0, i64::from(cfg.baseline_minutes));
                    for _ in 0..gap {
                        tr.minutes.push_back(0);
                    }
                }
                while tr.minutes.len() > cfg.baseline_minutes as usize {
                    tr.minutes.pop_front();
                }
                tr.minute = minute;
                tr.minute_out = 0;
                tr.minute_over = false;
            }
            tr.minute_out = tr
                .minute_out
                .saturating_add(traffic.get(who).map_or(0, |x| x.1));
            let baseline = (tr.minutes.len() >= cfg.baseline_minutes as usize
                && !tr.minutes.is_empty())
            .then(|| tr.minutes.iter().sum::<u64>() / tr.minutes.len() as u64);
            let mut threshold = u64::MAX;
            if cfg.egress_bytes_per_min > 0 {
                threshold = threshold.min(cfg.egress_bytes_per_min);
            }
            if cfg.ratio > 0 {
                threshold = threshold.min(in_min.max(1).saturating_mul(cfg.ratio));
            }
            if cfg.baseline_factor > 0
                && let Some(b) = baseline
            {
                threshold = threshold.min(b.max(1).saturating_mul(cfg.baseline_factor));
            }
            // Nothing fires below the floor.
            let threshold = threshold.max(cfg.min_bytes_per_min.saturating_sub(1));
            let f = Figures {
                out_per_min: out_min,
                in_per_min: in_min,
                baseline_per_min: baseline,
                threshold,
            };
            if out_min > threshold {
                tr.minute_over = true;
            }
            let cap = cfg.cap_bytes_per_sec;
            let minutes = cfg.baseline_minutes;
            if let Some(mut d) = self.episodes.observe(
                "extraction",
                who,
                out_min,
                threshold,
                cfg.hold,
                now,
                || {
                    format!(
                        "{out_min} response bytes in the last 60 s for {in_min} request bytes (ratio {}), trailing average {} over {minutes} min; egress capped at {cap} B/s",
                        f.ratio(),
                        baseline.map_or_else(|| "not yet known".to_string(), |b| format!("{b} B/min")),
                    )
                },
            ) {
                if !d.open {
                    d.detail = format!("egress cap of {cap} B/s lifted");
                }
                found.push(d);
            }
            self.last.insert(who.clone(), f);
        }
        found
    }

    /// Identities whose egress is capped now.
    pub fn capped(&self) -> impl Iterator<Item = &str> {
        self.episodes.open_subjects()
    }

    /// The last reading of an identity with recent traffic.
    pub fn figures(&self, identity: &str) -> Option<Figures> {
        self.last.get(identity).copied()
    }

    /// Episodes opened since start.
    pub fn opened(&self) -> u64 {
        self.episodes.opened
    }
}
