//! Typed handles on every map, opened either from a freshly loaded object or
//! from pins, and the operations the agent performs on them. Nothing else in
//! the agent touches aya maps.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use portcullis_common::{
    ADMIT_ONE_USE, Admission, AdmissionKey, CFG_FLOW_SCOPED, DROP_COUNTERS, DropEvent, EventBudget,
    Flow, FlowKey, IDENTITY_FREE, IDENTITY_LIVE, IDENTITY_NAME_BYTES, IDENTITY_REVOKED, Identity,
    IdentityName, IdentityStats, KernelConfig, MAX_IDENTITIES, MAX_USAGE_SERVICES, Meta,
    PORT_KNOCK, PORT_TABLE_SIZE, PORT_TCP_BY_ADDR, PORT_TCP_SHADOW, PORT_UDP_BY_ADDR,
    PORT_UDP_SHADOW, PROTO_TCP, PortEntry, RateState, SERVICE_SHADOW, ServiceKey, ServiceRef,
    maps as names, usage_row,
};

use super::KernelError;

pub struct Maps {
    pub ports: Array<MapData, PortEntry>,
    pub services: HashMap<MapData, ServiceKey, ServiceRef>,
    pub admissions: HashMap<MapData, AdmissionKey, Admission>,
    pub identities: Array<MapData, Identity>,
    pub rates: Array<MapData, RateState>,
    pub flows: HashMap<MapData, FlowKey, Flow>,
    pub usage: PerCpuArray<MapData, IdentityStats>,
    pub usage_cols: Array<MapData, u32>,
    pub drops: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, KernelConfig>,
    pub events: RingBuf<MapData>,
    pub event_budget: PerCpuArray<MapData, EventBudget>,
    pub meta: Array<MapData, Meta>,
    pub flow_count: Array<MapData, u32>,
    pub identity_names: Array<MapData, IdentityName>,
    pub knock_sources: HashMap<MapData, [u8; 16], u64>,
    pub service_drops: PerCpuArray<MapData, u64>,
    /// Identity key → slot, built on first use.
    slots: Option<std::collections::HashMap<u64, u32>>,
    /// `Meta::identity_gen` when `slots` was last known complete.
    known_gen: u32,
    /// Times the index was rebuilt from the kernel (one lookup per slot).
    index_rebuilds: u64,
    /// Flows removed by revocations since open (how many a revocation cut
    /// is the difference across it, read under the same lock).
    flows_removed: u64,
}

/// One protected service as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub id: u32,
    pub proto: u8,
    pub port: u16,
    pub addr: Option<IpAddr>,
    /// Shadow mode: the kernel passes what it would drop, counted apart.
    pub shadow: bool,
}

/// Cumulative counters of one identity slot for one service, summed over
/// CPUs (see [`Maps::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub slot: u32,
    /// `Identity::key` of the slot's identity when read.
    pub identity_key: u64,
    pub service: u32,
    pub stats: IdentityStats,
}

/// A flow that has not been re-validated (no packet) for this long is idle:
/// it no longer counts against its identity's flow quota and the agent
/// removes it. Its connection, if it still lives, re-creates it from the
/// admission with its next acknowledging segment.
pub const FLOW_IDLE_NS: u64 = 30 * 1_000_000_000;

/// How full one kernel table is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableFill {
    /// The map (`PCL_ADMIT`, ...).
    pub map: &'static str,
    pub entries: u32,
    pub capacity: u32,
    /// The config key that sizes it (what to raise when it fills).
    pub knob: &'static str,
}

impl TableFill {
    /// Fill ratio in percent, rounded down.
    pub fn percent(&self) -> u32 {
        (u64::from(self.entries) * 100)
            .checked_div(u64::from(self.capacity))
            .map_or(0, |p| p as u32)
    }
}

/// What a pass over the flow table found.
#[derive(Clone, Debug, Default)]
pub struct FlowCensus {
    /// Live flows per identity slot.
    pub per_slot: std::collections::HashMap<u32, u32>,
    /// Live flows left in the table.
    pub live: u32,
    /// Idle flows removed.
    pub removed: u32,
}

