//! Types shared by the kernel programs and the agent: map keys and values,
//! drop reasons, event records, map names and limits.
//!
//! Everything here is `#[repr(C)]`, fixed-size, padded explicitly (the
//! verifier rejects reads of uninitialised stack padding in keys) and free of
//! allocation. With the `user` feature the types implement `aya::Pod`.
#![no_std]

/// Bumped whenever a map's key/value layout or meaning changes. A restarted
/// agent refuses to adopt pinned maps written under another layout.
///
/// 2: usage counters per (identity, service) (`PCL_USAGE`, `PCL_USAGE_COLS`),
/// a usage column in `PortEntry`, `ServiceRef` values in `PCL_SERVICES`, and
/// the column in `Flow`.
/// 3: `bad_flags` and `flow_quota` reasons, `Identity::max_flows`, the
/// per-identity flow counters (`PCL_FLOW_CNT`) and identity names
/// (`PCL_IDENT_NAME`).
/// 4: shadow mode: `PORT_TCP_SHADOW`/`PORT_UDP_SHADOW`, `ServiceRef::flags`,
/// and `PCL_DROPS` twice as long (`SHADOW_COUNTERS`); drops per service
/// (`PCL_SVC_DROPS`, by usage column).
pub const LAYOUT_VERSION: u32 = 4;

/// Address family tags used in keys (addresses are always 16 bytes; IPv4 is
/// stored IPv4-mapped, `::ffff:a.b.c.d`, RFC 4291 §2.5.5.2).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Map names (at most 15 bytes: the kernel's object-name limit).
pub mod maps {
    pub const PORTS: &str = "PCL_PORTS";
    pub const SERVICES: &str = "PCL_SERVICES";
    pub const ADMISSIONS: &str = "PCL_ADMIT";
    pub const IDENTITIES: &str = "PCL_IDENT";
    pub const RATES: &str = "PCL_RATES";
    pub const FLOWS: &str = "PCL_FLOWS";
    pub const USAGE: &str = "PCL_USAGE";
    pub const USAGE_COLS: &str = "PCL_USAGE_COLS";
    pub const DROPS: &str = "PCL_DROPS";
    pub const KNOCK_SRC: &str = "PCL_KNOCK_SRC";
    pub const KNOCK_ALL: &str = "PCL_KNOCK_ALL";
    pub const CONFIG: &str = "PCL_CONFIG";
    pub const EVENTS: &str = "PCL_EVENTS";
    pub const EVENT_BUDGET: &str = "PCL_EVT_BUDGET";
    pub const META: &str = "PCL_META";
    pub const FLOW_COUNT: &str = "PCL_FLOW_CNT";
    pub const IDENTITY_NAMES: &str = "PCL_IDENT_NAME";
    pub const SERVICE_DROPS: &str = "PCL_SVC_DROPS";

    /// Every map, in the order the agent pins and adopts them.
    pub const ALL: [&str; 18] = [
        PORTS,
        SERVICES,
        ADMISSIONS,
        IDENTITIES,
        RATES,
        FLOWS,
        USAGE,
        USAGE_COLS,
        DROPS,
        KNOCK_SRC,
        KNOCK_ALL,
        CONFIG,
        EVENTS,
        EVENT_BUDGET,
        META,
        FLOW_COUNT,
        IDENTITY_NAMES,
        SERVICE_DROPS,
    ];
}

/// Program names (the function names in the eBPF object).
pub mod programs {
    pub const INGRESS: &str = "portcullis_ingress";
    pub const EGRESS: &str = "portcullis_egress";
    /// A program that drops everything: the benchmark's baseline.
    pub const BASELINE_DROP: &str = "portcullis_baseline_drop";
}

/// Default map sizes (entries); the config can change them at first load.
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;
pub const DEFAULT_MAX_ADMISSIONS: u32 = 16_384;
pub const DEFAULT_MAX_KNOCK_SOURCES: u32 = 16_384;
/// Identity slots: an array, so fixed at compile time.
pub const MAX_IDENTITIES: u32 = 4_096;
/// Service ids index nothing but are kept below this for sanity checks.
pub const MAX_SERVICES: u32 = 1_024;
/// Usage is counted per identity slot and per service *column*: each
/// service the agent protects gets one of `MAX_USAGE_SERVICES` small
/// columns (written into its port entry, its `ServiceRef` and its flows),
/// so the hot path indexes a per-CPU array (`usage_row`) instead of
/// hashing. Memory: `MAX_IDENTITIES * MAX_USAGE_SERVICES * 48` bytes per
/// CPU (1.5 MiB).
pub const USAGE_COL_BITS: u32 = 3;
pub const MAX_USAGE_SERVICES: u32 = 1 << USAGE_COL_BITS;
/// Rows of `PCL_USAGE`.
pub const USAGE_ROWS: u32 = MAX_IDENTITIES * MAX_USAGE_SERVICES;

