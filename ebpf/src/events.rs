//! Sampled drop events: at most `events_per_sec` per CPU per second reach the
//! ring buffer, submitted without wake-ups (the agent polls on a timer), so a
//! flood costs one per-CPU counter bump per packet and nothing more.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use portcullis_common::{DropEvent, Reason};

use crate::{CONFIG, EVENT_BUDGET, EVENTS, parse::Summary};

const BPF_RB_NO_WAKEUP: u64 = 1;
const WINDOW_NS: u64 = 1_000_000_000;

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
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(budget.window_start_ns) >= WINDOW_NS {
        budget.window_start_ns = now;
        budget.count = 0;
    }
    if budget.count >= cfg.events_per_sec {
        return;
    }
    budget.count += 1;
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        return; // ring full: the per-reason counters still have it
    };
    let mut ev = DropEvent {
        time_ns: now,
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
