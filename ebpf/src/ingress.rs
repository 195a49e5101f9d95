//! The XDP decision (docs/data-plane.md): unprotected traffic passes on
//! one array lookup; traffic to a protected service passes only on a live
//! flow or admission, within the identity's rates; everything else drops
//! with a counted reason. No RST, no ICMP: the port looks closed.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use portcullis_common::{
    ADMIT_ONE_USE, Admission, AdmissionKey, CFG_FLOW_SCOPED, Flow, FlowKey, IDENTITY_LIVE,
    PORT_KNOCK, PORT_TCP_BY_ADDR, PORT_TCP_SHADOW, PORT_UDP_BY_ADDR, PORT_UDP_SHADOW, PROTO_TCP,
    PROTO_UDP, Reason, SERVICE_SHADOW, ServiceKey, usage_row,
};

use crate::{
    ADMISSIONS, CONFIG, FLOW_COUNT, FLOWS, IDENTITIES, KNOCK_ALL, KNOCK_SRC, PORTS, RATES,
    SERVICE_DROPS, SERVICES, USAGE, count, count_shadow, events,
    parse::{Parsed, Summary, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN, parse},
    ratelimit::{byte_cost, conform},
};

/// A flow re-validates against its admission at least this often, so an
/// admission deleted by the agent stops its flows within a second even if
/// the agent never touches the flow table.
const FLOW_RECHECK_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn decide(ctx: &XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let pkt = match parse::<true>(data, end) {
        Parsed::Pass => return xdp_action::XDP_PASS,
        Parsed::Bad(reason) => return drop(reason, None, 0),
        Parsed::L4(s) => s,
    };
    let Some(port) = PORTS.get(pkt.dport as u32) else {
        return xdp_action::XDP_PASS;
    };
    let (service, col, by_addr, shadow) = if pkt.proto == PROTO_TCP {
        (
            port.tcp_service,
            port.tcp_col as u32,
            port.flags & PORT_TCP_BY_ADDR != 0,
            port.flags & PORT_TCP_SHADOW != 0,
        )
    } else {
        if port.flags & PORT_KNOCK != 0 {
            return knock(&pkt);
        }
        (
            port.udp_service,
            port.udp_col as u32,
            port.flags & PORT_UDP_BY_ADDR != 0,
            port.flags & PORT_UDP_SHADOW != 0,
        )
    };
    let svc = Svc {
        id: service,
        col,
        shadow,
    };
    let svc = if by_addr {
        lookup_by_addr(&pkt).unwrap_or(svc)
    } else {
        svc
    };
    if svc.id == 0 {
        return xdp_action::XDP_PASS;
    }
    if pkt.first_fragment {
        // Fragments cannot be judged per packet; a legitimate client of a
        // model port has no reason to fragment (PMTU discovery avoids it).
        return refuse(Reason::Fragment, &pkt, svc);
    }
    let len = (end - data) as u64;
    enforce(&pkt, svc, len)
}

/// The protected service a packet is for: its id, usage column and mode.
#[derive(Clone, Copy)]
struct Svc {
    id: u32,
    col: u32,
    /// Shadow mode: what would drop passes, counted apart.
    shadow: bool,
}

