//! Usage → money: integer micro-units, never floats.
//!
//! Rounding: byte prices are per MiB (2^20 bytes), so the exact cost of
//! `b` bytes at `p` micro-units per MiB is `b * p / 2^20` micro-units. Each
//! interval charges the whole micro-units of that (rounded down) and
//! carries the fraction, in 2^-20 micro-units, to the next interval of the
//! same identity and service ([`Carry`]). So however usage is split into
//! intervals, the cost charged so far is always exactly
//! `floor(total_bytes * p / 2^20)`: many small intervals cost what one big
//! one does, never more. Connections are whole units and need no carry.
//! Intermediates are `u128` (2^64 bytes times a price up to 2^64 fits);
//! results saturate at `u64::MAX`.

use serde::{Deserialize, Serialize};

use crate::config::Price;

/// Bytes per MiB, as a shift.
pub const MIB_SHIFT: u32 = 20;
const FRACTION_MASK: u128 = (1 << MIB_SHIFT) - 1;

/// Sub-micro-unit remainders of one identity's use of one service, in
/// 2^-20 micro-units (each below 2^20).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    pub in_frac: u64,
    pub out_frac: u64,
}

impl Carry {
    pub fn is_zero(&self) -> bool {
        self.in_frac == 0 && self.out_frac == 0
    }
}

/// What one interval's usage costs at `price`, carrying fractions in `carry`.
pub fn cost(
    price: &Price,
    connections: u64,
    bytes_in: u64,
    bytes_out: u64,
    carry: &mut Carry,
) -> u64 {
    let conns = u128::from(connections) * u128::from(price.per_connection_micros);
    let bytes_in_cost = per_mib(bytes_in, price.per_mib_in_micros, &mut carry.in_frac);
    let bytes_out_cost = per_mib(bytes_out, price.per_mib_out_micros, &mut carry.out_frac);
    saturate(
        conns
            .saturating_add(bytes_in_cost)
            .saturating_add(bytes_out_cost),
    )
}

fn per_mib(bytes: u64, micros_per_mib: u64, frac: &mut u64) -> u128 {
    // At most (2^64 - 1)^2 + 2^20 - 1 < 2^128: cannot overflow.
    let exact = u128::from(bytes) * u128::from(micros_per_mib) + u128::from(*frac);
    *frac = (exact & FRACTION_MASK) as u64;
    exact >> MIB_SHIFT
}

pub fn saturate(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(conn: u64, mib_in: u64, mib_out: u64) -> Price {
        Price {
            per_connection_micros: conn,
            per_mib_in_micros: mib_in,
            per_mib_out_micros: mib_out,
        }
    }

    #[test]
    fn exact_micro_units() {
        let p = price(250, 1_000_000, 3_000_000);
        let mut c = Carry::default();
        // 4 connections, 3 MiB in, 1 MiB out: 1000 + 3,000,000 + 3,000,000.
        assert_eq!(cost(&p, 4, 3 << 20, 1 << 20, &mut c), 6_001_000);
        assert!(c.is_zero());
        // Half a MiB in at 1,000,001 per MiB: 500,000.5 → 500,000, 0.5 carried.
        let p = price(0, 1_000_001, 0);
        assert_eq!(cost(&p, 0, 1 << 19, 0, &mut c), 500_000);
        assert_eq!(c.in_frac, 1 << 19);
        // The other half: 500,000.5 + 0.5 = 500,001.
        assert_eq!(cost(&p, 0, 1 << 19, 0, &mut c), 500_001);
        assert!(c.is_zero());
        // Free service: usage costs nothing.
        assert_eq!(cost(&Price::default(), 9, 9 << 20, 9, &mut c), 0);
    }

    #[test]
    fn small_intervals_cost_exactly_what_one_big_one_does() {
        let p = price(7, 1_234_567, 987_654);
        // An awkward byte sequence: primes and odd sizes.
        let chunks: Vec<(u64, u64)> = (1..2_000u64)
            .map(|i| ((i * 7_919) % 65_537, (i * 104_729) % 9_973))
            .collect();
        let mut carry = Carry::default();
        let small: u64 = chunks
            .iter()
            .map(|&(i, o)| cost(&p, 1, i, o, &mut carry))
            .sum();
        let (ti, to): (u64, u64) = chunks.iter().fold((0, 0), |(a, b), &(i, o)| (a + i, b + o));
        let mut big_carry = Carry::default();
        let big = cost(&p, chunks.len() as u64, ti, to, &mut big_carry);
        assert_eq!(small, big);
        assert_eq!(carry, big_carry);
        // And exactly floor(bytes * price / 2^20) per direction.
        let want = chunks.len() as u128 * 7
            + ((u128::from(ti) * 1_234_567) >> 20)
            + ((u128::from(to) * 987_654) >> 20);
        assert_eq!(u128::from(big), want);
    }

    #[test]
    fn big_numbers_saturate_instead_of_overflowing() {
        let p = price(u64::MAX, u64::MAX, u64::MAX);
        let mut c = Carry::default();
        assert_eq!(cost(&p, u64::MAX, u64::MAX, u64::MAX, &mut c), u64::MAX);
        assert!(c.in_frac < 1 << MIB_SHIFT && c.out_frac < 1 << MIB_SHIFT);
        // Large but representable: 2^40 bytes (1 TiB) at 10^12 per MiB.
        let p = price(0, 1_000_000_000_000, 0);
        let mut c = Carry::default();
        assert_eq!(
            cost(&p, 0, 1 << 40, 0, &mut c),
            (1u64 << 20) * 1_000_000_000_000
        );
    }
}
