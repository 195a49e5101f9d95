//! Real-time detections as episodes: fed one reading per second, an
//! [`Episodes`] returns a `Detection` when a figure first crosses its
//! threshold (within the second it happens) and another once it has stayed
//! below for `findings.quiet_secs`, with the episode's peak and total.
//! Decisions only: the caller records the events
//! (`agent/src/daemon/detect.rs`).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use portcullis_proto::v1::Detection;
use portcullis_trail::time::unix_ms;

/// One ongoing episode.
#[derive(Debug, Clone)]
struct Episode {
    started: SystemTime,
    peak: u64,
    total: u64,
    quiet_since: Option<SystemTime>,
}

/// Episodes of one kind, by subject (a service, or "node").
#[derive(Debug, Default)]
pub struct Episodes {
    open: BTreeMap<String, Episode>,
    /// Episodes opened since start.
    pub opened: u64,
}

impl Episodes {
    /// One second's reading `value` for `subject`: a `Detection` when an
    /// episode opens or closes. `threshold` 0 never opens one.
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        kind: &str,
        subject: &str,
        value: u64,
        threshold: u64,
        quiet: Duration,
        now: SystemTime,
        detail: impl FnOnce() -> String,
    ) -> Option<Detection> {
        let over = threshold > 0 && value > threshold;
        match self.open.get_mut(subject) {
            None if over => {
                self.open.insert(
                    subject.to_string(),
                    Episode {
                        started: now,
                        peak: value,
                        total: value,
                        quiet_since: None,
                    },
                );
                self.opened += 1;
                Some(Detection {
                    kind: kind.to_string(),
                    subject: subject.to_string(),
                    open: true,
                    rate: value,
                    threshold,
                    started_unix_ms: unix_ms(now),
                    detail: detail(),
                    ..Default::default()
                })
            }
            None => None,
            Some(e) => {
                e.total = e.total.saturating_add(value);
                e.peak = e.peak.max(value);
                if over {
                    e.quiet_since = None;
                    return None;
                }
                let since = *e.quiet_since.get_or_insert(now);
                if now.duration_since(since).unwrap_or_default() + Duration::from_secs(1) < quiet {
                    return None;
                }
                let e = self.open.remove(subject)?;
                let lasted = now.duration_since(e.started).unwrap_or_default();
                Some(Detection {
                    kind: kind.to_string(),
                    subject: subject.to_string(),
                    open: false,
                    rate: e.peak,
                    threshold,
                    started_unix_ms: unix_ms(e.started),
                    duration_ms: u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX),
                    total: e.total,
                    detail: String::new(),
                })
            }
        }
    }

    /// Subjects with an open episode.
    pub fn open_subjects(&self) -> impl Iterator<Item = &str> {
        self.open.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_opens_once_and_closes_after_the_quiet_time() {
        let mut e = Episodes::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let quiet = Duration::from_secs(3);
        let mut see = |s, v| e.observe("flood", "llm", v, 100, quiet, at(s), String::new);
        assert!(see(0, 50).is_none(), "under the threshold");
        let open = see(1, 500).expect("opens in the second it crosses");
        assert!(open.open && open.rate == 500 && open.threshold == 100);
        assert!(see(2, 900).is_none(), "once per episode");
        assert!(see(3, 10).is_none(), "quiet for 1 s");
        assert!(see(4, 400).is_none(), "over again: the same episode");
        assert!(see(5, 0).is_none());
        assert!(see(6, 0).is_none());
        let close = see(7, 0).expect("closes after 3 quiet seconds");
        assert!(!close.open);
        assert_eq!((close.rate, close.total), (900, 500 + 900 + 10 + 400));
        assert_eq!(close.duration_ms, 6_000);
        assert_eq!(close.started_unix_ms, open.started_unix_ms);
        assert!(see(8, 0).is_none());
        assert!(see(9, 101).is_some(), "a new episode");
        assert_eq!(e.opened, 2);
    }

    #[test]
    fn a_zero_threshold_is_off_and_subjects_are_apart() {
        let mut e = Episodes::default();
        let t = SystemTime::UNIX_EPOCH;
        let q = Duration::from_secs(1);
        assert!(
            e.observe("flood", "a", u64::MAX, 0, q, t, String::new)
                .is_none()
        );
        assert!(e.observe("flood", "a", 5, 1, q, t, String::new).is_some());
        assert!(e.observe("flood", "b", 5, 1, q, t, String::new).is_some());
        assert_eq!(e.open_subjects().collect::<Vec<_>>(), vec!["a", "b"]);
    }
}
