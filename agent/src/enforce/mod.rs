//! The one place that writes the kernel's maps: the configuration, the
//! admissions admission decided, revocations, and the kernel's own upkeep
//! (expiry, the event budget, flow counts, idle identity slots). What to
//! write is decided elsewhere (`agent/src/admission/`, `agent/src/config/`);
//! how a map is written is the loader's (`agent/src/loader/maps.rs`).
//! Readers (reports, status) look through [`Enforcer::observe`].

pub mod clamp;
pub mod configure;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, RwLock},
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

/// What replacing the protected services changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicesChanged {
    pub added: Vec<String>,
    /// Each removed service and the admissions to it that were cut.
    pub removed: Vec<(String, usize)>,
    /// Same name, another port, address, price, action or model.
    pub changed: Vec<String>,
    /// Admissions to removed services, cut first.
    pub admissions_removed: usize,
    pub flows_removed: usize,
}

/// The kernel's maps, written only through here.
pub struct Enforcer {
    maps: Mutex<Maps>,
    /// The configuration in force: the file's, with the services as
    /// changed at run time (`Services` add/remove, SIGHUP). Replaced only
    /// with the maps' lock held, so the kernel and this always agree.
    cfg: RwLock<Arc<Config>>,
    /// Ids of the services in shadow mode now: the config's, then as
    /// switched at run time. Changed only with the maps' lock held.
    shadow: Mutex<BTreeSet<u32>>,
    /// Identities (kernel names) whose rates are lowered now
    /// (`agent/src/enforce/clamp.rs`); every write of them applies it.
    clamps: Mutex<HashMap<String, clamp::Clamp>>,
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
            cfg: RwLock::new(cfg),
            shadow: Mutex::new(shadow),
            clamps: Mutex::new(HashMap::new()),
        }
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `next` the configuration in force, with its services in the
    /// kernel: admissions to services it no longer has are cut first (a
    /// service added again later starts with none), then the port tables
    /// are rewritten. A service keeps the mode it runs in unless `next`
    /// adds it or changes its configured mode. Nothing changes if the
    /// kernel refuses (the tables are rewritten in one sync).
    pub fn replace_services(&self, next: Arc<Config>) -> Result<ServicesChanged, KernelError> {
        let mut maps = self.maps();
        let mut shadow = self.shadow();
        let old = self.config();
        let mut change = ServicesChanged::default();
        let mut modes = BTreeSet::new();
        for s in &next.services {
            let keep = match old.services.iter().find(|o| o.name == s.name) {
                None => {
                    change.added.push(s.name.clone());
                    false
                }
                Some(o) => {
                    if o != s {
                        change.changed.push(s.name.clone());
                    }
                    o.mode == s.mode
                }
            };
            let shadowed = if keep {
                shadow.contains(&s.id)
            } else {
                s.mode == ServiceMode::Shadow
            };
            if shadowed {
                modes.insert(s.id);
            }
        }
        maps.sync_services(&configure::service_entries(&next, &modes), next.knock.port)?;
        let before = maps.flows_removed();
        for o in &old.services {
            if !next.services.iter().any(|s| s.id == o.id) {
                let n = maps.revoke_service(o.id)?;
                change.removed.push((o.name.clone(), n));
                change.admissions_removed += n;
            }
        }
        change.flows_removed = usize::try_from(maps.flows_removed() - before).unwrap_or(usize::MAX);
        *shadow = modes;
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(change)
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
        let cfg = self.config();
        maps.sync_services(&configure::service_entries(&cfg, &next), cfg.knock.port)?;
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
        configure::configure(&mut maps, &self.config(), &shadow, origin)
    }

    /// Writes (or extends) an admission; returns the identity's slot.
    pub fn admit(&self, a: &Admission<'_>) -> Result<u32, AdmitError> {
        let mut maps = self.maps();
        let limits = self.limits_of(a.name, a.limits_of);
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

    /// The limits `name` is written with: its own (`limits_of`'s),
    /// lowered by its clamp if it has one.
    fn limits_of(&self, name: &str, limits_of: &str) -> crate::config::Limits {
        let cfg = self.config();
        let base = cfg.identity_limits(limits_of);
        match self.clamps().get(name) {
            Some(c) => clamp::clamped(base, c, &cfg.cost_control),
            None => base,
        }
    }

    fn clamps(&self) -> MutexGuard<'_, HashMap<String, clamp::Clamp>> {
        self.clamps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `next` the clamps in force: every identity the kernel holds
    /// whose written rates differ from what its clamp (or its lifting)
    /// asks for is rewritten. Compared with the kernel each time, so a
    /// config reload that rewrote limits is corrected within a call.
    /// Returns the names rewritten.
    pub fn set_clamps(
        &self,
        next: HashMap<String, clamp::Clamp>,
    ) -> Result<Vec<String>, KernelError> {
        let mut maps = self.maps();
        let cfg = self.config();
        let mut clamps = self.clamps();
        let mut names: BTreeSet<String> = clamps.keys().cloned().collect();
        names.extend(next.keys().cloned());
        let mut written = Vec::new();
        for name in names {
            let want = match (next.get(&name), clamps.get(&name)) {
                (Some(c), _) => {
                    clamp::clamped(cfg.identity_limits(&c.limits_of), c, &cfg.cost_control)
                }
                (None, Some(was)) => cfg.identity_limits(&was.limits_of),
                (None, None) => continue,
            };
            let key = crate::config::identity_key(&name);
            let Some(slot) = maps.find_identity(key)? else {
                continue;
            };
            let cur = maps.identity(slot)?;
            let mut value = configure::identity_value(&name, &want);
            value.state = cur.state;
            value.epoch = cur.epoch;
            if cur.state != IDENTITY_LIVE || value == cur {
                continue;
            }
            maps.upsert_identity(value, &name)?;
            written.push(name);
        }
        *clamps = next;
        Ok(written)
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
            &self.config(),
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
