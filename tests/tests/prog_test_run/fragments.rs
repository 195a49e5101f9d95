//! Fragments.

use super::*;

#[test]
fn ipv4_fragments() {
    let mut fx = Fx::new();
    let frag = Outcome::Drop(Reason::Fragment);
    fx.expect(
        "first fragment to the TCP port",
        &syn4(STRANGER4, 40000).fragment(0, true),
        frag,
    );
    fx.expect(
        "first fragment to the UDP port",
        &Packet::udp4(STRANGER4, SERVER4, 1, UDP_PORT)
            .payload(&[0; 64])
            .fragment(0, true),
        frag,
    );
    fx.expect(
        "first fragment to an open port",
        &Packet::tcp4(STRANGER4, SERVER4, 1, OPEN_PORT)
            .syn()
            .fragment(0, true),
        Outcome::Untouched,
    );
    fx.expect(
        "non-first fragment to the TCP port",
        &syn4(STRANGER4, 40000).fragment(185, true),
        Outcome::Untouched,
    );
    fx.expect(
        "last fragment to the TCP port",
        &syn4(STRANGER4, 40000).fragment(185, false),
        Outcome::Untouched,
    );
    // A first fragment too short for the TCP header (RFC 1858 tiny
    // fragment): dropped whatever port its first bytes name.
    fx.expect(
        "tiny first fragment",
        &syn4(STRANGER4, 40000).fragment(0, true).cut_l4(8),
        frag,
    );
    fx.expect(
        "tiny first fragment to an open port",
        &Packet::tcp4(STRANGER4, SERVER4, 1, OPEN_PORT)
            .fragment(0, true)
            .cut_l4(8),
        frag,
    );
    fx.expect(
        "tiny UDP first fragment",
        &Packet::udp4(STRANGER4, SERVER4, 1, UDP_PORT)
            .fragment(0, true)
            .cut_l4(4),
        frag,
    );
    // A first fragment's UDP length describes the whole datagram: not
    // held against the fragment.
    fx.expect(
        "UDP first fragment with the datagram's length",
        &Packet::udp4(STRANGER4, SERVER4, 1, UDP_PORT)
            .payload(&[0; 64])
            .udp_len(2000)
            .fragment(0, true),
        frag,
    );
    fx.expect(
        "first fragment whose total length promises more than the frame",
        &syn4(STRANGER4, 40000).fragment(0, true).truncate_l4(8),
        Outcome::Drop(Reason::Malformed),
    );
    // Even an admitted source may not fragment towards the service.
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect(
        "admitted first fragment",
        &syn4(CLIENT4, 40000).fragment(0, true),
        frag,
    );
    assert_eq!(fx.flows(), 0);
    // DF is not fragmentation.
    fx.expect(
        "DF set",
        &syn4(CLIENT4, 40000).dont_fragment(),
        Outcome::Passed,
    );
    fx.expect(
        "DF set, unadmitted",
        &syn4(STRANGER4, 40000).dont_fragment(),
        Outcome::Drop(Reason::NoAdmission),
    );
}

#[test]
fn ipv6_fragments() {
    let mut fx = Fx::new();
    let syn = |src: Ipv6Addr, port: u16| Packet::tcp6(src, server6(), 40000, port).syn();
    let fh = |offset: u16, more: bool| Ext::Fragment {
        offset,
        more,
        id: 0xabcd,
    };
    let frag = Outcome::Drop(Reason::Fragment);
    fx.expect(
        "first fragment to the TCP port",
        &syn(stranger6(), TCP_PORT).ext(fh(0, true)),
        frag,
    );
    fx.expect(
        "first fragment after hop-by-hop",
        &syn(stranger6(), TCP_PORT)
            .ext(Ext::HopByHop { len: 0 })
            .ext(fh(0, true)),
        frag,
    );
    fx.expect(
        "first fragment to the UDP port",
        &Packet::udp6(stranger6(), server6(), 1, UDP_PORT).ext(fh(0, true)),
        frag,
    );
    fx.expect(
        "first fragment to an open port",
        &syn(stranger6(), OPEN_PORT).ext(fh(0, true)),
        Outcome::Untouched,
    );
    fx.expect(
        "tiny first fragment",
        &syn(stranger6(), TCP_PORT).ext(fh(0, true)).cut_l4(6),
        frag,
    );
    fx.expect(
        "non-first fragment",
        &syn(stranger6(), TCP_PORT).ext(fh(100, true)),
        Outcome::Untouched,
    );
    fx.expect(
        "last fragment",
        &syn(stranger6(), TCP_PORT).ext(fh(100, false)),
        Outcome::Untouched,
    );
    // RFC 6946: an atomic fragment is a whole packet, judged normally.
    fx.expect(
        "atomic fragment, unadmitted",
        &syn(stranger6(), TCP_PORT).ext(fh(0, false)),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.admit(client6(), TCP_SVC, 0);
    fx.expect(
        "atomic fragment, admitted",
        &syn(client6(), TCP_PORT).ext(fh(0, false)),
        Outcome::Passed,
    );
    fx.expect(
        "admitted first fragment",
        &syn(client6(), TCP_PORT).ext(fh(0, true)),
        frag,
    );
}