/// The `PCL_USAGE` row of (identity slot, service column). Out-of-range
/// columns are folded in (the verifier sees a bounded index); slots past
/// `MAX_IDENTITIES` land past the array and the lookup fails.
#[inline(always)]
pub const fn usage_row(slot: u32, col: u32) -> u32 {
    (slot << USAGE_COL_BITS) | (col & (MAX_USAGE_SERVICES - 1))
}
pub const EVENT_RING_BYTES: u32 = 256 * 1024;
/// Port table: one entry per destination port.
pub const PORT_TABLE_SIZE: u32 = 65_536;
/// IPv6 extension headers walked before giving up (bounded loop).
pub const MAX_IPV6_EXT_HEADERS: u32 = 6;

/// Why the kernel dropped (or flagged) a packet: index into the per-CPU
/// `PCL_DROPS` array. Append only: the numbers are part of the pinned layout.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Passed packets that reached a protected service (not a drop; counted
    /// here so one read gives the full picture).
    Passed = 0,
    /// No admission covers (source, service).
    NoAdmission = 1,
    /// An admission existed but its kernel-time expiry has passed.
    Expired = 2,
    /// The identity was revoked (state or epoch changed).
    Revoked = 3,
    /// New-connection rate of the identity exceeded.
    ConnRate = 4,
    /// Ingress byte rate of the identity exceeded.
    ByteRate = 5,
    /// Truncated or inconsistent header aimed at (or possibly aimed at) a
    /// protected service: bad IHL, total length, short L4 header.
    Malformed = 6,
    /// IPv4 fragment or IPv6 fragment header whose first fragment targets a
    /// protected service, or a first fragment too short to hold the ports.
    Fragment = 7,
    /// IPv6 extension chain longer than `MAX_IPV6_EXT_HEADERS`.
    ExtChain = 8,
    /// Knock datagram over the per-source pre-auth limit.
    KnockSourceRate = 9,
    /// Knock datagram over the node-wide pre-auth limit.
    KnockGlobalRate = 10,
    /// Response bytes over the identity's egress cap (TC egress).
    EgressCap = 11,
    /// Knock datagrams passed to the agent (not a drop).
    KnockPassed = 12,
    /// Flow-table insert failed (map full even for LRU; should not happen).
    FlowInsert = 13,
    /// TCP without a flow whose flags cannot open or continue a
    /// connection: SYN with RST/FIN/ACK, RST, FIN or no flags at all, Xmas.
    /// Only a clean SYN opens a flow (RFC 9293 §3.5); a segment with ACK
    /// (and no SYN/RST) may re-create an evicted one.
    BadFlags = 14,
    /// The identity already has `Identity::max_flows` live flows.
    FlowQuota = 15,
}

/// `PCL_DROPS` holds the counters of every reason, then at this offset the
/// same reasons for packets of shadow-mode services that passed instead.
pub const SHADOW_COUNTERS: u32 = Reason::COUNT;
/// Length of `PCL_DROPS`.
pub const DROP_COUNTERS: u32 = 2 * Reason::COUNT;

impl Reason {
    pub const COUNT: u32 = 16;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Passed,
        Reason::NoAdmission,
        Reason::Expired,
        Reason::Revoked,
        Reason::ConnRate,
        Reason::ByteRate,
        Reason::Malformed,
        Reason::Fragment,
        Reason::ExtChain,
        Reason::KnockSourceRate,
        Reason::KnockGlobalRate,
        Reason::EgressCap,
        Reason::KnockPassed,
        Reason::FlowInsert,
        Reason::BadFlags,
        Reason::FlowQuota,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::Passed => "passed",
            Reason::NoAdmission => "no_admission",
            Reason::Expired => "expired",
            Reason::Revoked => "revoked",
            Reason::ConnRate => "conn_rate",
            Reason::ByteRate => "byte_rate",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::ExtChain => "ext_chain",
            Reason::KnockSourceRate => "knock_source_rate",
            Reason::KnockGlobalRate => "knock_global_rate",
            Reason::EgressCap => "egress_cap",
            Reason::KnockPassed => "knock_passed",
            Reason::FlowInsert => "flow_insert",
            Reason::BadFlags => "bad_flags",
            Reason::FlowQuota => "flow_quota",
        }
    }

    pub fn from_u32(v: u32) -> Option<Reason> {
        Self::ALL.get(v as usize).copied()
    }

    /// Whether this reason is a drop (as opposed to a pass counter).
    pub const fn is_drop(self) -> bool {
        !matches!(self, Reason::Passed | Reason::KnockPassed)
    }
}