#[inline(always)]
fn lookup_by_addr(pkt: &Summary) -> Option<Svc> {
    let key = ServiceKey {
        addr: pkt.dst,
        port: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    unsafe { SERVICES.get(&key) }.map(|r| Svc {
        id: r.id,
        col: r.col,
        shadow: r.flags & SERVICE_SHADOW != 0,
    })
}

#[inline(always)]
fn enforce(pkt: &Summary, svc: Svc, len: u64) -> u32 {
    let service = svc.id;
    // Jiffy resolution is plenty for expiries and rate buckets, and costs a
    // fraction of the precise clock on the per-packet path.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    // A clean SYN (no ACK, RST or FIN: RFC 9293 §3.5) always opens (or
    // retransmits) a connection, so it goes straight to the admission: a
    // SYN flood costs one lookup per packet.
    let tcp = pkt.proto == PROTO_TCP;
    let flags = pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN);
    let syn = tcp && flags == TCP_FLAG_SYN;
    let mut revalidating = false;
    if !syn && let Some(flow) = FLOWS.get_ptr_mut(&key) {
        match flow_verdict(unsafe { &*flow }, now) {
            FlowVerdict::Live(slot, cost, burst) => {
                return admit_packet(slot, cost, burst, len, now, false, pkt, svc);
            }
            FlowVerdict::Revoked(slot) => {
                let _ = FLOWS.remove(&key);
                return drop_for(slot, Reason::Revoked, pkt, svc);
            }
            FlowVerdict::Stale => revalidating = true,
        }
    }
    // Without a flow, only a clean SYN opens one, and only a segment that
    // acknowledges (ACK, no SYN or RST) may re-create one the LRU evicted.
    // SYN+RST, SYN+FIN, SYN+ACK, RST, FIN, null and Xmas segments never
    // create state.
    if tcp
        && !syn
        && !revalidating
        && (flags & TCP_FLAG_ACK == 0 || flags & (TCP_FLAG_SYN | TCP_FLAG_RST) != 0)
    {
        return refuse(Reason::BadFlags, pkt, svc);
    }
    // No flow, a SYN, or a flow whose cached expiry passed: the admission
    // decides.
    let mut akey = AdmissionKey {
        addr: pkt.src,
        service,
        src_port: 0,
        _pad: 0,
    };
    let adm: Admission = match unsafe { ADMISSIONS.get(&akey) } {
        Some(a) => *a,
        None => {
            // A flow-scoped admission covers exactly this source port; only
            // looked for when the agent says some may exist.
            let scoped = match CONFIG.get(0) {
                Some(c) => c.flags & CFG_FLOW_SCOPED != 0,
                None => false,
            };
            akey.src_port = pkt.sport;
            let exact = if scoped {
                unsafe { ADMISSIONS.get(&akey) }
            } else {
                None
            };
            match exact {
                Some(a) => *a,
                None => {
                    // A retransmitted SYN (same initial sequence number) of
                    // the connection whose one-use admission its first SYN
                    // consumed; a new connection on the 5-tuple is not.
                    if scoped
                        && syn
                        && let Some(flow) = unsafe { FLOWS.get(&key) }
                        && flow.syn_seq == pkt.tcp_seq
                        && let FlowVerdict::Live(slot, cost, burst) = flow_verdict(flow, now)
                    {
                        return admit_packet(slot, cost, burst, len, now, false, pkt, svc);
                    }
                    if revalidating {
                        let _ = FLOWS.remove(&key);
                    }
                    return refuse(Reason::NoAdmission, pkt, svc);
                }
            }
        }
    };
    if now >= adm.expires_ns {
        if revalidating {
            let _ = FLOWS.remove(&key);
        }
        return drop_for(adm.identity, Reason::Expired, pkt, svc);
    }
    let Some(ident) = IDENTITIES.get(adm.identity) else {
        return refuse(Reason::Revoked, pkt, svc);
    };
    if ident.state != IDENTITY_LIVE || ident.epoch != adm.epoch {
        if revalidating {
            let _ = FLOWS.remove(&key);
        }
        return drop_for(adm.identity, Reason::Revoked, pkt, svc);
    }
    // UDP has no handshake: a datagram without a flow opens one. A TCP
    // non-SYN without a flow (evicted from the LRU, or a table from before
    // an upgrade) re-creates its flow without counting a new connection.
    let new_conn = syn || (pkt.proto == PROTO_UDP && !revalidating);
    // The identity's flow quota. At the limit a SYN may still be the
    // retransmission of a flow it already has; only then is it looked up.
    let flow_count = FLOW_COUNT.get_ptr_mut(adm.identity);
    let mut exists = false;
    if !revalidating
        && ident.max_flows != 0
        && let Some(c) = flow_count
        && unsafe { *c } >= ident.max_flows
    {
        exists = syn && unsafe { FLOWS.get(&key) }.is_some();
        if !exists {
            return drop_for(adm.identity, Reason::FlowQuota, pkt, svc);
        }
    }
    if new_conn {
        let Some(rate) = RATES.get_ptr_mut(adm.identity) else {
            return refuse(Reason::Revoked, pkt, svc);
        };
        if !conform(
            unsafe { &raw mut (*rate).conn_tat },
            now,
            ident.conn_cost_ns,
            ident.conn_burst_ns,
        ) {
            return drop_for(adm.identity, Reason::ConnRate, pkt, svc);
        }
    }
    let one_use = adm.flags & ADMIT_ONE_USE != 0;
    let recheck = now.saturating_add(FLOW_RECHECK_NS);
    // A one-use admission is consumed below, so its flow cannot re-validate
    // against it: it keeps the admission's expiry (identity revocation still
    // reaches it through the epoch, and the agent removes it on revoke).
    let expires_ns = if one_use || adm.expires_ns < recheck {
        adm.expires_ns
    } else {
        recheck
    };
    let flow = Flow {
        identity: adm.identity,
        epoch: adm.epoch,
        service,
        syn_seq: pkt.tcp_seq,
        expires_ns,
        col: svc.col,
        _pad: 0,
    };
    if FLOWS.insert(&key, &flow, 0).is_err() {
        return drop_for(adm.identity, Reason::FlowInsert, pkt, svc);
    }
    // Counted once created. A retransmitted SYN below the limit is counted
    // again (finding out would cost a lookup on every SYN); the agent's
    // recount corrects it within seconds, so the count errs high.
    if !revalidating
        && !exists
        && let Some(c) = flow_count
    {
        unsafe { *c += 1 };
    }
    if one_use {
        let _ = ADMISSIONS.remove(&akey);
    }
    admit_packet(
        adm.identity,
        ident.in_byte_cost,
        ident.in_burst_ns,
        len,
        now,
        new_conn,
        pkt,
        svc,
    )
}

