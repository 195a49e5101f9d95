//! Protected TCP service: default deny, the flags that open a flow, flow counts and quotas.

use super::*;

#[test]
fn syn_from_unknown_source_is_dropped() {
    let fx = Fx::new();
    let nope = Outcome::Drop(Reason::NoAdmission);
    fx.expect("v4", &syn4(STRANGER4, 40000), nope);
    fx.expect("v4 802.1Q", &syn4(STRANGER4, 40000).vlan(10), nope);
    fx.expect("v4 QinQ", &syn4(STRANGER4, 40000).qinq(100, 10), nope);
    fx.expect(
        "v6",
        &Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT).syn(),
        nope,
    );
    fx.expect(
        "v6 QinQ",
        &Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT)
            .syn()
            .qinq(1, 2),
        nope,
    );
    fx.expect(
        "udp v4",
        &Packet::udp4(STRANGER4, SERVER4, 5000, UDP_PORT),
        nope,
    );
    fx.expect(
        "udp v6",
        &Packet::udp6(stranger6(), server6(), 5000, UDP_PORT),
        nope,
    );
    assert_eq!(fx.flows(), 0);
    assert_eq!(
        fx.k.maps.identity_stats(fx.slot).unwrap().dropped,
        0,
        "no identity to charge"
    );
}

#[test]
fn non_syn_from_unknown_source_is_dropped() {
    let fx = Fx::new();
    // Segments that could continue a connection need an admission...
    for (name, flags) in [
        ("ACK", TCP_ACK),
        ("PSH-ACK", TCP_PSH | TCP_ACK),
        ("FIN-ACK", TCP_FIN | TCP_ACK),
    ] {
        let p = Packet::tcp4(STRANGER4, SERVER4, 40000, TCP_PORT).flags(flags);
        fx.expect(name, &p, Outcome::Drop(Reason::NoAdmission));
    }
    // ... the rest can neither open nor continue one: dropped before any
    // admission lookup.
    for (name, flags) in [
        ("SYN-ACK", TCP_SYN | TCP_ACK),
        ("RST", TCP_RST),
        ("no flags", 0),
    ] {
        let p = Packet::tcp4(STRANGER4, SERVER4, 40000, TCP_PORT).flags(flags);
        fx.expect(name, &p, Outcome::Drop(Reason::BadFlags));
    }
    assert_eq!(fx.flows(), 0);
}

const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// Only a clean SYN opens a flow (RFC 9293 §3.5), and only an
/// acknowledging segment may re-create an evicted one; whatever else an
/// admitted source sends without a flow leaves no state behind.
#[test]
fn only_a_clean_syn_opens_a_flow() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(client6(), TCP_SVC, 0);
    let bad = [
        ("SYN+RST", TCP_SYN | TCP_RST),
        ("SYN+FIN", TCP_SYN | TCP_FIN),
        ("SYN+ACK", TCP_SYN | TCP_ACK),
        ("SYN+FIN+ACK", TCP_SYN | TCP_FIN | TCP_ACK),
        ("RST", TCP_RST),
        ("RST+ACK", TCP_RST | TCP_ACK),
        ("FIN", TCP_FIN),
        ("null", 0),
        ("Xmas (FIN+PSH+URG)", TCP_FIN | TCP_PSH | TCP_URG),
        ("all flags", 0xff),
        ("PSH only", TCP_PSH),
    ];
    for (i, (name, flags)) in bad.iter().enumerate() {
        let port = 41000 + i as u16;
        let p4 = Packet::tcp4(CLIENT4, SERVER4, port, TCP_PORT).flags(*flags);
        fx.expect(&format!("v4 {name}"), &p4, Outcome::Drop(Reason::BadFlags));
        let p6 = Packet::tcp6(client6(), server6(), port, TCP_PORT).flags(*flags);
        fx.expect(&format!("v6 {name}"), &p6, Outcome::Drop(Reason::BadFlags));
    }
    assert_eq!(fx.flows(), 0, "no bad-flag segment created a flow");
    // A clean SYN, ECN-setup flags allowed, opens one.
    let syn = syn4(CLIENT4, 42000).flags(TCP_SYN | TCP_ECE | TCP_CWR);
    fx.expect("ECN-setup SYN", &syn, Outcome::Passed);
    assert_eq!(fx.flows(), 1);
    // Inside an existing flow, every flag combination is the endpoints'
    // business: unaffected.
    for (name, flags) in bad.iter().filter(|(_, f)| f & TCP_SYN == 0) {
        let p = Packet::tcp4(CLIENT4, SERVER4, 42000, TCP_PORT).flags(*flags);
        fx.expect(&format!("in-flow {name}"), &p, Outcome::Passed);
    }
    // An acknowledging segment without a flow (the LRU evicted it)
    // re-creates it from the admission.
    fx.expect("evicted flow's ACK", &ack4(CLIENT4, 43000), Outcome::Passed);
    fx.expect(
        "evicted flow's FIN+ACK",
        &Packet::tcp4(CLIENT4, SERVER4, 43001, TCP_PORT).flags(TCP_FIN | TCP_ACK),
        Outcome::Passed,
    );
    assert_eq!(fx.flows(), 3);
}

