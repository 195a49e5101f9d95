//! Configured rates → the GCRA parameters the kernel enforces. The kernel
//! only adds and compares: each unit (connection, byte, knock) costs a fixed
//! number of nanoseconds of budget, and the burst is how far the budget may
//! run ahead of real time. A cost of 0 means unlimited.

use portcullis_common::{BYTE_COST_SHIFT, Identity, KernelConfig};

use super::{KnockSection, Limits};

const NS_PER_SEC: u64 = 1_000_000_000;

impl Limits {
    /// The identity entry the kernel enforces these limits with: the GCRA
    /// costs and bursts, and the flow cap (`key` names the identity).
    pub fn kernel_identity(&self, key: u64) -> Identity {
        let (conn_cost_ns, conn_burst_ns) = event_gcra(self.conn_per_sec, self.conn_burst);
        let (in_byte_cost, in_burst_ns) = byte_gcra(self.bytes_per_sec, self.bytes_burst);
        let (out_byte_cost, out_burst_ns) =
            byte_gcra(self.egress_bytes_per_sec, self.egress_bytes_burst);
        Identity {
            key,
            conn_cost_ns,
            conn_burst_ns,
            in_byte_cost,
            in_burst_ns,
            out_byte_cost,
            out_burst_ns,
            max_flows: self.max_flows,
            ..Identity::default()
        }
    }
}

impl KnockSection {
    /// The node-wide kernel knobs. With knocking off, the knock fields stay 0
    /// (port 0 tells the kernel there is no knock port to limit).
    pub fn kernel_config(&self, events_per_sec: u32) -> KernelConfig {
        let mut config = KernelConfig {
            events_per_sec,
            ..KernelConfig::default()
        };
        if self.enabled() {
            config.knock_port = self.port;
            (config.knock_src_cost_ns, config.knock_src_burst_ns) =
                event_gcra(self.per_source_per_sec, self.per_source_burst);
            (config.knock_all_cost_ns, config.knock_all_burst_ns) =
                event_gcra(self.global_per_sec, self.global_burst);
        }
        config
    }
}

/// `(cost, burst)` in nanoseconds for `per_sec` discrete events (connections,
/// knocks) with `burst` of them allowed back to back.
fn event_gcra(per_sec: u32, burst: u32) -> (u64, u64) {
    if per_sec == 0 {
        return (0, 0);
    }
    let cost = NS_PER_SEC / u64::from(per_sec);
    (cost, cost.saturating_mul(u64::from(burst)))
}

/// `(cost, burst)` for a byte rate. The cost is fixed point because a byte
/// at any realistic rate costs well under a nanosecond; the burst is computed
/// from the rate directly so it carries no rounding from the cost.
fn byte_gcra(per_sec: u64, burst: u64) -> (u64, u64) {
    if per_sec == 0 {
        return (0, 0);
    }
    let ns = u128::from(NS_PER_SEC);
    let cost = (ns << BYTE_COST_SHIFT) / u128::from(per_sec);
    let burst_ns = u128::from(burst) * ns / u128::from(per_sec);
    (saturate(cost), saturate(burst_ns))
}

fn saturate(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}