/// `PCL_PORTS[dport]`: which services live on a destination port. A service
/// id of 0 means none. The flag says that address-specific services exist on
/// this port, so the kernel must consult `PCL_SERVICES` with the destination
/// address before falling back to the wildcard id. One array lookup decides
/// the unprotected fast path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    pub tcp_service: u32,
    pub udp_service: u32,
    pub flags: u32,
    /// Usage columns (`usage_row`) of the wildcard services above.
    pub tcp_col: u8,
    pub udp_col: u8,
    pub _pad: u16,
}

pub const PORT_TCP_BY_ADDR: u32 = 1;
pub const PORT_UDP_BY_ADDR: u32 = 2;
/// UDP datagrams to this port are knocks: pre-auth rate limited, then passed
/// to the agent's socket.
pub const PORT_KNOCK: u32 = 4;
/// The wildcard TCP (UDP) service of this port is in shadow mode: what it
/// would drop passes and is counted at `SHADOW_COUNTERS + reason`.
pub const PORT_TCP_SHADOW: u32 = 8;
pub const PORT_UDP_SHADOW: u32 = 16;

/// `PCL_SERVICES` key: an address-specific service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `PCL_SERVICES` value: the address-specific service and its usage column.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    pub id: u32,
    pub col: u32,
    /// `SERVICE_SHADOW`.
    pub flags: u32,
    pub _pad: u32,
}

/// `ServiceRef::flags`: the service is in shadow mode.
pub const SERVICE_SHADOW: u32 = 1;

/// `PCL_ADMIT` key. `src_port` 0 covers every source port; a non-zero port
/// is a flow-scoped admission for exactly one 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AdmissionKey {
    pub addr: [u8; 16],
    pub service: u32,
    pub src_port: u16,
    pub _pad: u16,
}

/// `PCL_ADMIT` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// Identity slot (index into `PCL_IDENT`).
    pub identity: u32,
    /// Identity epoch at grant time; a later revocation bumps the epoch.
    pub epoch: u32,
    /// Kernel monotonic time (ns, `bpf_ktime_get_ns`) after which it is dead.
    pub expires_ns: u64,
    /// `ADMIT_ONE_USE`: removed once its flow is created (flow-scoped).
    pub flags: u32,
    pub _pad: u32,
}

pub const ADMIT_ONE_USE: u32 = 1;

/// Identity states in `PCL_IDENT`.
pub const IDENTITY_FREE: u32 = 0;
pub const IDENTITY_LIVE: u32 = 1;
pub const IDENTITY_REVOKED: u32 = 2;

/// `PCL_IDENT[slot]`: an identity's state and its limits. Rates are GCRA
/// parameters precomputed by the agent so the kernel only adds and compares:
/// a cost in nanoseconds per unit, and a tolerance (burst) in nanoseconds.
/// A zero cost means unlimited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub state: u32,
    pub epoch: u32,
    /// Hash of the identity's name/subject, so a restarted agent can map
    /// slots back to names.
    pub key: u64,
    /// Nanoseconds of budget one new connection costs.
    pub conn_cost_ns: u64,
    pub conn_burst_ns: u64,
    /// Nanoseconds per byte, fixed point with `BYTE_COST_SHIFT` fraction bits.
    pub in_byte_cost: u64,
    pub in_burst_ns: u64,
    pub out_byte_cost: u64,
    pub out_burst_ns: u64,
    /// Most flows this identity may have at once (0: unlimited); counted
    /// in `PCL_FLOW_CNT[slot]`.
    pub max_flows: u32,
    pub _pad: u32,
}

pub const BYTE_COST_SHIFT: u32 = 16;

/// `PCL_RATES[slot]`: GCRA theoretical arrival times, shared by all CPUs.
/// Updates race between CPUs; the error is bounded by the packets in flight
/// on other CPUs at the same instant (docs/data-plane.md).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    pub conn_tat: u64,
    pub in_tat: u64,
    pub out_tat: u64,
}

/// `PCL_IDENT_NAME[slot]`: the identity's name as people read it (see
/// the agent's `identity` module), so `agent status` and `revoke` can name
/// slots without the agent running. Written by the agent; the kernel never
/// reads it. Names longer than `IDENTITY_NAME_BYTES` are cut (the key in
/// `Identity::key` still tells them apart).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityName {
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; IDENTITY_NAME_BYTES],
}

pub const IDENTITY_NAME_BYTES: usize = 120;

impl Default for IdentityName {
    fn default() -> Self {
        IdentityName {
            len: 0,
            _pad: 0,
            bytes: [0; IDENTITY_NAME_BYTES],
        }
    }
}