/// Below the limit a retransmitted SYN is counted again (looking it up
/// would cost every SYN a lookup): the count errs high, and the agent's
/// recount puts it right; idle flows leave the count and the table.
#[test]
fn flow_counts_err_high_and_the_recount_corrects_them() {
    let mut ident = unlimited();
    ident.max_flows = 10;
    let mut fx = Fx::with_identity(ident);
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    let count = |fx: &Fx| fx.k.maps.flow_counts().unwrap()[fx.slot as usize];
    fx.expect("SYN", &syn4(CLIENT4, 40001), Outcome::Passed);
    fx.expect("retransmitted SYN", &syn4(CLIENT4, 40001), Outcome::Passed);
    assert_eq!((fx.flows(), count(&fx)), (1, 2));
    let census = fx.k.maps.recount_flows(monotonic_ns()).unwrap();
    assert_eq!((census.live, census.removed), (1, 0));
    assert_eq!(count(&fx), 1);
    // Thirty seconds without a packet: idle, removed, uncounted.
    let later = monotonic_ns() + 40 * SEC;
    let census = fx.k.maps.recount_flows(later).unwrap();
    assert_eq!((census.live, census.removed), (0, 1));
    assert_eq!((fx.flows(), count(&fx)), (0, 0));
    // Its next segment re-creates the flow from the admission.
    fx.expect(
        "the idle connection's next ACK",
        &ack4(CLIENT4, 40001),
        Outcome::Passed,
    );
    assert_eq!((fx.flows(), count(&fx)), (1, 1));
}

/// `Identity::max_flows`: the kernel counts flows per identity and refuses
/// new ones at the limit; a retransmitted SYN of a flow it has, packets of
/// existing flows and other identities are unaffected.
#[test]
fn flow_quota_per_identity() {
    let mut ident = unlimited();
    ident.max_flows = 2;
    let mut fx = Fx::with_identity(ident);
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(ip4(CLIENT4), UDP_SVC, 0);
    let count = |fx: &Fx| fx.k.maps.flow_counts().unwrap()[fx.slot as usize];
    fx.expect("first flow", &syn4(CLIENT4, 40001), Outcome::Passed);
    fx.expect("second flow", &syn4(CLIENT4, 40002), Outcome::Passed);
    assert_eq!(count(&fx), 2);
    fx.expect(
        "third flow",
        &syn4(CLIENT4, 40003),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "third flow, UDP",
        &Packet::udp4(CLIENT4, SERVER4, 5000, UDP_PORT),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "third flow, re-created by an ACK",
        &ack4(CLIENT4, 40004),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "retransmitted SYN of the second flow",
        &syn4(CLIENT4, 40002),
        Outcome::Passed,
    );
    fx.expect("second flow's data", &ack4(CLIENT4, 40002), Outcome::Passed);
    assert_eq!(count(&fx), 2, "a retransmission is not a new flow");
    assert_eq!(fx.flows(), 2);
    assert_eq!(fx.k.maps.identity_stats(fx.slot).unwrap().dropped, 3);
    // Another identity has its own quota.
    let mut other = unlimited();
    other.key = 0xbeef;
    other.max_flows = 1;
    let (slot2, _) = fx.k.maps.upsert_identity(other, "other").unwrap();
    fx.k.maps
        .admit(
            slot2,
            client6().into(),
            TCP_SVC,
            0,
            monotonic_ns() + 60 * SEC,
        )
        .unwrap();
    let syn6 = |port| Packet::tcp6(client6(), server6(), port, TCP_PORT).syn();
    fx.expect("other identity", &syn6(40001), Outcome::Passed);
    fx.expect(
        "other identity over its quota",
        &syn6(40002),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "other identity's retransmitted SYN at its limit",
        &syn6(40001),
        Outcome::Passed,
    );
    // The agent's recount (flows the LRU evicted or that ended) frees room.
    fx.k.maps.remove_flows_of(fx.slot).unwrap();
    fx.k.maps.recount_flows(monotonic_ns()).unwrap();
    assert_eq!(count(&fx), 0);
    fx.expect("room again", &syn4(CLIENT4, 40003), Outcome::Passed);
}
