//! The one place that writes the kernel's maps: the configuration, the
//! admissions admission decided, revocations, and the kernel's own upkeep
//! (expiry, the event budget, flow counts, idle identity slots). What to
//! write is decided elsewhere (`agent/src/admission/`, `agent/src/config/`);
//! how a map is written is the loader's (`agent/src/loader/maps.rs`).
//! Readers (reports, status) look through [`Enforcer::observe`].

pub mod configure;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use portcullis_common::IDENTITY_LIVE;

use crate::{
    admission::{admitter::IdentityMatch, grants::AdmissionRef},
    config::{Config, ServiceMode},
    identity::IdentityName,
    loader::{KernelError, Maps, Origin, clock, maps::FlowCensus},
};

pub use configure::kernel_options;

/// Why the kernel did not take an admission.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("all identity slots are in use")]
    SlotsExhausted,
    /// A kernel table is full.
    #[error("the kernel table {map} is full; raise {knob}")]
    TableFull {
        map: &'static str,
        knob: &'static str,
    },
    #[error("kernel write failed: {0}")]
    Kernel(KernelError),
}

impl AdmitError {
    /// Stable reason name, for counters and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            AdmitError::SlotsExhausted => "identity_slots_exhausted",
            AdmitError::TableFull { .. } => "table_full",
            AdmitError::Kernel(_) => "kernel_error",
        }
    }
}

impl From<KernelError> for AdmitError {
    fn from(e: KernelError) -> Self {
        match e {
            KernelError::IdentitiesExhausted(_) => AdmitError::SlotsExhausted,
            KernelError::TableFull { map, knob } => AdmitError::TableFull { map, knob },
            other => AdmitError::Kernel(other),
        }
    }
}

/// What a revocation cuts in the kernel.
#[derive(Debug, Clone, Copy)]
pub enum CutTarget<'a> {
    /// Kernel identities (their epoch bumps: every flow dies).
    Identities(&'a IdentityMatch),
    /// Knock-granted admissions.
    Admissions(&'a [AdmissionRef]),
    /// Every admission of a source address.
    Source(IpAddr),
    /// Every admission to a service.
    Service(u32),
}

/// What a revocation removed from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    pub admissions: usize,
    pub flows: usize,
    /// Kernel identities revoked.
    pub identities: Vec<String>,
}

/// One admission to write.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// The identity's name (`IdentityName::display`), kept in the kernel.
    pub name: &'a str,
    /// Whose `[identities.NAME]` limits apply.
    pub limits_of: &'a str,
    pub source: IpAddr,
    pub service: u32,
    /// 0: any source port.
    pub source_port: u16,
    pub ttl: Duration,
}

/// The kernel's maps, written only through here.
pub struct Enforcer {
    maps: Mutex<Maps>,
    cfg: Arc<Config>,
    /// Ids of the services in shadow mode now: the config's, then as
    /// switched at run time. Changed only with the maps' lock held.
    shadow: Mutex<BTreeSet<u32>>,
}

impl Enforcer {
    pub fn new(maps: Maps, cfg: Arc<Config>) -> Enforcer {
        let shadow = cfg
            .services
            .iter()
            .filter(|s| s.mode == ServiceMode::Shadow)
            .map(|s| s.id)
            .collect();
        Enforcer {
            maps: Mutex::new(maps),
            cfg,
            shadow: Mutex::new(shadow),
        }
    }

    fn shadow(&self) -> MutexGuard<'_, BTreeSet<u32>> {
        self.shadow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mode a configured service is in now.
    pub fn mode(&self, service: u32) -> ServiceMode {
        if self.shadow().contains(&service) {
            ServiceMode::Shadow
        } else {
            ServiceMode::Enforce
        }
    }

