//! Knock nonces seen recently: the replay check of the knock pipeline
//! (`knock/src/wire.rs` describes the datagram and its freshness window).

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use portcullis_knock::{KnockError, KnockLimits};

/// Nonces seen recently, bounded.
///
/// A knock stays fresh for up to 2 × window after it is first seen (its
/// timestamp may be a full window in the future and is then accepted until a
/// full window in the past), so each nonce is remembered for 2 × window.
/// When the cache is full even after dropping expired nonces, new knocks are
/// refused (`nonce_cache_full`): live nonces are never evicted, since that
/// would reopen them to replay.
#[derive(Debug)]
pub struct NonceCache {
    retention: Duration,
    max: usize,
    inner: Mutex<NonceInner>,
}

#[derive(Debug, Default)]
struct NonceInner {
    seen: HashSet<[u8; 16]>,
    /// (expiry, nonce) in insertion order.
    order: VecDeque<(Instant, [u8; 16])>,
}

impl NonceInner {
    fn purge(&mut self, now: Instant) {
        while let Some(&(expiry, nonce)) = self.order.front() {
            if expiry > now {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&nonce);
        }
    }
}

impl NonceCache {
    /// A cache for a freshness `window` holding at most `max_nonces`.
    pub fn new(window: Duration, max_nonces: usize) -> Self {
        NonceCache {
            retention: window.saturating_mul(2),
            max: max_nonces,
            inner: Mutex::new(NonceInner::default()),
        }
    }

    /// A cache sized from the limits.
    pub fn from_limits(limits: &KnockLimits) -> Self {
        Self::new(limits.window, limits.max_nonces)
    }

    /// Refuses a nonce seen within its retention (`replayed_nonce`), or any
    /// new one when full (`nonce_cache_full`); otherwise remembers it.
    /// `now` should not go backwards between calls (use `Instant::now()`).
    pub fn check_and_insert(&self, nonce: [u8; 16], now: Instant) -> Result<(), KnockError> {
        let mut inner = self.lock();
        inner.purge(now);
        if inner.seen.contains(&nonce) {
            return Err(KnockError::ReplayedNonce);
        }
        if inner.seen.len() >= self.max {
            return Err(KnockError::NonceCacheFull);
        }
        inner.seen.insert(nonce);
        inner.order.push_back((now + self.retention, nonce));
        Ok(())
    }

    /// Like [`check_and_insert`](Self::check_and_insert) but only looks:
    /// a cheap replay pre-check for callers that insert only after the
    /// token verified (so that unauthenticated knocks cannot fill the cache).
    pub fn check(&self, nonce: &[u8; 16], now: Instant) -> Result<(), KnockError> {
        let mut inner = self.lock();
        inner.purge(now);
        if inner.seen.contains(nonce) {
            Err(KnockError::ReplayedNonce)
        } else {
            Ok(())
        }
    }

    /// Forgets expired nonces now (they are also purged on every insert);
    /// for periodic upkeep so an idle cache does not hold memory.
    pub fn purge(&self, now: Instant) {
        self.lock().purge(now);
    }

    /// Nonces currently remembered (expired ones may still be counted until
    /// the next call purges them).
    pub fn len(&self) -> usize {
        self.lock().seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NonceInner> {
        // A panic while holding the lock cannot leave the set and the queue
        // inconsistent in a way that reopens a nonce; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_replay() {
        let w = Duration::from_secs(30);
        let c = NonceCache::new(w, 100);
        let t0 = Instant::now();
        c.check_and_insert([1; 16], t0).unwrap();
        c.check_and_insert([2; 16], t0).unwrap();
        assert_eq!(
            c.check_and_insert([1; 16], t0),
            Err(KnockError::ReplayedNonce)
        );
        assert_eq!(c.check(&[1; 16], t0), Err(KnockError::ReplayedNonce));
        c.check(&[3; 16], t0).unwrap();
        // Still refused after one window: a knock stamped a window in the
        // future is fresh for two windows.
        let t1 = t0 + w + Duration::from_secs(1);
        assert_eq!(
            c.check_and_insert([1; 16], t1).unwrap_err().reason(),
            "replayed_nonce"
        );
        // Forgotten after two windows.
        let t2 = t0 + 2 * w;
        c.check_and_insert([1; 16], t2).unwrap();
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn nonce_cache_full_fails_closed() {
        let w = Duration::from_secs(30);
        let c = NonceCache::new(w, 3);
        let t0 = Instant::now();
        for i in 0..3u8 {
            c.check_and_insert([i; 16], t0 + Duration::from_secs(i.into()))
                .unwrap();
        }
        let t = t0 + Duration::from_secs(5);
        assert_eq!(
            c.check_and_insert([9; 16], t).unwrap_err().reason(),
            "nonce_cache_full"
        );
        // Live nonces were not evicted to make room.
        for i in 0..3u8 {
            assert_eq!(
                c.check_and_insert([i; 16], t),
                Err(KnockError::ReplayedNonce)
            );
        }
        // Once the oldest expires there is room for exactly one more.
        let t = t0 + 2 * w;
        c.check_and_insert([9; 16], t).unwrap();
        assert_eq!(
            c.check_and_insert([10; 16], t),
            Err(KnockError::NonceCacheFull)
        );
        // A zero-capacity cache refuses everything.
        let z = NonceCache::from_limits(&KnockLimits {
            max_nonces: 0,
            ..KnockLimits::default()
        });
        assert_eq!(
            z.check_and_insert([1; 16], t0),
            Err(KnockError::NonceCacheFull)
        );
        assert!(z.is_empty());
    }

    #[test]
    fn nonce_cache_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<NonceCache>();
        let c = std::sync::Arc::new(NonceCache::new(Duration::from_secs(30), 1 << 20));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    (0..1000u32)
                        .filter(|i| {
                            let mut n = [0u8; 16];
                            n[..4].copy_from_slice(&i.to_le_bytes());
                            c.check_and_insert(n, t0).is_ok()
                        })
                        .count()
                })
            })
            .collect();
        let accepted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(accepted, 1000, "each nonce accepted exactly once");
    }
}
