//! Failed handshakes, bounded. Anyone who can reach the collector can fail
//! a handshake, so one finding per failure would let an unauthenticated
//! peer fill the SIEM's disk. Per source address and window, the first
//! failure is reported at once and the rest as one finding with a count
//! when the window ends; across all sources at most
//! [`GuardLimits::findings_per_window`] findings are written per window
//! (the rest are summed into one); a source that keeps failing is refused
//! on sight until the window ends. Findings about enrolled nodes' chains
//! (chain breaks, bad signatures in their events) do not pass through here:
//! they are always written.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use portcullis_trail::verify::{Finding, FindingKind};

/// The bounds.
#[derive(Clone, Copy, Debug)]
pub struct GuardLimits {
    pub window: Duration,
    /// Findings about failed handshakes written per window, in all.
    pub findings_per_window: u32,
    /// Failures from one source in a window after which its streams are
    /// refused on sight.
    pub throttle_after: u32,
}

impl Default for GuardLimits {
    fn default() -> Self {
        GuardLimits {
            window: Duration::from_secs(60),
            findings_per_window: 60,
            throttle_after: 20,
        }
    }
}

#[derive(Debug, Default)]
struct Source {
    failures: u64,
    /// Failures already covered by a written finding.
    reported: u64,
    /// What the latest failure was.
    kind: Option<FindingKind>,
    node: String,
    message: String,
}

/// A finding to write, and from where.
pub type Report = (Finding, Option<IpAddr>);

/// The per-window state.
#[derive(Debug)]
pub struct HandshakeGuard {
    limits: GuardLimits,
    started: Instant,
    sources: HashMap<Option<IpAddr>, Source>,
    written: u32,
    /// Failures (and their sources) no finding could be written for.
    suppressed: u64,
    suppressed_sources: u64,
}

impl HandshakeGuard {
    pub fn new(limits: GuardLimits) -> HandshakeGuard {
        HandshakeGuard {
            limits,
            started: Instant::now(),
            sources: HashMap::new(),
            written: 0,
            suppressed: 0,
            suppressed_sources: 0,
        }
    }

    /// Whether `peer` failed so often in this window that its streams are
    /// refused without a look.
    pub fn throttled(&self, peer: Option<IpAddr>) -> bool {
        self.sources
            .get(&peer)
            .is_some_and(|s| s.failures >= u64::from(self.limits.throttle_after))
    }

    /// Counts a failed handshake; returns the finding to write now (the
    /// source's first in this window, while the window's budget lasts).
    pub fn failed(&mut self, peer: Option<IpAddr>, finding: Finding) -> Option<Report> {
        let budget = self.written < self.limits.findings_per_window;
        let s = self.sources.entry(peer).or_default();
        s.failures += 1;
        s.kind = Some(finding.kind);
        s.node.clone_from(&finding.node_id);
        s.message.clone_from(&finding.message);
        if s.failures > 1 {
            return None;
        }
        if !budget {
            self.suppressed += 1;
            self.suppressed_sources += 1;
            s.reported = 1;
            return None;
        }
        s.reported = 1;
        self.written += 1;
        Some((finding, peer))
    }

    /// At the end of a window (or when `now` is past it): one finding per
    /// source with failures not yet reported, within the budget, and one
    /// for everything suppressed; then a new window starts.
    pub fn flush(&mut self, now: Instant) -> Vec<Report> {
        if now.duration_since(self.started) < self.limits.window {
            return Vec::new();
        }
        self.flush_all(now)
    }

    /// Writes out the window now, over or not (the collector is stopping).
    pub fn flush_all(&mut self, now: Instant) -> Vec<Report> {
        let secs = self.limits.window.as_secs().max(1);
        let mut out = Vec::new();
        let mut written = 0u32;
        let mut sources: Vec<_> = std::mem::take(&mut self.sources).into_iter().collect();
        // The noisiest first, so the budget goes where it tells the most.
        sources.sort_by_key(|s| std::cmp::Reverse(s.1.failures));
        for (peer, s) in sources {
            let more = s.failures - s.reported;
            if more == 0 {
                continue;
            }
            if written >= self.limits.findings_per_window {
                self.suppressed += more;
                self.suppressed_sources += 1;
                continue;
            }
            written += 1;
            let finding = Finding {
                kind: s.kind.unwrap_or(FindingKind::BadSignature),
                node_id: s.node.clone(),
                seq: 0,
                message: format!(
                    "{more} more failed handshakes from this source in {secs} s (the latest: {}){}",
                    s.message,
                    if s.failures >= u64::from(self.limits.throttle_after) {
                        "; its streams were refused on sight for the rest of the window"
                    } else {
                        ""
                    }
                ),
            };
            out.push((finding, peer));
        }
        if self.suppressed > 0 {
            out.push((
                Finding {
                    kind: FindingKind::BadSignature,
                    node_id: String::new(),
                    seq: 0,
                    message: format!(
                        "{} failed handshakes from {} sources in {secs} s were not reported one by one (finding budget of {} per window spent)",
                        self.suppressed, self.suppressed_sources, self.limits.findings_per_window
                    ),
                },
                None,
            ));
        }
        self.started = now;
        self.written = 0;
        self.suppressed = 0;
        self.suppressed_sources = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(node: &str) -> Finding {
        Finding {
            kind: FindingKind::BadSignature,
            node_id: node.into(),
            seq: 0,
            message: "proof does not verify".into(),
        }
    }

    #[test]
    fn a_thousand_failures_from_one_source_are_two_findings() {
        let limits = GuardLimits {
            window: Duration::from_secs(60),
            findings_per_window: 60,
            throttle_after: 20,
        };
        let mut g = HandshakeGuard::new(limits);
        let peer = Some("192.0.2.7".parse().unwrap());
        let mut now = 0;
        for i in 0..1000 {
            if g.failed(peer, f("n1")).is_some() {
                now += 1;
            }
            assert_eq!(g.throttled(peer), i + 1 >= 20);
        }
        assert_eq!(now, 1);
        assert!(g.flush(Instant::now()).is_empty(), "the window is not over");
        let later = Instant::now() + Duration::from_secs(61);
        let out = g.flush(later);
        assert_eq!(out.len(), 1);
        assert!(
            out[0].0.message.starts_with("999 more"),
            "{}",
            out[0].0.message
        );
        assert!(!g.throttled(peer), "a new window");
    }

    #[test]
    fn many_sources_share_one_budget() {
        let limits = GuardLimits {
            window: Duration::from_secs(1),
            findings_per_window: 5,
            throttle_after: 20,
        };
        let mut g = HandshakeGuard::new(limits);
        let written = (0..1000u32)
            .filter(|i| {
                let peer = Some(IpAddr::from(i.to_be_bytes()));
                g.failed(peer, f("n")).is_some()
            })
            .count();
        assert_eq!(written, 5);
        let out = g.flush(Instant::now() + Duration::from_secs(2));
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(
            out[0]
                .0
                .message
                .starts_with("995 failed handshakes from 995 sources")
        );
    }
}
