//! Kernel monotonic time: what `bpf_ktime_get_ns` returns (CLOCK_MONOTONIC),
//! so expiries written by the agent compare correctly in the kernel.

use std::time::Duration;

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kernel time `ttl` from now.
pub fn expiry_after(ttl: Duration) -> u64 {
    monotonic_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
}
