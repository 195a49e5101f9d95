//! The policy set in force, re-read from its directory when it changes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use super::{PolicyError, PolicySet, load};

/// Holds the policy set in force. Readers take it with
/// [`PolicyStore::current`] (an `Arc` clone, so a decision in flight keeps
/// the set it started with); [`PolicyStore::reload_if_changed`] swaps in a
/// new set atomically, only once it has parsed, validated and passed the
/// service check.
#[derive(Debug)]
pub struct PolicyStore {
    dir: Option<PathBuf>,
    current: RwLock<Arc<PolicySet>>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Configured service names; reloads naming others are refused.
    services: Option<Vec<String>>,
    /// The version of content that failed, and why (reported once).
    bad: Option<(String, PolicyError)>,
}

impl PolicyStore {
    /// Loads `dir` ([`PolicySet::from_dir`]); this first load must succeed.
    pub fn open(dir: &Path) -> Result<PolicyStore, PolicyError> {
        let set = PolicySet::from_dir(dir)?;
        Ok(PolicyStore {
            dir: Some(dir.to_owned()),
            current: RwLock::new(Arc::new(set)),
            state: Mutex::new(State::default()),
        })
    }

    /// A set that never reloads (no `[policy]` in the config, tests).
    pub fn fixed(set: PolicySet) -> PolicyStore {
        PolicyStore {
            dir: None,
            current: RwLock::new(Arc::new(set)),
            state: Mutex::new(State::default()),
        }
    }

    /// The directory, if the set came from one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The set in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks the set in force against the configured service names
    /// ([`PolicySet::check_services`]) and remembers them: later reloads
    /// naming an unknown service are refused like any other bad change.
    pub fn set_services(&self, known: &[&str]) -> Result<(), PolicyError> {
        self.current().check_services(known)?;
        self.lock().services = Some(known.iter().map(|s| (*s).to_owned()).collect());
        Ok(())
    }

    /// What is wrong with the directory as last seen, if it is bad now (the
    /// set in force is then the last good one).
    pub fn last_error(&self) -> Option<PolicyError> {
        self.lock().bad.as_ref().map(|(_, e)| e.clone())
    }

    /// Re-reads the directory; swaps in its set if the content (the
    /// version hash of names and bytes) differs from the set in force.
    /// `Ok(Some(new))`: swapped. `Ok(None)`: nothing new, or the same bad
    /// content that was already reported. `Err`: a newly bad change (read
    /// error, syntax, schema, validation, unknown service); the previous set
    /// stays in force and [`PolicyStore::last_error`] keeps saying why.
    ///
    /// Reads every policy file each call (no mtime heuristics: a policy
    /// directory is small, and a same-second rewrite is never missed); call
    /// it on a timer (once a second) or on a file-system notification.
    pub fn reload_if_changed(&self) -> Result<Option<Arc<PolicySet>>, PolicyError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let mut state = self.lock();
        let input = match load::read_dir(dir) {
            Ok(i) => i,
            Err(e) => return report(&mut state, format!("io:{e}"), e),
        };
        let version = input.version();
        if version == self.current().version() {
            state.bad = None;
            return Ok(None);
        }
        if state.bad.as_ref().is_some_and(|(v, _)| *v == version) {
            return Ok(None);
        }
        let built = load::build(input, &dir.display().to_string()).and_then(|set| {
            if let Some(known) = &state.services {
                let known: Vec<&str> = known.iter().map(String::as_str).collect();
                set.check_services(&known)?;
            }
            Ok(set)
        });
        match built {
            Ok(set) => {
                let set = Arc::new(set);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = set.clone();
                state.bad = None;
                Ok(Some(set))
            }
            Err(e) => report(&mut state, version, e),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reports a problem once: the same bad content again is `Ok(None)`.
fn report(
    state: &mut State,
    key: String,
    e: PolicyError,
) -> Result<Option<Arc<PolicySet>>, PolicyError> {
    if state.bad.as_ref().is_some_and(|(k, _)| *k == key) {
        return Ok(None);
    }
    state.bad = Some((key, e.clone()));
    Err(e)
}
