//! Kernel time as the programs read it: `bpf_ktime_get_coarse_ns`, which is
//! CLOCK_MONOTONIC_COARSE (jiffy resolution). Expiries the agent writes must
//! come from the same clock to compare correctly in the kernel.

use std::time::Duration;

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clock always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kernel time `ttl` from now.
pub fn expiry_after(ttl: Duration) -> u64 {
    monotonic_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
}
