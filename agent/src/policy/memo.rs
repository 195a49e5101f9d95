//! Small bounded memo tables for the decision path: keyed by a hash of
//! borrowed inputs (no clones to look up), confirmed by comparing the stored
//! inputs, cleared wholesale when full.

use std::{
    collections::HashMap,
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState},
    sync::{PoisonError, RwLock},
};

/// The keys are already hashes: pass them through.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(super) struct Memo<K, V> {
    state: RandomState,
    max: usize,
    map: RwLock<HashMap<u64, (K, V), BuildHasherDefault<IdHasher>>>,
}

impl<K, V: Clone> Memo<K, V> {
    pub fn new(max: usize) -> Self {
        Memo {
            state: RandomState::new(),
            max,
            map: RwLock::new(HashMap::default()),
        }
    }

    /// The hash of some inputs (keyed per table, so not predictable from
    /// outside).
    pub fn hash(&self, inputs: &impl Hash) -> u64 {
        self.state.hash_one(inputs)
    }

    /// The value stored under `hash` if its inputs `matches`.
    pub fn get(&self, hash: u64, matches: impl Fn(&K) -> bool) -> Option<V> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.get(&hash)
            .filter(|(k, _)| matches(k))
            .map(|(_, v)| v.clone())
    }

    /// Stores a value (replacing a colliding entry); a full table is
    /// emptied first.
    pub fn insert(&self, hash: u64, key: K, value: V) {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.max && !map.contains_key(&hash) {
            map.clear();
        }
        map.insert(hash, (key, value));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
