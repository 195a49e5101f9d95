//! Monotonic clocks. Kernel time as the programs read it:
//! `bpf_ktime_get_coarse_ns`, which is CLOCK_MONOTONIC_COARSE (jiffy
//! resolution); expiries the agent writes must come from the same clock to
//! compare correctly in the kernel. Audit events carry CLOCK_MONOTONIC (fine
//! resolution) beside the wall clock (`trail/src/time.rs`).

use std::time::Duration;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; both clocks always exist on Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kernel time (CLOCK_MONOTONIC_COARSE), as the BPF programs see it.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// CLOCK_MONOTONIC: never steps, fine resolution.
pub fn precise_monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Kernel time `ttl` from now.
pub fn expiry_after(ttl: Duration) -> u64 {
    monotonic_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
}