/// `PCL_FLOWS` key: a 5-tuple as seen on ingress (client → service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `PCL_FLOWS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub identity: u32,
    pub epoch: u32,
    pub service: u32,
    /// Initial sequence number of the SYN that created the flow: a
    /// retransmitted SYN repeats it, a new connection on the same 5-tuple
    /// does not (flow-scoped admissions admit one connection only).
    pub syn_seq: u32,
    /// Cached admission expiry; past it the kernel re-reads the admission
    /// (a re-knock extends it) or drops.
    pub expires_ns: u64,
    /// The service's usage column when the flow was created: egress charges
    /// responses to `usage_row(identity, col)`.
    pub col: u32,
    pub _pad: u32,
}

/// `PCL_USAGE[usage_row(slot, col)]` (per CPU): counters per identity and
/// service, which the agent sums over CPUs every interval. Cumulative since
/// the map was created, except that the agent zeroes a slot's rows when it
/// gives the slot to a new identity and a column's rows when it gives the
/// column to a new service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityStats {
    pub connections: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub dropped: u64,
}

/// `PCL_CONFIG[0]`: node-wide knobs the agent writes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// UDP port of the knock listener; 0 disables the pre-auth limiter.
    pub knock_port: u16,
    /// `CFG_*` flags.
    pub flags: u16,
    /// Sampled events per CPU per second (0: none). The agent resets each
    /// CPU's budget every second, so the kernel never reads a clock for it.
    pub events_per_sec: u32,
    /// Per-source knock GCRA: ns per datagram and tolerance.
    pub knock_src_cost_ns: u64,
    pub knock_src_burst_ns: u64,
    /// Node-wide knock GCRA (per CPU), same units.
    pub knock_all_cost_ns: u64,
    pub knock_all_burst_ns: u64,
}

/// `KernelConfig::flags`: flow-scoped admissions may exist, so a miss on
/// the (source, service) admission also tries the exact source port. Off,
/// the drop path saves a hash lookup.
pub const CFG_FLOW_SCOPED: u16 = 1;

/// `PCL_EVT_BUDGET[0]` (per CPU): events sampled since the agent last reset
/// the budget (every second).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub count: u32,
    pub _pad: u32,
}

/// `PCL_META[0]`: written by the agent after a load, read on adoption.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub layout_version: u32,
    /// Changed by every process that changes which identity a slot of
    /// `PCL_IDENT` holds (the agent, `agent admit`): a process whose
    /// identity index was built at another generation rebuilds it, and one
    /// at the same generation knows a key missing from its index is new.
    /// The kernel never reads it.
    pub identity_gen: u32,
    /// SHA-256 prefix of the eBPF object that is attached.
    pub object_hash: [u8; 32],
}

/// A sampled drop, written to the `PCL_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub time_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
    pub reason: u32,
    pub service: u32,
}

/// IPv4-mapped IPv6 address bytes for an IPv4 address (network order in).
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are repr(C), Copy, built only of integers and byte
    // arrays with explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for PortEntry {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceRef {}
    unsafe impl aya::Pod for AdmissionKey {}
    unsafe impl aya::Pod for Admission {}
    unsafe impl aya::Pod for Identity {}
    unsafe impl aya::Pod for RateState {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for IdentityStats {}
    unsafe impl aya::Pod for KernelConfig {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for Meta {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for IdentityName {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // Layout is part of the pinned ABI: catch accidental changes.
    #[test]
    fn sizes_are_stable_and_padded() {
        assert_eq!(size_of::<PortEntry>(), 16);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<AdmissionKey>(), 24);
        assert_eq!(size_of::<Admission>(), 24);
        assert_eq!(size_of::<Identity>(), 72);
        assert_eq!(size_of::<IdentityName>(), 128);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 32);
        assert_eq!(size_of::<ServiceRef>(), 16);
        assert_eq!(size_of::<IdentityStats>(), 48);
        assert_eq!(size_of::<DropEvent>(), 56);
        assert_eq!(size_of::<KernelConfig>(), 40);
    }

    #[test]
    fn usage_rows_stay_in_the_array() {
        assert_eq!(usage_row(0, 0), 0);
        assert_eq!(usage_row(1, 2), MAX_USAGE_SERVICES + 2);
        assert_eq!(
            usage_row(MAX_IDENTITIES - 1, MAX_USAGE_SERVICES - 1),
            USAGE_ROWS - 1
        );
        // A column out of range never reaches another slot's row.
        assert_eq!(usage_row(3, MAX_USAGE_SERVICES), usage_row(3, 0));
    }

    #[test]
    fn reasons_round_trip() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(Reason::COUNT), None);
    }

    #[test]
    fn v4_mapping() {
        assert_eq!(
            v4_mapped([10, 0, 0, 1]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]
        );
    }
}
