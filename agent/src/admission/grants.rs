//! The live knock-granted admissions and what each was decided on: a
//! revocation finds the admissions of a token or a subject here, a new
//! policy set decides them again, and the per-identity quota counts them.
//!
//! An entry lives exactly as long as its admission: it is reserved before
//! the kernel is written (so concurrent knocks of one identity cannot
//! overshoot the quota together), released if the write fails, and goes
//! when the admission expires or is revoked. This state is bounded by the
//! admissions table, and by each identity's quota.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::SystemTime};

use crate::{admission::token::Claims, identity::IdentityName, policy::Method};

/// The kernel key of one admission: source, service id, source port (0:
/// any port).
pub type AdmissionRef = (IpAddr, u32, u16);

/// One live admission.
pub(crate) struct LiveGrant {
    pub claims: Arc<Claims>,
    pub identity: IdentityName,
    pub service: String,
    pub method: Method,
    pub expires: SystemTime,
    /// Which reservation made it (a failed write releases only its own).
    pub generation: u64,
}

/// A registered admission whose kernel write has not succeeded yet; see
/// [`crate::admission::admitter::Admitter::release`].
#[derive(Debug)]
#[must_use = "a reservation is either kept (the write succeeded) or released"]
pub struct Reservation {
    pub(crate) at: AdmissionRef,
    pub(crate) generation: u64,
    /// What the re-knock replaced, put back if the write fails.
    pub(crate) previous: Option<PreviousGrant>,
}

/// A grant a reservation displaced (a re-knock from the same source).
pub(crate) struct PreviousGrant(LiveGrant);

impl std::fmt::Debug for PreviousGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviousGrant")
            .field("identity", &self.0.identity)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
pub(crate) struct Grants {
    live: HashMap<AdmissionRef, LiveGrant>,
    /// Live admissions per (identity, service id): the quota's count.
    per_identity: HashMap<(IdentityName, u32), u32>,
    next_generation: u64,
}

impl Grants {
    /// Registers `grant` at `at`, replacing (and returning) what was there.
    pub fn insert(&mut self, at: AdmissionRef, mut grant: LiveGrant) -> Reservation {
        self.next_generation += 1;
        grant.generation = self.next_generation;
        let key = (grant.identity.clone(), at.1);
        let previous = self.live.insert(at, grant).map(|old| {
            self.uncount(&old.identity, at.1);
            PreviousGrant(old)
        });
        *self.per_identity.entry(key).or_default() += 1;
        Reservation {
            at,
            generation: self.next_generation,
            previous,
        }
    }

    /// Undoes `r` if its entry is still the one it made.
    pub fn release(&mut self, r: Reservation) {
        if self
            .live
            .get(&r.at)
            .is_some_and(|g| g.generation == r.generation)
        {
            self.remove(&r.at);
            if let Some(PreviousGrant(old)) = r.previous {
                let key = (old.identity.clone(), r.at.1);
                self.live.insert(r.at, old);
                *self.per_identity.entry(key).or_default() += 1;
            }
        }
    }

    pub fn remove(&mut self, at: &AdmissionRef) -> Option<LiveGrant> {
        let g = self.live.remove(at)?;
        self.uncount(&g.identity, at.1);
        Some(g)
    }

    fn uncount(&mut self, identity: &IdentityName, service: u32) {
        let key = (identity.clone(), service);
        if let Some(n) = self.per_identity.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_identity.remove(&key);
            }
        }
    }

    /// Live admissions `identity` holds to `service`, not counting `at`
    /// itself (a re-knock from the same source extends, it does not add).
    pub fn held(&self, identity: &IdentityName, service: u32, at: &AdmissionRef) -> u32 {
        let n = self
            .per_identity
            .get(&(identity.clone(), service))
            .copied()
            .unwrap_or(0);
        match self.live.get(at) {
            Some(g) if &g.identity == identity => n.saturating_sub(1),
            _ => n,
        }
    }

    /// Removes the entries `pred` selects and returns their keys.
    pub fn take(&mut self, pred: impl Fn(&AdmissionRef, &LiveGrant) -> bool) -> Vec<AdmissionRef> {
        let doomed: Vec<AdmissionRef> = self
            .live
            .iter()
            .filter(|(k, g)| pred(k, g))
            .map(|(k, _)| *k)
            .collect();
        for k in &doomed {
            self.remove(k);
        }
        doomed
    }

    pub fn iter(&self) -> impl Iterator<Item = (&AdmissionRef, &LiveGrant)> {
        self.live.iter()
    }

    pub fn purge(&mut self, now: SystemTime) {
        self.take(|_, g| g.expires <= now || g.claims.expires_at <= now);
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }
}
