//! Clamps: an identity's kernel rates lowered for a while, by a budget's
//! `throttle` (a percentage of its limits) or by the extraction guard (a
//! cap on its response bytes, enforced by TC egress,
//! `ebpf/src/egress.rs`). The kernel reads an identity's costs on every
//! packet, so rewriting them changes the rate of live connections at
//! once; the token-bucket state (`PCL_RATES`) is kept, so nothing bursts.

use crate::config::{CostControlSection, Limits};

/// What is lowered for one identity.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Clamp {
    /// Whose `[identities.NAME]` limits the identity has.
    pub limits_of: String,
    /// Connections and bytes in both directions at this percent of the
    /// limits (`None`: not throttled).
    pub throttle_percent: Option<u32>,
    /// Response bytes per second at most (`None`: no cap).
    pub egress_cap: Option<u64>,
}

fn part(v: u64, percent: u32, floor: u64) -> u64 {
    if v == 0 {
        // Unlimited: a percentage of it is not a rate; the floor is.
        floor
    } else {
        (u128::from(v) * u128::from(percent) / 100).max(1) as u64
    }
}

/// `base` with `clamp` applied; where a limit is unlimited the throttle
/// uses the `[cost_control]` floor.
pub fn clamped(base: Limits, clamp: &Clamp, floors: &CostControlSection) -> Limits {
    let mut l = base;
    if let Some(p) = clamp.throttle_percent {
        l.conn_per_sec = part(
            u64::from(l.conn_per_sec),
            p,
            u64::from(floors.throttle_floor_conn_per_sec),
        ) as u32;
        l.bytes_per_sec = part(l.bytes_per_sec, p, floors.throttle_floor_bytes_per_sec);
        l.egress_bytes_per_sec = part(
            l.egress_bytes_per_sec,
            p,
            floors.throttle_floor_bytes_per_sec,
        );
    }
    if let Some(cap) = clamp.egress_cap {
        l.egress_bytes_per_sec = match l.egress_bytes_per_sec {
            0 => cap,
            v => v.min(cap),
        };
        // A burst as large as a second's worth at most: the cap bites
        // within a second, not after the configured burst drained.
        l.egress_bytes_burst = l.egress_bytes_burst.min(cap.max(64 * 1024));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_scales_limits_and_floors_unlimited_ones() {
        let base = Limits {
            conn_per_sec: 50,
            bytes_per_sec: 10_000_000,
            egress_bytes_per_sec: 0,
            ..Limits::default()
        };
        let floors = CostControlSection::default();
        let c = Clamp {
            throttle_percent: Some(10),
            ..Clamp::default()
        };
        let l = clamped(base, &c, &floors);
        assert_eq!(l.conn_per_sec, 5);
        assert_eq!(l.bytes_per_sec, 1_000_000);
        assert_eq!(l.egress_bytes_per_sec, floors.throttle_floor_bytes_per_sec);
        // 1% of one connection a second is still one, never "unlimited".
        let one = Limits {
            conn_per_sec: 1,
            ..base
        };
        let c1 = Clamp {
            throttle_percent: Some(1),
            ..Clamp::default()
        };
        assert_eq!(clamped(one, &c1, &floors).conn_per_sec, 1);
        // No clamp: unchanged.
        assert_eq!(clamped(base, &Clamp::default(), &floors), base);
    }

    #[test]
    fn egress_cap_takes_the_lower_of_limit_and_cap() {
        let floors = CostControlSection::default();
        let cap = Clamp {
            egress_cap: Some(1 << 20),
            ..Clamp::default()
        };
        let unlimited = Limits::default();
        assert_eq!(
            clamped(unlimited, &cap, &floors).egress_bytes_per_sec,
            1 << 20
        );
        let lower = Limits {
            egress_bytes_per_sec: 1000,
            ..unlimited
        };
        assert_eq!(clamped(lower, &cap, &floors).egress_bytes_per_sec, 1000);
    }
}
