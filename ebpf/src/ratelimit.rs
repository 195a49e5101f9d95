//! GCRA (generic cell rate algorithm, ITU-T I.371 virtual scheduling): one
//! u64 "theoretical arrival time" per bucket instead of tokens + timestamp,
//! so an update is a compare and a store. Costs and tolerances arrive
//! precomputed from the agent (nanoseconds), so the kernel never divides.

/// Charges `cost_ns` against the bucket whose state is `*tat`. Returns
/// whether the packet conforms. A zero cost means "unlimited".
///
/// Concurrent CPUs may read the same `tat` and both conform: the overshoot
/// is bounded by the packets in flight at that instant (no 64-bit atomics in
/// this eBPF toolchain; see docs/data-plane.md).
#[inline(always)]
pub fn conform(tat: *mut u64, now: u64, cost_ns: u64, burst_ns: u64) -> bool {
    if cost_ns == 0 {
        return true;
    }
    let current = unsafe { *tat };
    let start = if current > now { current } else { now };
    let next = start.saturating_add(cost_ns);
    // Conform while the schedule runs at most `burst_ns` ahead of now; one
    // unit always fits an idle bucket, so a packet larger than the burst is
    // throttled, never starved.
    let limit = if burst_ns > cost_ns {
        burst_ns
    } else {
        cost_ns
    };
    if next - now > limit {
        return false;
    }
    unsafe { *tat = next };
    true
}

/// Nanoseconds of budget `bytes` cost at `cost_q16` ns/byte (16 fraction bits).
/// Operands are clamped so the product fits 64 bits: BPF has no 128-bit
/// multiply, so `saturating_mul` would not link. A frame is < 2^17 bytes and
/// the slowest rate the agent accepts (1 B/s) costs < 2^46.
#[inline(always)]
pub fn byte_cost(bytes: u64, cost_q16: u64) -> u64 {
    const MAX_BYTES: u64 = (1 << 17) - 1;
    const MAX_COST: u64 = 1 << 46;
    let bytes = if bytes > MAX_BYTES { MAX_BYTES } else { bytes };
    let cost = if cost_q16 > MAX_COST {
        MAX_COST
    } else {
        cost_q16
    };
    (bytes * cost) >> portcullis_common::BYTE_COST_SHIFT
}
