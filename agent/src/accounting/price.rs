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

use super::ledger::Counters;
use crate::config::Price;

/// Bytes per MiB, as a shift.
pub const MIB_SHIFT: u32 = 20;
/// Tokens per priced unit.
pub const PER_MTOK: u64 = 1_000_000;
/// GPU-milliseconds per priced GPU-hour.
pub const MS_PER_HOUR: u64 = 3_600_000;

/// Sub-micro-unit remainders of one identity's use of one service: bytes
/// in 2^-20 micro-units (below 2^20), tokens in 10^-6 (below 10^6), GPU
/// time in 1/3,600,000ths (below 3,600,000).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carry {
    pub in_frac: u64,
    pub out_frac: u64,
    #[serde(default)]
    pub tok_in_frac: u64,
    #[serde(default)]
    pub tok_out_frac: u64,
    #[serde(default)]
    pub gpu_frac: u64,
}

impl Carry {
    pub fn is_zero(&self) -> bool {
        *self == Carry::default()
    }
}

/// What one interval's usage costs at `price`, carrying fractions in `carry`.
pub fn cost(price: &Price, u: &Counters, carry: &mut Carry) -> u64 {
    let whole = |n: u64, p: u64| u128::from(n) * u128::from(p);
    let parts = [
        whole(u.connections, price.per_connection_micros),
        per_mib(u.bytes_in, price.per_mib_in_micros, &mut carry.in_frac),
        per_mib(u.bytes_out, price.per_mib_out_micros, &mut carry.out_frac),
        whole(u.requests, price.per_request_micros),
        per_unit(
            u.tokens_in,
            price.per_mtok_in_micros,
            PER_MTOK,
            &mut carry.tok_in_frac,
        ),
        per_unit(
            u.tokens_out,
            price.per_mtok_out_micros,
            PER_MTOK,
            &mut carry.tok_out_frac,
        ),
        per_unit(
            u.gpu_ms,
            price.per_gpu_hour_micros,
            MS_PER_HOUR,
            &mut carry.gpu_frac,
        ),
    ];
    saturate(parts.iter().fold(0u128, |a, p| a.saturating_add(*p)))
}

/// `n * price / unit`, rounded down, the remainder (below `unit`) carried.
fn per_unit(n: u64, price: u64, unit: u64, frac: &mut u64) -> u128 {
    // Below (2^64)^2 + 2^64: cannot overflow.
    let exact = u128::from(n) * u128::from(price) + u128::from(*frac);
    *frac = (exact % u128::from(unit)) as u64;
    exact / u128::from(unit)
}

fn per_mib(bytes: u64, micros_per_mib: u64, frac: &mut u64) -> u128 {
    per_unit(bytes, micros_per_mib, 1 << MIB_SHIFT, frac)
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
            ..Price::default()
        }
    }

    fn traffic(connections: u64, bytes_in: u64, bytes_out: u64) -> Counters {
        Counters {
            connections,
            bytes_in,
            bytes_out,
            ..Counters::default()
        }
    }

    #[test]
    fn reported_usage_is_priced_per_request_million_tokens_and_gpu_hour() {
        let p = Price {
            per_request_micros: 100,
            per_mtok_in_micros: 3_000_000,
            per_mtok_out_micros: 15_000_000,
            per_gpu_hour_micros: 2_000_000,
            ..Price::default()
        };
        let mut c = Carry::default();
        // 2 requests, 1,000 tokens in (3,000), 500 out (7,500), 1.8 s of
        // GPU (1,000): 200 + 3,000 + 7,500 + 1,000.
        let u = Counters {
            requests: 2,
            tokens_in: 1_000,
            tokens_out: 500,
            gpu_ms: 1_800,
            ..Counters::default()
        };
        assert_eq!(cost(&p, &u, &mut c), 11_700);
        assert!(c.is_zero());
        // Tokens at 15 micro-units per million: the fractions carry
        // until they add up to whole micro-units, never rounded up.
        let p = Price {
            per_mtok_out_micros: 15,
            ..Price::default()
        };
        let one = Counters {
            tokens_out: 1,
            ..Counters::default()
        };
        let mut c = Carry::default();
        let sum: u64 = (0..200_000).map(|_| cost(&p, &one, &mut c)).sum();
        assert_eq!(sum, 3, "200,000 tokens at 15 per million = 3");
        assert_eq!(c.tok_out_frac, 0);
        // Absurd figures saturate instead of overflowing.
        let max = Price {
            per_mtok_in_micros: u64::MAX,
            per_gpu_hour_micros: u64::MAX,
            ..Price::default()
        };
        let huge = Counters {
            tokens_in: u64::MAX,
            gpu_ms: u64::MAX,
            ..Counters::default()
        };
        assert_eq!(cost(&max, &huge, &mut Carry::default()), u64::MAX);
    }

    #[test]
    fn exact_micro_units() {
        let p = price(250, 1_000_000, 3_000_000);
        let mut c = Carry::default();
        // 4 connections, 3 MiB in, 1 MiB out: 1000 + 3,000,000 + 3,000,000.
        assert_eq!(cost(&p, &traffic(4, 3 << 20, 1 << 20), &mut c), 6_001_000);
        assert!(c.is_zero());
        // Half a MiB in at 1,000,001 per MiB: 500,000.5 → 500,000, 0.5 carried.
        let p = price(0, 1_000_001, 0);
        assert_eq!(cost(&p, &traffic(0, 1 << 19, 0), &mut c), 500_000);
        assert_eq!(c.in_frac, 1 << 19);
        // The other half: 500,000.5 + 0.5 = 500,001.
        assert_eq!(cost(&p, &traffic(0, 1 << 19, 0), &mut c), 500_001);
        assert!(c.is_zero());
        // Free service: usage costs nothing.
        assert_eq!(cost(&Price::default(), &traffic(9, 9 << 20, 9), &mut c), 0);
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
            .map(|&(i, o)| cost(&p, &traffic(1, i, o), &mut carry))
            .sum();
        let (ti, to): (u64, u64) = chunks.iter().fold((0, 0), |(a, b), &(i, o)| (a + i, b + o));
        let mut big_carry = Carry::default();
        let big = cost(&p, &traffic(chunks.len() as u64, ti, to), &mut big_carry);
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
        assert_eq!(
            cost(&p, &traffic(u64::MAX, u64::MAX, u64::MAX), &mut c),
            u64::MAX
        );
        assert!(c.in_frac < 1 << MIB_SHIFT && c.out_frac < 1 << MIB_SHIFT);
        // Large but representable: 2^40 bytes (1 TiB) at 10^12 per MiB.
        let p = price(0, 1_000_000_000_000, 0);
        let mut c = Carry::default();
        assert_eq!(
            cost(&p, &traffic(0, 1 << 40, 0), &mut c),
            (1u64 << 20) * 1_000_000_000_000
        );
    }
}