enum FlowVerdict {
    /// Identity live, cache fresh: slot, ingress byte cost and burst.
    Live(u32, u64, u64),
    /// The identity was revoked since the flow was created.
    Revoked(u32),
    /// The cached expiry passed: re-validate against the admission.
    Stale,
}

#[inline(always)]
fn flow_verdict(flow: &Flow, now: u64) -> FlowVerdict {
    // Copy the slot first: if the flow is deleted, its memory can be reused
    // at once by an insert on another CPU.
    let slot = flow.identity;
    let Some(ident) = IDENTITIES.get(slot) else {
        return FlowVerdict::Revoked(slot);
    };
    if ident.state != IDENTITY_LIVE || ident.epoch != flow.epoch {
        return FlowVerdict::Revoked(slot);
    }
    if now < flow.expires_ns {
        FlowVerdict::Live(slot, ident.in_byte_cost, ident.in_burst_ns)
    } else {
        FlowVerdict::Stale
    }
}

/// Charges the identity's ingress byte rate and its counters for the
/// service for a packet that an admission covers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn admit_packet(
    slot: u32,
    byte_cost_q16: u64,
    burst_ns: u64,
    len: u64,
    now: u64,
    new_conn: bool,
    pkt: &Summary,
    svc: Svc,
) -> u32 {
    if byte_cost_q16 != 0 {
        let Some(rate) = RATES.get_ptr_mut(slot) else {
            return refuse(Reason::Revoked, pkt, svc);
        };
        if !conform(
            unsafe { &raw mut (*rate).in_tat },
            now,
            byte_cost(len, byte_cost_q16),
            burst_ns,
        ) {
            return drop_for(slot, Reason::ByteRate, pkt, svc);
        }
    }
    if let Some(st) = USAGE.get_ptr_mut(usage_row(slot, svc.col)) {
        let st = unsafe { &mut *st };
        st.packets_in += 1;
        st.bytes_in += len;
        if new_conn {
            st.connections += 1;
        }
    }
    count(Reason::Passed);
    xdp_action::XDP_PASS
}

/// Pre-auth limit for knock datagrams: per source, then node-wide, so a
/// single noisy source cannot spend the node budget of everyone else.
#[inline(always)]
fn knock(pkt: &Summary) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return drop(Reason::KnockGlobalRate, Some(pkt), 0);
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match KNOCK_SRC.get_ptr_mut(&pkt.src) {
        Some(tat) => {
            if !conform(tat, now, cfg.knock_src_cost_ns, cfg.knock_src_burst_ns) {
                return drop(Reason::KnockSourceRate, Some(pkt), 0);
            }
        }
        None => {
            // First datagram from this source: one unit of its budget.
            let _ = KNOCK_SRC.insert(&pkt.src, &now.saturating_add(cfg.knock_src_cost_ns), 0);
        }
    }
    let Some(all) = KNOCK_ALL.get_ptr_mut(0) else {
        return drop(Reason::KnockGlobalRate, Some(pkt), 0);
    };
    if !conform(all, now, cfg.knock_all_cost_ns, cfg.knock_all_burst_ns) {
        return drop(Reason::KnockGlobalRate, Some(pkt), 0);
    }
    count(Reason::KnockPassed);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop(reason: Reason, pkt: Option<&Summary>, service: u32) -> u32 {
    count(reason);
    events::sample(reason, pkt, service);
    xdp_action::XDP_DROP
}

/// A drop of a packet for a protected service: in shadow mode it passes
/// instead, counted under its reason's shadow counter. The shadow check is
/// the drop path's only extra cost (one branch on a flag already loaded).
#[inline(always)]
fn refuse(reason: Reason, pkt: &Summary, svc: Svc) -> u32 {
    if let Some(c) = SERVICE_DROPS.get_ptr_mut(svc.col) {
        unsafe { *c += 1 };
    }
    if svc.shadow {
        count_shadow(reason);
        return xdp_action::XDP_PASS;
    }
    drop(reason, Some(pkt), svc.id)
}

/// A drop attributed to a known identity also lands in its counters for
/// the service.
#[inline(always)]
fn drop_for(slot: u32, reason: Reason, pkt: &Summary, svc: Svc) -> u32 {
    if !svc.shadow
        && let Some(st) = USAGE.get_ptr_mut(usage_row(slot, svc.col))
    {
        unsafe { (*st).dropped += 1 };
    }
    refuse(reason, pkt, svc)
}
