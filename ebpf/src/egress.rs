//! TC egress: responses from protected services are charged to the identity
//! whose flow they answer (cost of output) and optionally capped (an
//! extraction guard). Traffic that is not a response of a known flow passes.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use portcullis_common::{FlowKey, PROTO_TCP, Reason, usage_row};

use crate::{
    FLOWS, IDENTITIES, PORTS, RATES, USAGE, count,
    parse::{Parsed, parse},
    ratelimit::{byte_cost, conform},
};

/// TC_ACT_UNSPEC: "no opinion", so programs after ours still run (TCX next).
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

#[inline(always)]
pub fn decide(ctx: &TcContext) -> i32 {
    let Parsed::L4(pkt) = parse::<false>(ctx.data(), ctx.data_end()) else {
        return TC_ACT_UNSPEC;
    };
    let Some(port) = PORTS.get(pkt.sport as u32) else {
        return TC_ACT_UNSPEC;
    };
    let protected = if pkt.proto == PROTO_TCP {
        port.tcp_service
    } else {
        port.udp_service
    };
    if protected == 0 && port.flags == 0 {
        return TC_ACT_UNSPEC;
    }
    // The ingress flow this packet answers: swap the directions.
    let key = FlowKey {
        src: pkt.dst,
        dst: pkt.src,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let Some(flow) = (unsafe { FLOWS.get(&key) }) else {
        return TC_ACT_UNSPEC;
    };
    let slot = flow.identity;
    let row = usage_row(slot, flow.col);
    let len = ctx.len() as u64;
    if let Some(ident) = IDENTITIES.get(slot)
        && ident.out_byte_cost != 0
        && let Some(rate) = RATES.get_ptr_mut(slot)
    {
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let cost = byte_cost(len, ident.out_byte_cost);
        if !conform(
            unsafe { &raw mut (*rate).out_tat },
            now,
            cost,
            ident.out_burst_ns,
        ) {
            count(Reason::EgressCap);
            if let Some(st) = USAGE.get_ptr_mut(row) {
                unsafe { (*st).dropped += 1 };
            }
            return TC_ACT_SHOT;
        }
    }
    if let Some(st) = USAGE.get_ptr_mut(row) {
        let st = unsafe { &mut *st };
        st.packets_out += 1;
        st.bytes_out += len;
    }
    TC_ACT_UNSPEC
}
