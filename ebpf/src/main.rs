//! portcullis kernel programs: XDP ingress enforcement, TC egress accounting.
//! Maps live here; the decisions live in `ingress` and `egress`.
#![no_std]
#![no_main]

mod egress;
mod events;
mod ingress;
mod parse;
mod ratelimit;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use portcullis_common::{
    Admission, AdmissionKey, DEFAULT_MAX_ADMISSIONS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_KNOCK_SOURCES,
    DROP_COUNTERS, EVENT_RING_BYTES, EventBudget, Flow, FlowKey, Identity, IdentityName,
    IdentityStats, KernelConfig, MAX_IDENTITIES, MAX_SERVICES, MAX_USAGE_SERVICES, Meta,
    PORT_TABLE_SIZE, PortEntry, RateState, Reason, SHADOW_COUNTERS, ServiceKey, ServiceRef,
    USAGE_ROWS,
};

/// Destination port → services on it (one array lookup decides the
/// unprotected fast path).
#[map(name = "PCL_PORTS")]
static PORTS: Array<PortEntry> = Array::with_max_entries(PORT_TABLE_SIZE, 0);

/// Address-specific services: (addr, port, proto) → service id and column.
#[map(name = "PCL_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceRef> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// (source, service[, source port]) → identity and expiry.
#[map(name = "PCL_ADMIT")]
static ADMISSIONS: HashMap<AdmissionKey, Admission> =
    HashMap::with_max_entries(DEFAULT_MAX_ADMISSIONS, 0);

#[map(name = "PCL_IDENT")]
static IDENTITIES: Array<Identity> = Array::with_max_entries(MAX_IDENTITIES, 0);

#[map(name = "PCL_RATES")]
static RATES: Array<RateState> = Array::with_max_entries(MAX_IDENTITIES, 0);

/// Established flows. LRU: a flood of new flows evicts old entries rather
/// than failing inserts, and the kernel re-derives an evicted flow from its
/// admission.
#[map(name = "PCL_FLOWS")]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Flows per identity slot, checked against `Identity::max_flows` when a
/// flow is created. The kernel counts up; the agent recounts the live flows
/// every few seconds (LRU evictions and closed connections are invisible
/// here), so the count errs high between recounts: the safe side.
#[map(name = "PCL_FLOW_CNT")]
static FLOW_COUNT: Array<u32> = Array::with_max_entries(MAX_IDENTITIES, 0);

/// Identity names for people (status, revoke); the kernel never reads it.
#[map(name = "PCL_IDENT_NAME")]
static IDENTITY_NAMES: Array<IdentityName> = Array::with_max_entries(MAX_IDENTITIES, 0);

/// Counters per (identity slot, service column): `usage_row`.
#[map(name = "PCL_USAGE")]
static USAGE: PerCpuArray<IdentityStats> = PerCpuArray::with_max_entries(USAGE_ROWS, 0);

/// Column → service id, written by the agent so any reader can name the
/// columns; the kernel never reads it.
#[map(name = "PCL_USAGE_COLS")]
static USAGE_COLS: Array<u32> = Array::with_max_entries(MAX_USAGE_SERVICES, 0);

/// Packets refused per protected service (enforced or shadow), by usage
/// column: what the agent's flood findings count.
#[map(name = "PCL_SVC_DROPS")]
static SERVICE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_USAGE_SERVICES, 0);

#[map(name = "PCL_DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_COUNTERS, 0);

/// Per-source knock pre-auth buckets (GCRA state). LRU so spoofed sources
/// recycle entries instead of growing anything.
#[map(name = "PCL_KNOCK_SRC")]
static KNOCK_SRC: LruHashMap<[u8; 16], u64> =
    LruHashMap::with_max_entries(DEFAULT_MAX_KNOCK_SOURCES, 0);

/// Node-wide knock bucket, one per CPU.
#[map(name = "PCL_KNOCK_ALL")]
static KNOCK_ALL: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "PCL_CONFIG")]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

#[map(name = "PCL_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

#[map(name = "PCL_EVT_BUDGET")]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// Written by the agent only; here so it is created and pinned with the rest.
#[map(name = "PCL_META")]
static META: Array<Meta> = Array::with_max_entries(1, 0);

#[xdp]
#[inline(always)]
pub fn portcullis_ingress(ctx: XdpContext) -> u32 {
    ingress::decide(&ctx)
}

#[classifier]
#[inline(always)]
pub fn portcullis_egress(ctx: TcContext) -> i32 {
    egress::decide(&ctx)
}

/// The benchmark's baseline: the cheapest possible XDP program.
#[xdp]
pub fn portcullis_baseline_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Adds one to a reason's per-CPU counter.
#[inline(always)]
fn count(reason: Reason) {
    if let Some(c) = DROPS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

/// Adds one to the counter of what a shadow-mode service would have
/// dropped for `reason`.
#[inline(always)]
fn count_shadow(reason: Reason) {
    if let Some(c) = DROPS.get_ptr_mut(SHADOW_COUNTERS + reason as u32) {
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
