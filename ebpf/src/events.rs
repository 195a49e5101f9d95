//! Sampled drop events: at most `events_per_sec` per CPU per second reach the
//! ring buffer, submitted without wake-ups (the agent polls on a timer). The
//! agent resets the per-CPU budget every second, so an over-budget drop costs
//! two array lookups and a compare: no clock read, no ring buffer.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use portcullis_common::{DropEvent, Reason};

use crate::{CONFIG, EVENT_BUDGET, EVENTS, parse::Summary};

const BPF_RB_NO_WAKEUP: u64 = 1;

#[inline(always)]
pub fn sample(reason: Reason, pkt: Option<&Summary>, service: u32) {
    let Some(cfg) = CONFIG.get(0) else { return };
    if cfg.events_per_sec == 0 {
        return;
    }
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    let budget = unsafe { &mut *budget };
    if budget.count >= cfg.events_per_sec {
        return;
    }
    budget.count += 1;
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        return; // ring full: the per-reason counters still have it
    };
    let mut ev = DropEvent {
        time_ns: unsafe { bpf_ktime_get_coarse_ns() },
        reason: reason as u32,
        service,
        ..DropEvent::default()
    };
    if let Some(p) = pkt {
        ev.src = p.src;
        ev.dst = p.dst;
        ev.sport = p.sport;
        ev.dport = p.dport;
        ev.proto = p.proto;
        ev.family = p.family;
    }
    entry.write(ev);
    entry.submit(BPF_RB_NO_WAKEUP);
}