    /// Switches a configured service between enforcing and shadow mode in
    /// the kernel; returns the mode it was in.
    pub fn set_mode(&self, service: u32, mode: ServiceMode) -> Result<ServiceMode, KernelError> {
        let mut maps = self.maps();
        let mut shadow = self.shadow();
        let was = if shadow.contains(&service) {
            ServiceMode::Shadow
        } else {
            ServiceMode::Enforce
        };
        let mut next = shadow.clone();
        match mode {
            ServiceMode::Shadow => next.insert(service),
            ServiceMode::Enforce => next.remove(&service),
        };
        maps.sync_services(
            &configure::service_entries(&self.cfg, &next),
            self.cfg.knock.port,
        )?;
        *shadow = next;
        Ok(was)
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        // A panic while holding the lock leaves the maps as the kernel
        // holds them: nothing in memory to repair.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads (counters, samples, table fill, usage) under the maps' lock.
    /// Draining the sampled-drop ring is the only change a reader makes.
    pub fn observe<T>(&self, read: impl FnOnce(&mut Maps) -> T) -> T {
        read(&mut self.maps())
    }

    /// Node knobs, services and identity limits; static admissions on a
    /// fresh load. Returns how many static admissions were installed.
    pub fn configure(&self, origin: Origin) -> Result<usize, KernelError> {
        let mut maps = self.maps();
        let shadow = self.shadow().clone();
        configure::configure(&mut maps, &self.cfg, &shadow, origin)
    }

    /// Writes (or extends) an admission; returns the identity's slot.
    pub fn admit(&self, a: &Admission<'_>) -> Result<u32, AdmitError> {
        let mut maps = self.maps();
        let limits = self.cfg.identity_limits(a.limits_of);
        let (slot, _) = maps.upsert_identity(configure::identity_value(a.name, &limits), a.name)?;
        maps.admit(
            slot,
            a.source,
            a.service,
            a.source_port,
            clock::expiry_after(a.ttl),
        )?;
        Ok(slot)
    }

    /// A break-glass or static admission: the identity's own limits.
    pub fn admit_named(
        &self,
        identity: &str,
        source: IpAddr,
        service: u32,
        source_port: u16,
        ttl: Duration,
    ) -> Result<(), KernelError> {
        configure::admit(
            &mut self.maps(),
            &self.cfg,
            identity,
            source,
            service,
            source_port,
            ttl,
        )
    }

    /// Revokes `target` under one hold of the maps, so the counts are
    /// exactly what this call removed.
    pub fn cut(&self, target: CutTarget<'_>) -> Result<Cut, KernelError> {
        let mut maps = self.maps();
        let before = maps.flows_removed();
        let mut cut = Cut::default();
        match target {
            CutTarget::Identities(m) => {
                for (slot, id, name) in maps.live_identities()? {
                    if id.state == IDENTITY_LIVE
                        && IdentityName::parse(&name).is_some_and(|n| m.matches(&n))
                    {
                        cut.admissions += maps.revoke_identity(slot)?;
                        cut.identities.push(name);
                    }
                }
            }
            CutTarget::Admissions(ats) => {
                for at in ats {
                    cut.admissions += maps.revoke_admission(at.0, at.1, at.2)?;
                }
            }
            CutTarget::Source(ip) => cut.admissions = maps.revoke_source_everywhere(ip)?,
            CutTarget::Service(id) => cut.admissions = maps.revoke_service(id)?,
        }
        cut.flows = usize::try_from(maps.flows_removed() - before).unwrap_or(usize::MAX);
        Ok(cut)
    }

    /// Removes one admission; returns how many entries went.
    pub fn revoke_admission(&self, at: &AdmissionRef) -> Result<usize, KernelError> {
        self.maps().revoke_admission(at.0, at.1, at.2)
    }

    /// Removes every admission of `source` to `service`.
    pub fn revoke_source(&self, source: IpAddr, service: u32) -> Result<usize, KernelError> {
        self.maps().revoke_source(source, service)
    }

    /// Revokes the identity named exactly `name`, if the kernel holds it:
    /// its slot and the admissions removed.
    pub fn revoke_identity(
        &self,
        name: &IdentityName,
    ) -> Result<Option<(u32, usize)>, KernelError> {
        let mut maps = self.maps();
        match maps.find_identity(name.key())? {
            Some(slot) => Ok(Some((slot, maps.revoke_identity(slot)?))),
            None => Ok(None),
        }
    }

    /// Removes admissions past their expiry.
    pub fn expire(&self) -> Result<usize, KernelError> {
        self.maps().reap_expired(clock::monotonic_ns())
    }

    /// Refills the per-second budget of sampled drop events.
    pub fn reset_event_budget(&self) -> Result<(), KernelError> {
        self.maps().reset_event_budget()
    }

    /// Recounts each identity's live flows, removing idle ones.
    pub fn recount_flows(&self) -> Result<FlowCensus, KernelError> {
        self.maps().recount_flows(clock::monotonic_ns())
    }

    /// Frees identity slots nothing refers to.
    pub fn reclaim_idle(&self) -> Result<usize, KernelError> {
        self.maps().reclaim_idle(clock::monotonic_ns())
    }
}
