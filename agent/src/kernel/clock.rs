//! The agent's clocks. Kernel time as the programs read it:
//! `bpf_ktime_get_coarse_ns`, which is CLOCK_MONOTONIC_COARSE (jiffy
//! resolution); expiries the agent writes must come from the same clock to
//! compare correctly in the kernel. Audit events carry CLOCK_MONOTONIC (fine
//! resolution) beside the wall clock, as signed Unix nanoseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Nanoseconds since the Unix epoch, negative before it, saturating.
pub fn unix_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// Milliseconds since the Unix epoch, negative before it.
pub fn unix_ms(t: SystemTime) -> i64 {
    unix_ns(t).div_euclid(1_000_000)
}

/// Kernel time `ttl` from now.
pub fn expiry_after(ttl: Duration) -> u64 {
    monotonic_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
}

/// The inverse of [`unix_ns`] (times before 1970 are 1970).
pub fn from_unix_ns(ns: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}
