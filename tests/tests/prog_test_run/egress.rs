//! TC egress.

use super::*;

#[test]
fn egress_counts_responses_of_admitted_flows() {
    let mut fx = Fx::new();
    open_tcp4_and_udp6(&mut fx);
    let before = fx.counts();
    let syn_ack = Packet::tcp4(SERVER4, CLIENT4, TCP_PORT, 40000)
        .syn_ack()
        .build();
    assert_eq!(fx.tc_raw(&syn_ack), TC_ACT_UNSPEC);
    let data = response4(CLIENT4, 40000, 1000);
    assert_eq!(fx.tc_raw(&data), TC_ACT_UNSPEC);
    let v6 = Packet::udp6(server6(), client6(), UDP_PORT, 5000)
        .payload(&[1; 300])
        .vlan(5)
        .build();
    assert_eq!(fx.tc_raw(&v6), TC_ACT_UNSPEC);
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!(st.packets_out, 3);
    assert_eq!(st.bytes_out, (syn_ack.len() + data.len() + v6.len()) as u64);
    assert_eq!(describe(&delta(&before, &fx.counts())), "no counter");
}

#[test]
fn egress_cap_drops_over_the_burst() {
    // 100 B/s out, 300-byte burst: three 100-byte responses, then shot.
    let mut fx = Fx::with_identity(out_byte_limit(unlimited(), 100, 300));
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    let resp = response4(CLIENT4, 40000, 100);
    let before = fx.counts();
    for i in 0..3 {
        assert_eq!(fx.tc_raw(&resp), TC_ACT_UNSPEC, "response {i}");
    }
    for i in 3..6 {
        assert_eq!(fx.tc_raw(&resp), TC_ACT_SHOT, "response {i}");
    }
    let mut want = [0u64; portcullis_common::DROP_COUNTERS as usize];
    want[Reason::EgressCap as usize] = 3;
    assert_eq!(describe(&delta(&before, &fx.counts())), describe(&want));
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!((st.packets_out, st.bytes_out, st.dropped), (3, 300, 3));
    // The cap is on output only: ingress still passes.
    fx.expect("ingress ACK", &ack4(CLIENT4, 40000), Outcome::Passed);
    // Traffic that is not a response of the flow is never capped.
    assert_eq!(fx.tc_raw(&response4(STRANGER4, 40000, 100)), TC_ACT_UNSPEC);
}

#[test]
fn egress_ignores_traffic_that_is_not_a_response() {
    let mut fx = Fx::with_identity(out_byte_limit(unlimited(), 1, 1));
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    let before = fx.counts();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "from an unprotected port",
            Packet::tcp4(SERVER4, CLIENT4, OPEN_PORT, 40000)
                .ack()
                .build(),
        ),
        (
            "to a client without a flow",
            response4(STRANGER4, 40000, 100),
        ),
        (
            "to another port of the client",
            response4(CLIENT4, 40001, 100),
        ),
        (
            "UDP from the TCP port",
            Packet::udp4(SERVER4, CLIENT4, TCP_PORT, 40000).build(),
        ),
        ("ARP", Packet::arp(SERVER4, CLIENT4).build()),
        ("ICMP", Packet::icmp4(SERVER4, CLIENT4).build()),
        (
            "malformed",
            Packet::tcp4(SERVER4, CLIENT4, TCP_PORT, 40000)
                .ihl(2)
                .build(),
        ),
        (
            "truncated response",
            Packet::tcp4(SERVER4, CLIENT4, TCP_PORT, 40000)
                .truncate_l4(6)
                .build(),
        ),
        (
            "fragment of a response",
            Packet::tcp4(SERVER4, CLIENT4, TCP_PORT, 40000)
                .fragment(10, false)
                .build(),
        ),
    ];
    for (name, frame) in &cases {
        assert_eq!(fx.tc_raw(frame), TC_ACT_UNSPEC, "{name}");
    }
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!((st.packets_out, st.bytes_out, st.dropped), (0, 0, 0));
    assert_eq!(describe(&delta(&before, &fx.counts())), "no counter");
    // The cap (1 B/s) is real: the flow's own response is shot at once
    // after the first frame.
    assert_eq!(fx.tc_raw(&response4(CLIENT4, 40000, 60)), TC_ACT_UNSPEC);
    assert_eq!(fx.tc_raw(&response4(CLIENT4, 40000, 60)), TC_ACT_SHOT);
}