/// IPv4 as IPv4-mapped IPv6 (the kernel's key format), IPv6 as is.
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => portcullis_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The kernel's key format back to an address: IPv4-mapped as IPv4.
pub fn bytes_addr(b: [u8; 16]) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::from(b)).to_canonical()
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, KernelError> {
        Self::build(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| KernelError::MissingMap(name.to_string()))
        })
    }

    /// Opens pinned maps under `dir` (`<pin_dir>/maps`).
    pub fn from_pins(dir: &Path) -> Result<Self, KernelError> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|e| KernelError::Map {
                map: name.to_string(),
                detail: format!("open pin {}: {e}", path.display()),
            })?;
            Map::from_map_data(data).map_err(|e| KernelError::map(name, e))
        })
    }

    fn build(mut take: impl FnMut(&str) -> Result<Map, KernelError>) -> Result<Self, KernelError> {
        macro_rules! typed {
            ($name:expr) => {{
                let m = take($name)?;
                m.try_into().map_err(|e| KernelError::map($name, e))?
            }};
        }
        Ok(Maps {
            ports: typed!(names::PORTS),
            services: typed!(names::SERVICES),
            admissions: typed!(names::ADMISSIONS),
            identities: typed!(names::IDENTITIES),
            rates: typed!(names::RATES),
            flows: typed!(names::FLOWS),
            usage: typed!(names::USAGE),
            usage_cols: typed!(names::USAGE_COLS),
            drops: typed!(names::DROPS),
            config: typed!(names::CONFIG),
            events: typed!(names::EVENTS),
            event_budget: typed!(names::EVENT_BUDGET),
            meta: typed!(names::META),
            flow_count: typed!(names::FLOW_COUNT),
            identity_names: typed!(names::IDENTITY_NAMES),
            knock_sources: typed!(names::KNOCK_SRC),
            service_drops: typed!(names::SERVICE_DROPS),
            slots: None,
            known_gen: 0,
            index_rebuilds: 0,
            flows_removed: 0,
        })
    }

    pub fn read_meta(&self) -> Result<Meta, KernelError> {
        self.meta
            .get(&0, 0)
            .map_err(|e| KernelError::map(names::META, e))
    }

    pub fn write_meta(&mut self, meta: Meta) -> Result<(), KernelError> {
        self.meta
            .set(0, meta, 0)
            .map_err(|e| KernelError::map(names::META, e))
    }

    fn kernel_config(&self) -> Result<KernelConfig, KernelError> {
        self.config
            .get(&0, 0)
            .map_err(|e| KernelError::map(names::CONFIG, e))
    }

    /// Writes the node knobs, keeping the runtime flags the agent manages
    /// (`CFG_FLOW_SCOPED`) as they are.
    pub fn set_kernel_config(&mut self, mut cfg: KernelConfig) -> Result<(), KernelError> {
        cfg.flags =
            (cfg.flags & !CFG_FLOW_SCOPED) | (self.kernel_config()?.flags & CFG_FLOW_SCOPED);
        self.write_kernel_config(cfg)
    }

    fn write_kernel_config(&mut self, cfg: KernelConfig) -> Result<(), KernelError> {
        self.config
            .set(0, cfg, 0)
            .map_err(|e| KernelError::map(names::CONFIG, e))
    }

    fn set_flow_scoped(&mut self, on: bool) -> Result<(), KernelError> {
        let mut cfg = self.kernel_config()?;
        let want = if on {
            cfg.flags | CFG_FLOW_SCOPED
        } else {
            cfg.flags & !CFG_FLOW_SCOPED
        };
        if want != cfg.flags {
            cfg.flags = want;
            self.write_kernel_config(cfg)?;
        }
        Ok(())
    }

    /// Starts a new sampling second on every CPU.
    pub fn reset_event_budget(&mut self) -> Result<(), KernelError> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| KernelError::map(names::EVENT_BUDGET, e))?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![EventBudget::default(); n])
            .map_err(|e| KernelError::map(names::EVENT_BUDGET, e))?;
        self.event_budget
            .set(0, zeros, 0)
            .map_err(|e| KernelError::map(names::EVENT_BUDGET, e))
    }

    /// Makes the port table and the address-specific service map exactly
    /// match `services` (plus the knock port), writing only what differs.
    pub fn sync_services(
        &mut self,
        services: &[ServiceEntry],
        knock_port: u16,
    ) -> Result<(), KernelError> {
        let cols = self.assign_usage_columns(services)?;
        let mut want = vec![PortEntry::default(); PORT_TABLE_SIZE as usize];
        let mut want_by_addr = std::collections::HashMap::new();
        for s in services {
            let col = cols[&s.id];
            let e = &mut want[s.port as usize];
            match (s.addr, s.proto == PROTO_TCP) {
                (None, true) => {
                    e.tcp_service = s.id;
                    e.tcp_col = col as u8;
                    if s.shadow {
                        e.flags |= PORT_TCP_SHADOW;
                    }
                }
                (None, false) => {
                    e.udp_service = s.id;
                    e.udp_col = col as u8;
                    if s.shadow {
                        e.flags |= PORT_UDP_SHADOW;
                    }
                }
                (Some(a), tcp) => {
                    e.flags |= if tcp {
                        PORT_TCP_BY_ADDR
                    } else {
                        PORT_UDP_BY_ADDR
                    };
                    let key = ServiceKey {
                        addr: addr_bytes(a),
                        port: s.port,
                        proto: s.proto,
                        _pad: 0,
                    };
                    let flags = if s.shadow { SERVICE_SHADOW } else { 0 };
                    want_by_addr.insert(
                        key,
                        ServiceRef {
                            id: s.id,
                            col,
                            flags,
                            _pad: 0,
                        },
                    );
                }
            }
        }
        if knock_port != 0 {
            want[knock_port as usize].flags |= PORT_KNOCK;
        }
        // Address-specific entries first, so a port flag never points at a
        // missing entry; stale ones removed after the port table is right.
        for (k, v) in &want_by_addr {
            self.services
                .insert(k, v, 0)
                .map_err(|e| KernelError::map(names::SERVICES, e))?;
        }
        for (port, entry) in want.iter().enumerate() {
            let cur = self
                .ports
                .get(&(port as u32), 0)
                .map_err(|e| KernelError::map(names::PORTS, e))?;
            if cur != *entry {
                self.ports
                    .set(port as u32, *entry, 0)
                    .map_err(|e| KernelError::map(names::PORTS, e))?;
            }
        }
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want_by_addr.contains_key(k))
            .collect();
        for k in stale {
            let _ = self.services.remove(&k);
        }
        Ok(())
    }

    /// Gives every service a usage column, keeping the column a service
    /// already has (so counters stay attributed across restarts and
    /// reloads). New services take a never-used column first, else one of a
    /// service no longer configured, whose rows are zeroed before anything
    /// points at it. Returns service id → column.
    fn assign_usage_columns(
        &mut self,
        services: &[ServiceEntry],
    ) -> Result<std::collections::HashMap<u32, u32>, KernelError> {
        let mut ids: Vec<u32> = services.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > MAX_USAGE_SERVICES as usize {
            return Err(KernelError::map(
                names::USAGE_COLS,
                format!(
                    "{} services to protect, but usage is counted for at most {MAX_USAGE_SERVICES}",
                    ids.len()
                ),
            ));
        }
        let current = self.usage_columns()?;
        let mut out = std::collections::HashMap::new();
        for (col, id) in current.iter().enumerate() {
            if *id != 0 && ids.contains(id) {
                out.insert(*id, col as u32);
            }
        }
        let taken =
            |out: &std::collections::HashMap<u32, u32>, col: u32| out.values().any(|c| *c == col);
        for id in ids {
            if out.contains_key(&id) {
                continue;
            }
            let col = (0..MAX_USAGE_SERVICES)
                .find(|c| current[*c as usize] == 0 && !taken(&out, *c))
                .or_else(|| (0..MAX_USAGE_SERVICES).find(|c| !taken(&out, *c)))
                .expect("at most MAX_USAGE_SERVICES services");
            if current[col as usize] != 0 {
                // A retired service's column: its counts must not become
                // the new service's.
                for slot in 0..MAX_IDENTITIES {
                    self.zero_usage_row(usage_row(slot, col))?;
                }
            }
            self.usage_cols
                .set(col, id, 0)
                .map_err(|e| KernelError::map(names::USAGE_COLS, e))?;
            out.insert(id, col);
        }
        Ok(out)
    }

    /// Column → service id (0: never used).
    pub fn usage_columns(&self) -> Result<Vec<u32>, KernelError> {
        (0..MAX_USAGE_SERVICES)
            .map(|c| {
                self.usage_cols
                    .get(&c, 0)
                    .map_err(|e| KernelError::map(names::USAGE_COLS, e))
            })
            .collect()
    }

    fn zero_usage_row(&mut self, row: u32) -> Result<(), KernelError> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| KernelError::map(names::USAGE, e))?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![IdentityStats::default(); n])
            .map_err(|e| KernelError::map(names::USAGE, e))?;
        self.usage
            .set(row, zeros, 0)
            .map_err(|e| KernelError::map(names::USAGE, e))
    }

    pub fn identity(&self, slot: u32) -> Result<Identity, KernelError> {
        self.identities
            .get(&slot, 0)
            .map_err(|e| KernelError::map(names::IDENTITIES, e))
    }

    /// The slot holding the identity with this key, if any. Answered from an
    /// in-memory index (a scan of every slot costs thousands of syscalls),
    /// confirmed against the kernel entry. A key the index lacks is new
    /// unless another process (such as `agent admit`) changed a slot since
    /// the index was built, which `Meta::identity_gen` tells in one lookup;
    /// only then, or when the kernel disagrees with the index, is it
    /// rebuilt.
    pub fn find_identity(&mut self, key: u64) -> Result<Option<u32>, KernelError> {
        if let Some(slot) = self.index()?.get(&key).copied() {
            let id = self.identity(slot)?;
            if id.state != IDENTITY_FREE && id.key == key {
                return Ok(Some(slot));
            }
        } else if self.read_meta()?.identity_gen == self.known_gen {
            return Ok(None);
        }
        self.slots = None;
        Ok(self.index()?.get(&key).copied())
    }

    /// How many times the identity index was rebuilt from the kernel.
    pub fn index_rebuilds(&self) -> u64 {
        self.index_rebuilds
    }

    fn index(&mut self) -> Result<&mut std::collections::HashMap<u64, u32>, KernelError> {
        if self.slots.is_none() {
            // The generation first: a slot changed during the scan changes
            // it, and the next miss rebuilds again.
            self.known_gen = self.read_meta()?.identity_gen;
            let mut index = std::collections::HashMap::new();
            for slot in 1..MAX_IDENTITIES {
                let id = self.identity(slot)?;
                if id.state != IDENTITY_FREE {
                    index.insert(id.key, slot);
                }
            }
            self.slots = Some(index);
            self.index_rebuilds += 1;
        }
        Ok(self.slots.get_or_insert_default())
    }

    /// After this process changed which identity a slot holds: a new
    /// generation, so other processes' indexes rebuild. Ours stays valid
    /// unless another process changed the generation since we last saw it.
    fn bump_identity_gen(&mut self) -> Result<(), KernelError> {
        let mut meta = self.read_meta()?;
        if meta.identity_gen != self.known_gen {
            self.slots = None;
        }
        meta.identity_gen = meta.identity_gen.wrapping_add(1);
        self.write_meta(meta)?;
        self.known_gen = meta.identity_gen;
        Ok(())
    }

    /// The name written with a slot's identity (see [`Maps::upsert_identity`]).
    pub fn identity_name(&self, slot: u32) -> Result<String, KernelError> {
        let n = self
            .identity_names
            .get(&slot, 0)
            .map_err(|e| KernelError::map(names::IDENTITY_NAMES, e))?;
        let len = (n.len as usize).min(IDENTITY_NAME_BYTES);
        Ok(String::from_utf8_lossy(&n.bytes[..len]).into_owned())
    }

    /// Every slot in use: slot, its identity and its name.
    pub fn live_identities(&mut self) -> Result<Vec<(u32, Identity, String)>, KernelError> {
        let mut slots: Vec<u32> = self.index()?.values().copied().collect();
        slots.sort_unstable();
        slots
            .into_iter()
            .map(|slot| Ok((slot, self.identity(slot)?, self.identity_name(slot)?)))
            .collect()
    }

    /// Writes (or refreshes the limits of) a live identity named `name`;
    /// slot 0 is never used so that a zeroed value can never look like a
    /// valid reference. Returns the slot and its current epoch.
    pub fn upsert_identity(
        &mut self,
        mut ident: Identity,
        name: &str,
    ) -> Result<(u32, u32), KernelError> {
        let slot = match self.find_identity(ident.key)? {
            Some(s) => s,
            None => self.free_slot()?,
        };
        let cur = self.identity(slot)?;
        ident.state = IDENTITY_LIVE;
        // Keep the epoch across refreshes: existing admissions stay valid.
        // A revoked slot being reused gets a new epoch, which kills
        // anything still carrying the old one.
        ident.epoch = if cur.state == IDENTITY_REVOKED {
            cur.epoch.wrapping_add(1)
        } else {
            cur.epoch
        };
        if cur.state == IDENTITY_FREE {
            self.rates
                .set(slot, RateState::default(), 0)
                .map_err(|e| KernelError::map(names::RATES, e))?;
            // Nothing refers to a free slot, so nothing counts into it:
            // the new identity's usage starts from zero (the accountant
            // relies on this when a slot changes hands).
            for col in 0..MAX_USAGE_SERVICES {
                self.zero_usage_row(usage_row(slot, col))?;
            }
            self.flow_count
                .set(slot, 0, 0)
                .map_err(|e| KernelError::map(names::FLOW_COUNT, e))?;
        }
        let new_key = cur.state == IDENTITY_FREE || cur.key != ident.key;
        if new_key {
            self.write_identity_name(slot, name)?;
        }
        self.identities
            .set(slot, ident, 0)
            .map_err(|e| KernelError::map(names::IDENTITIES, e))?;
        self.index()?.insert(ident.key, slot);
        if new_key {
            self.bump_identity_gen()?;
        }
        Ok((slot, ident.epoch))
    }

    fn write_identity_name(&mut self, slot: u32, name: &str) -> Result<(), KernelError> {
        let mut n = IdentityName::default();
        // Cut on a character boundary so the stored text stays UTF-8.
        let mut len = name.len().min(IDENTITY_NAME_BYTES);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        n.bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        n.len = len as u32;
        self.identity_names
            .set(slot, n, 0)
            .map_err(|e| KernelError::map(names::IDENTITY_NAMES, e))
    }

    /// A free slot: one the index does not know, confirmed free in the
    /// kernel (another process may have taken it).
    fn free_slot(&mut self) -> Result<u32, KernelError> {
        let used: std::collections::HashSet<u32> = self.index()?.values().copied().collect();
        for slot in 1..MAX_IDENTITIES {
            if !used.contains(&slot) && self.identity(slot)?.state == IDENTITY_FREE {
                return Ok(slot);
            }
        }
        Err(KernelError::IdentitiesExhausted(MAX_IDENTITIES - 1))
    }

    /// Frees identity slots that no admission and no unexpired flow refers
    /// to (admissions expired or were revoked). The epoch changes, so
    /// nothing that still names the slot can use it.
    pub fn reclaim_idle(&mut self, now_ns: u64) -> Result<usize, KernelError> {
        let mut referenced: std::collections::HashSet<u32> =
            self.admissions().iter().map(|(_, a)| a.identity).collect();
        referenced.extend(
            self.flows
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, f)| f.expires_ns > now_ns)
                .map(|(_, f)| f.identity),
        );
        let idle: Vec<(u64, u32)> = self
            .index()?
            .iter()
            .filter(|(_, slot)| !referenced.contains(slot))
            .map(|(k, s)| (*k, *s))
            .collect();
        for (key, slot) in &idle {
            let cur = self.identity(*slot)?;
            let freed = Identity {
                state: IDENTITY_FREE,
                epoch: cur.epoch.wrapping_add(1),
                ..Identity::default()
            };
            self.identities
                .set(*slot, freed, 0)
                .map_err(|e| KernelError::map(names::IDENTITIES, e))?;
            self.index()?.remove(key);
        }
        if !idle.is_empty() {
            self.bump_identity_gen()?;
        }
        Ok(idle.len())
    }

    /// Admits `source` to `service` as identity `slot` until `expires_ns`
    /// (kernel monotonic time). `src_port` != 0 makes it flow-scoped.
    pub fn admit(
        &mut self,
        slot: u32,
        source: IpAddr,
        service: u32,
        src_port: u16,
        expires_ns: u64,
    ) -> Result<(), KernelError> {
        let ident = self.identity(slot)?;
        if ident.state != IDENTITY_LIVE {
            return Err(KernelError::IdentityNotLive(slot));
        }
        let key = AdmissionKey {
            addr: addr_bytes(source),
            service,
            src_port,
            _pad: 0,
        };
        if src_port != 0 {
            // Before the insert: the kernel must look for it once it exists.
            self.set_flow_scoped(true)?;
        }
        let value = Admission {
            identity: slot,
            epoch: ident.epoch,
            expires_ns,
            flags: if src_port != 0 { ADMIT_ONE_USE } else { 0 },
            _pad: 0,
        };
        self.admissions.insert(key, value, 0).map_err(|e| {
            if is_full(&e) {
                KernelError::TableFull {
                    map: names::ADMISSIONS,
                    knob: "kernel.max_admissions",
                }
            } else {
                KernelError::map(names::ADMISSIONS, e)
            }
        })
    }

    /// Revokes an identity: its epoch changes, so every flow and admission
    /// that carries the old one dies on its next packet.
    pub fn revoke_identity(&mut self, slot: u32) -> Result<usize, KernelError> {
        // Its flows are found before the epoch changes: from then on the
        // kernel removes each on its next packet, and a revocation must
        // still count what it cut.
        let flows = self.matching_flows(|_, f| f.identity == slot);
        let mut ident = self.identity(slot)?;
        ident.state = IDENTITY_REVOKED;
        ident.epoch = ident.epoch.wrapping_add(1);
        self.identities
            .set(slot, ident, 0)
            .map_err(|e| KernelError::map(names::IDENTITIES, e))?;
        let removed = self.remove_admissions(|_, v| v.identity == slot)?;
        self.delete_flows(&flows);
        // Flows created while this ran carry the old epoch; gone too.
        self.remove_flows(|_, f| f.identity == slot)?;
        Ok(removed)
    }

    /// Removes every admission of `source` to `service` (any source port)
    /// and the flows they created.
    pub fn revoke_source(&mut self, source: IpAddr, service: u32) -> Result<usize, KernelError> {
        let addr = addr_bytes(source);
        let removed = self.remove_admissions(|k, _| k.addr == addr && k.service == service)?;
        self.remove_flows(|k, f| k.src == addr && f.service == service)?;
        Ok(removed)
    }

    /// Removes every admission to `service` and the flows they created.
    pub fn revoke_service(&mut self, service: u32) -> Result<usize, KernelError> {
        let removed = self.remove_admissions(|k, _| k.service == service)?;
        self.remove_flows(|_, f| f.service == service)?;
        Ok(removed)
    }

    /// Removes every admission of `source` (any service) and its flows.
    pub fn revoke_source_everywhere(&mut self, source: IpAddr) -> Result<usize, KernelError> {
        let addr = addr_bytes(source);
        let removed = self.remove_admissions(|k, _| k.addr == addr)?;
        self.remove_flows(|k, _| k.src == addr)?;
        Ok(removed)
    }

    /// Flows revocations have removed since the maps were opened.
    pub fn flows_removed(&self) -> u64 {
        self.flows_removed
    }

    /// Every flow the kernel holds.
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        self.flows.iter().filter_map(Result::ok).collect()
    }

    /// Removes one admission (`src_port` 0: the one for every port) and the
    /// flows it admitted from that source to that service.
    pub fn revoke_admission(
        &mut self,
        source: IpAddr,
        service: u32,
        src_port: u16,
    ) -> Result<usize, KernelError> {
        let addr = addr_bytes(source);
        let removed = self.remove_admissions(|k, _| {
            k.addr == addr && k.service == service && k.src_port == src_port
        })?;
        self.remove_flows(|k, f| {
            k.src == addr && f.service == service && (src_port == 0 || k.sport == src_port)
        })?;
        Ok(removed)
    }

    /// Deletes admissions whose kernel-time expiry has passed (the kernel
    /// already ignores them; this returns the space).
    pub fn reap_expired(&mut self, now_ns: u64) -> Result<usize, KernelError> {
        let n = self.remove_admissions(|_, v| v.expires_ns <= now_ns)?;
        // The kernel consumes flow-scoped admissions itself; once none are
        // left, spare the drop path its extra lookup.
        if !self.admissions().iter().any(|(k, _)| k.src_port != 0) {
            self.set_flow_scoped(false)?;
        }
        Ok(n)
    }

    pub fn admissions(&self) -> Vec<(AdmissionKey, Admission)> {
        self.admissions.iter().filter_map(Result::ok).collect()
    }

    fn remove_admissions(
        &mut self,
        pred: impl Fn(&AdmissionKey, &Admission) -> bool,
    ) -> Result<usize, KernelError> {
        remove_where(&mut self.admissions, pred)
    }

    /// Removes the flows `pred` selects and takes them off their
    /// identities' flow counts.
    fn remove_flows(
        &mut self,
        pred: impl Fn(&FlowKey, &Flow) -> bool,
    ) -> Result<usize, KernelError> {
        let doomed = self.matching_flows(pred);
        self.delete_flows(&doomed);
        Ok(doomed.len())
    }

    /// The flows `pred` selects, with their identity slots.
    fn matching_flows(&self, pred: impl Fn(&FlowKey, &Flow) -> bool) -> Vec<(FlowKey, u32)> {
        self.flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, f)| pred(k, f))
            .map(|(k, f)| (k, f.identity))
            .collect()
    }

    /// Deletes `doomed` (those the kernel already removed count too: they
    /// existed when the caller decided to cut them) and lowers the flow
    /// counts by what this removed.
    fn delete_flows(&mut self, doomed: &[(FlowKey, u32)]) {
        let mut per_slot = std::collections::HashMap::<u32, u32>::new();
        for (k, slot) in doomed {
            if self.flows.remove(k).is_ok() {
                *per_slot.entry(*slot).or_default() += 1;
            }
        }
        self.flows_removed += doomed.len() as u64;
        for (slot, n) in per_slot {
            let cur = self.flow_count.get(&slot, 0).unwrap_or(0);
            let _ = self.flow_count.set(slot, cur.saturating_sub(n), 0);
        }
    }

    /// Removes every flow of identity `slot`.
    pub fn remove_flows_of(&mut self, slot: u32) -> Result<usize, KernelError> {
        self.remove_flows(|_, f| f.identity == slot)
    }

    /// Flow counts per identity slot, as the kernel holds them.
    pub fn flow_counts(&self) -> Result<Vec<u32>, KernelError> {
        (0..MAX_IDENTITIES)
            .map(|slot| {
                self.flow_count
                    .get(&slot, 0)
                    .map_err(|e| KernelError::map(names::FLOW_COUNT, e))
            })
            .collect()
    }

    /// One pass over the flow table: removes idle flows (see
    /// [`FLOW_IDLE_NS`]) and sets each identity's flow count to its live
    /// flows. Flows the kernel created during the pass are kept in the
    /// count (read before and after, the difference added), so the count
    /// errs high, never low, while connections are being opened.
    pub fn recount_flows(&mut self, now_ns: u64) -> Result<FlowCensus, KernelError> {
        let before = self.flow_counts()?;
        let mut census = FlowCensus::default();
        let mut idle = Vec::new();
        for (k, f) in self.flows.iter().filter_map(Result::ok) {
            if f.expires_ns.saturating_add(FLOW_IDLE_NS) < now_ns {
                idle.push(k);
            } else {
                census.live += 1;
                *census.per_slot.entry(f.identity).or_default() += 1;
            }
        }
        for k in &idle {
            if self.flows.remove(k).is_ok() {
                census.removed += 1;
            }
        }
        for slot in 1..MAX_IDENTITIES {
            let after = self
                .flow_count
                .get(&slot, 0)
                .map_err(|e| KernelError::map(names::FLOW_COUNT, e))?;
            let counted = census.per_slot.get(&slot).copied().unwrap_or(0);
            let want = counted.saturating_add(after.saturating_sub(before[slot as usize]));
            if want != after {
                self.flow_count
                    .set(slot, want, 0)
                    .map_err(|e| KernelError::map(names::FLOW_COUNT, e))?;
            }
        }
        Ok(census)
    }

    /// How full each bounded table is. Counting walks the hash maps' keys
    /// (one syscall per entry): for status and the periodic summary, not
    /// for every packet. `flows`: the live flows a recent
    /// [`Maps::recount_flows`] found, to spare the largest walk.
    pub fn occupancy(&mut self, flows: Option<u32>) -> Result<Vec<TableFill>, KernelError> {
        use aya::maps::IterableMap;
        let cap = |m: &MapData, name: &str| -> Result<u32, KernelError> {
            Ok(m.info()
                .map_err(|e| KernelError::map(name, e))?
                .max_entries())
        };
        let identities = self.index()?.len() as u32;
        Ok(vec![
            TableFill {
                map: names::ADMISSIONS,
                entries: self.admissions.keys().filter_map(Result::ok).count() as u32,
                capacity: cap(self.admissions.map(), names::ADMISSIONS)?,
                knob: "kernel.max_admissions",
            },
            TableFill {
                map: names::FLOWS,
                entries: flows.unwrap_or_else(|| self.flow_count() as u32),
                capacity: cap(self.flows.map(), names::FLOWS)?,
                knob: "kernel.max_flows",
            },
            TableFill {
                map: names::IDENTITIES,
                entries: identities,
                // Slot 0 is never used.
                capacity: MAX_IDENTITIES - 1,
                knob: "(fixed: revoke identities or wait for them to expire)",
            },
            TableFill {
                map: names::KNOCK_SRC,
                entries: self.knock_sources.keys().filter_map(Result::ok).count() as u32,
                capacity: cap(self.knock_sources.map(), names::KNOCK_SRC)?,
                knob: "kernel.max_knock_sources",
            },
        ])
    }

    /// Drop (and pass) counters summed over CPUs, indexed by `Reason`.
    /// Every reason's counter, then (from `SHADOW_COUNTERS`) the same
    /// reasons for shadow-mode services' packets that passed instead.
    pub fn reason_counts(&self) -> Result<[u64; DROP_COUNTERS as usize], KernelError> {
        let mut out = [0u64; DROP_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .drops
                .get(&(i as u32), 0)
                .map_err(|e| KernelError::map(names::DROPS, e))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Packets refused per protected service since the map was created:
    /// (service id, count), from the usage columns the services hold.
    pub fn service_drops(&self) -> Result<Vec<(u32, u64)>, KernelError> {
        let cols = self.usage_columns()?;
        let mut out = Vec::new();
        for (col, id) in cols.iter().enumerate() {
            if *id == 0 {
                continue;
            }
            let per_cpu = self
                .service_drops
                .get(&(col as u32), 0)
                .map_err(|e| KernelError::map(names::SERVICE_DROPS, e))?;
            out.push((*id, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// One (slot, column) row summed over CPUs.
    pub fn usage_row(&self, slot: u32, col: u32) -> Result<IdentityStats, KernelError> {
        let per_cpu = self
            .usage
            .get(&usage_row(slot, col), 0)
            .map_err(|e| KernelError::map(names::USAGE, e))?;
        let mut s = IdentityStats::default();
        for c in per_cpu.iter() {
            add_stats(&mut s, c);
        }
        Ok(s)
    }

    /// An identity slot's counters over all services.
    pub fn identity_stats(&self, slot: u32) -> Result<IdentityStats, KernelError> {
        let mut s = IdentityStats::default();
        for col in 0..MAX_USAGE_SERVICES {
            add_stats(&mut s, &self.usage_row(slot, col)?);
        }
        Ok(s)
    }

    /// Cumulative counters of every identity slot in use, per service that
    /// has a column, summed over CPUs; rows never counted into are left
    /// out. One read of each identity slot plus one per-CPU read per (slot
    /// in use, service): the accountant calls this every second.
    pub fn usage(&self) -> Result<Vec<Usage>, KernelError> {
        let cols: Vec<(u32, u32)> = self
            .usage_columns()?
            .into_iter()
            .enumerate()
            .filter(|(_, id)| *id != 0)
            .map(|(c, id)| (c as u32, id))
            .collect();
        let mut out = Vec::new();
        if cols.is_empty() {
            return Ok(out);
        }
        for slot in 1..MAX_IDENTITIES {
            let id = self.identity(slot)?;
            if id.state == IDENTITY_FREE {
                continue;
            }
            for &(col, service) in &cols {
                let stats = self.usage_row(slot, col)?;
                if stats != IdentityStats::default() {
                    out.push(Usage {
                        slot,
                        identity_key: id.key,
                        service,
                        stats,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Names the instance of the usage counters: the boot and the kernel's
    /// id of the `PCL_USAGE` map. Maps created afresh (a first load, a load
    /// after `agent detach`, a reboot) get another name and start from
    /// zero; pinned maps that were adopted keep theirs.
    pub fn usage_instance(&self) -> Result<String, KernelError> {
        use aya::maps::IterableMap;
        instance_of(self.usage.map(), names::USAGE)
    }

    /// The same for the drop counters (`PCL_DROPS`).
    pub fn drops_instance(&self) -> Result<String, KernelError> {
        use aya::maps::IterableMap;
        instance_of(self.drops.map(), names::DROPS)
    }

    /// Drains the sampled drop events the kernel has written so far.
    pub fn drain_events(&mut self, max: usize) -> Vec<DropEvent> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.events.next() else {
                break;
            };
            if item.len() >= std::mem::size_of::<DropEvent>() {
                // SAFETY: the kernel wrote a DropEvent (repr(C), Pod); the
                // read is unaligned-safe.
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DropEvent) };
                out.push(ev);
            }
        }
        out
    }

    pub fn flow_count(&self) -> usize {
        self.flows.keys().filter_map(Result::ok).count()
    }
}

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// `<boot id>/<map id>`: names one map for as long as it exists.
fn instance_of(map: &MapData, name: &str) -> Result<String, KernelError> {
    let id = map.info().map_err(|e| KernelError::map(name, e))?.id();
    let boot =
        std::fs::read_to_string(BOOT_ID).map_err(|e| KernelError::io(Path::new(BOOT_ID), e))?;
    Ok(format!("{}/{id}", boot.trim()))
}

/// A hash map refuses a new key when it is full with E2BIG (ENOMEM or
/// ENOSPC when the kernel cannot allocate the element).
fn is_full(e: &aya::maps::MapError) -> bool {
    matches!(
        e,
        aya::maps::MapError::SyscallError(s)
            if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM))
    )
}

fn add_stats(s: &mut IdentityStats, c: &IdentityStats) {
    s.connections = s.connections.wrapping_add(c.connections);
    s.packets_in = s.packets_in.wrapping_add(c.packets_in);
    s.bytes_in = s.bytes_in.wrapping_add(c.bytes_in);
    s.packets_out = s.packets_out.wrapping_add(c.packets_out);
    s.bytes_out = s.bytes_out.wrapping_add(c.bytes_out);
    s.dropped = s.dropped.wrapping_add(c.dropped);
}

/// Deletes the entries `pred` selects. Keys are collected first: deleting
/// while iterating a BPF hash map restarts or skips the walk.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    pred: impl Fn(&K, &V) -> bool,
) -> Result<usize, KernelError> {
    let doomed: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| pred(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &doomed {
        let _ = map.remove(k);
    }
    Ok(doomed.len())
}

/// Where each map is pinned.
pub fn pin_path(pin_dir: &Path, map: &str) -> PathBuf {
    pin_dir.join("maps").join(map)
}
