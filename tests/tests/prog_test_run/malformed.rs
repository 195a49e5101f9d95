//! Malformed packets.

use super::*;

#[test]
fn malformed_ipv4_headers() {
    let fx = Fx::new();
    let bad = Outcome::Drop(Reason::Malformed);
    let syn = || syn4(STRANGER4, 40000);
    fx.expect("no IPv4 header at all", &Packet::ethernet(0x0800, &[]), bad);
    fx.expect("IPv4 header cut at 10 bytes", &syn().truncate_l3(10), bad);
    fx.expect("IPv4 header cut at 19 bytes", &syn().truncate_l3(19), bad);
    fx.expect(
        "IPv4 header cut, in a VLAN",
        &syn().vlan(4).truncate_l3(12),
        bad,
    );
    fx.expect("IHL 4", &syn().ihl(4), bad);
    fx.expect("IHL 0", &syn().ihl(0), bad);
    fx.expect("version 6 in an IPv4 EtherType", &syn().ip_version(6), bad);
    fx.expect("version 0", &syn().ip_version(0), bad);
    fx.expect("total length < IHL", &syn().total_len(19), bad);
    fx.expect(
        "total length < IHL with options",
        &syn().ip_options(&[1; 8]).total_len(24),
        bad,
    );
    // IHL promising options the frame does not have: the TCP header would
    // start past the end of the frame.
    fx.expect(
        "IHL 15 without the options",
        &syn().ihl(15).total_len(100),
        bad,
    );
    // These hold for unprotected destinations too: no port can be trusted.
    fx.expect(
        "IHL 4 to an open port",
        &Packet::tcp4(STRANGER4, SERVER4, 1, OPEN_PORT).ihl(4),
        bad,
    );
    // A wrong header checksum is the stack's business, not ours.
    fx.expect(
        "bad checksum",
        &syn().ip_checksum(0xdead),
        Outcome::Drop(Reason::NoAdmission),
    );
}

#[test]
fn ipv4_options_are_skipped() {
    let mut fx = Fx::new();
    let nope = Outcome::Drop(Reason::NoAdmission);
    fx.expect(
        "IHL 6",
        &syn4(STRANGER4, 40000).ip_options(&[1, 1, 1, 1]),
        nope,
    );
    fx.expect("IHL 15", &syn4(STRANGER4, 40000).ip_options(&[1; 40]), nope);
    fx.expect(
        "IHL 15 to an open port",
        &Packet::tcp4(STRANGER4, SERVER4, 1, OPEN_PORT)
            .syn()
            .ip_options(&[1; 40]),
        Outcome::Untouched,
    );
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    let p = syn4(CLIENT4, 40000).ip_options(&[0x94, 4, 0, 0]); // router alert
    fx.expect("admitted with options", &p, Outcome::Passed);
    assert!(
        fx.flow(&flow_key(
            ip4(CLIENT4),
            ip4(SERVER4),
            40000,
            TCP_PORT,
            PROTO_TCP
        ))
        .is_some()
    );
}

#[test]
fn malformed_tcp_and_udp_headers() {
    let fx = Fx::new();
    let bad = Outcome::Drop(Reason::Malformed);
    let syn = || syn4(STRANGER4, 40000);
    fx.expect("TCP cut at 2 bytes (no ports)", &syn().truncate_l4(2), bad);
    fx.expect(
        "TCP cut at 4 bytes (ports only)",
        &syn().truncate_l4(4),
        bad,
    );
    fx.expect(
        "TCP cut at 13 bytes (no flags)",
        &syn().truncate_l4(13),
        bad,
    );
    fx.expect("TCP cut at 19 bytes", &syn().truncate_l4(19), bad);
    fx.expect("TCP data offset 4", &syn().data_offset(4), bad);
    fx.expect("TCP data offset 0", &syn().data_offset(0), bad);
    fx.expect(
        "v6 TCP cut at 10 bytes",
        &Packet::tcp6(stranger6(), server6(), 1, TCP_PORT)
            .syn()
            .truncate_l4(10),
        bad,
    );
    fx.expect(
        "v6 TCP data offset 2",
        &Packet::tcp6(stranger6(), server6(), 1, TCP_PORT)
            .syn()
            .data_offset(2),
        bad,
    );
    // The same cuts with IP lengths that agree: the header itself is short.
    for n in [2, 4, 13, 19] {
        fx.expect(
            &format!("TCP packet ends {n} bytes in"),
            &syn().cut_l4(n),
            bad,
        );
    }
    fx.expect(
        "v6 TCP packet ends 10 bytes in",
        &Packet::tcp6(stranger6(), server6(), 1, TCP_PORT)
            .syn()
            .cut_l4(10),
        bad,
    );
    let udp = || Packet::udp4(STRANGER4, SERVER4, 5000, UDP_PORT);
    fx.expect("UDP packet ends 5 bytes in", &udp().cut_l4(5), bad);
    fx.expect("UDP cut at 4 bytes", &udp().truncate_l4(4), bad);
    fx.expect("UDP cut at 7 bytes", &udp().truncate_l4(7), bad);
    fx.expect("UDP cut at 1 byte", &udp().truncate_l4(1), bad);
    fx.expect(
        "v6 UDP cut at 6 bytes",
        &Packet::udp6(stranger6(), server6(), 5000, UDP_PORT).truncate_l4(6),
        bad,
    );
    // RFC 9293 §3.1: the data offset describes the header; one that runs
    // past the segment is malformed, even with ports and flags readable.
    fx.expect(
        "TCP data offset 15, 20-byte header",
        &syn().data_offset(15),
        bad,
    );
    fx.expect(
        "TCP data offset 6, 20-byte header",
        &syn().data_offset(6),
        bad,
    );
    fx.expect(
        "v6 TCP data offset 15",
        &Packet::tcp6(stranger6(), server6(), 1, TCP_PORT)
            .syn()
            .data_offset(15),
        bad,
    );
    fx.expect(
        "TCP data offset 6 with its options",
        &syn().tcp_options(&[1, 1, 1, 1]),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.expect(
        "TCP options past the IPv4 total length",
        &syn()
            .tcp_options(&[1; 8])
            .payload(&[0; 4])
            .total_len(20 + 24),
        bad,
    );
    // RFC 768: length ≥ 8 and within the IP payload.
    fx.expect("UDP length 3", &udp().udp_len(3), bad);
    fx.expect("UDP length 0", &udp().udp_len(0), bad);
    fx.expect(
        "UDP length past the IP payload",
        &udp().payload(&[0; 10]).udp_len(19),
        bad,
    );
    fx.expect(
        "v6 UDP length past the payload",
        &Packet::udp6(stranger6(), server6(), 5000, UDP_PORT)
            .payload(&[0; 10])
            .udp_len(40),
        bad,
    );
    fx.expect(
        "UDP length shorter than the IP payload",
        &udp().payload(&[0; 10]).udp_len(12),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.expect(
        "UDP length exact",
        &udp().payload(&[0; 10]),
        Outcome::Drop(Reason::NoAdmission),
    );
    // Like every malformed header, whatever the port: the stack would
    // discard it too (RFC 768, RFC 9293), so nothing valid is lost.
    fx.expect(
        "UDP length 3 to an open port",
        &Packet::udp4(STRANGER4, SERVER4, 5000, OPEN_PORT).udp_len(3),
        bad,
    );
    fx.expect(
        "TCP data offset 15 to an open port",
        &Packet::tcp4(STRANGER4, SERVER4, 1, OPEN_PORT)
            .ack()
            .data_offset(15),
        bad,
    );
}

/// IP length fields must agree with the frame (strict parsing): a length
/// that promises more than the frame holds, or less than the headers need,
/// is malformed. Trailing bytes no length counts (Ethernet padding) are
/// fine.
#[test]
fn ip_lengths_must_fit_the_frame() {
    let fx = Fx::new();
    let bad = Outcome::Drop(Reason::Malformed);
    let nope = Outcome::Drop(Reason::NoAdmission);
    let syn = || syn4(STRANGER4, 40000);
    let syn6 = || Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT).syn();
    // IPv4 total length (RFC 791 §3.1).
    fx.expect("total length one past the frame", &syn().total_len(41), bad);
    fx.expect("total length 65535", &syn().total_len(65535), bad);
    fx.expect("total length 0", &syn().total_len(0), bad);
    fx.expect(
        "total length = IHL (no room for TCP)",
        &syn().total_len(20),
        bad,
    );
    fx.expect(
        "total length ends inside the TCP header",
        &syn().total_len(30),
        bad,
    );
    fx.expect(
        "frame cut after the IP header, lengths unchanged",
        &syn().truncate_l4(0),
        bad,
    );
    fx.expect(
        "payload cut, lengths unchanged",
        &syn().payload(&[1; 100]).truncate_l4(60),
        bad,
    );
    fx.expect("Ethernet padding after the packet", &syn().trailer(6), nope);
    fx.expect(
        "UDP with Ethernet padding",
        &Packet::udp4(STRANGER4, SERVER4, 5000, UDP_PORT).trailer(18),
        nope,
    );
    // IPv6 payload length (RFC 8200 §3).
    fx.expect(
        "payload length one past the frame",
        &syn6().payload_len(21),
        bad,
    );
    fx.expect("payload length 65535", &syn6().payload_len(65535), bad);
    fx.expect(
        "payload length 0 (jumbogram) with TCP",
        &syn6().payload_len(0),
        bad,
    );
    fx.expect(
        "payload length ends inside the TCP header",
        &syn6().payload_len(12),
        bad,
    );
    fx.expect("v6 Ethernet padding", &syn6().trailer(10), nope);
    // Extension headers within the payload (RFC 8200 §4).
    fx.expect(
        "hop-by-hop header longer than the frame",
        &syn6()
            .ext(Ext::HopByHop { len: 30 })
            .truncate_l3(40 + 16)
            .payload_len(16),
        bad,
    );
    fx.expect(
        "destination options past the payload length",
        &syn6().ext(Ext::DestOpts { len: 1 }).payload_len(8),
        bad,
    );
    fx.expect(
        "routing header cut short, lengths agreeing",
        &Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT)
            .syn()
            .ext(Ext::Routing { len: 4 })
            .truncate_l3(40 + 8)
            .payload_len(8),
        bad,
    );
    // Unprotected ports: a length beyond the frame leaves the ports
    // unreadable as far as anyone can trust, so it is malformed there too.
    fx.expect(
        "total length past the frame, open port",
        &Packet::tcp4(STRANGER4, SERVER4, 1, OPEN_PORT)
            .syn()
            .total_len(200),
        bad,
    );
}

#[test]
fn malformed_ipv6_headers() {
    let fx = Fx::new();
    let bad = Outcome::Drop(Reason::Malformed);
    let syn = || Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT).syn();
    fx.expect("IPv6 header cut at 20 bytes", &syn().truncate_l3(20), bad);
    fx.expect("IPv6 header cut at 39 bytes", &syn().truncate_l3(39), bad);
    fx.expect(
        "IPv6 header cut, QinQ",
        &syn().qinq(1, 2).truncate_l3(8),
        bad,
    );
    fx.expect("version 4 in an IPv6 EtherType", &syn().ip_version(4), bad);
    // IPv6 bytes under the IPv4 EtherType: version 6 ≠ 4.
    fx.expect("IPv6 labelled IPv4", &syn().ether_type(0x0800), bad);
    // An IPv4 packet labelled IPv6: version 4 where 6 is expected.
    fx.expect(
        "IPv4 labelled IPv6",
        &syn4(STRANGER4, 40000).ether_type(0x86dd),
        bad,
    );
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut fx = Fx::new();
    let nope = Outcome::Drop(Reason::NoAdmission);
    let syn = || Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT).syn();
    for (name, e) in [
        ("hop-by-hop", Ext::HopByHop { len: 0 }),
        ("hop-by-hop, 24 bytes", Ext::HopByHop { len: 2 }),
        ("routing", Ext::Routing { len: 1 }),
        ("destination options", Ext::DestOpts { len: 0 }),
        ("AH", Ext::Ah { icv_words: 3 }),
        (
            "mobility (135)",
            Ext::Raw {
                code: 135,
                bytes: vec![0, 0, 0, 0, 0, 0, 0, 0],
            },
        ),
        (
            "HIP (139)",
            Ext::Raw {
                code: 139,
                bytes: vec![0; 8],
            },
        ),
        (
            "shim6 (140)",
            Ext::Raw {
                code: 140,
                bytes: vec![0; 8],
            },
        ),
    ] {
        fx.expect(name, &syn().ext(e), nope);
    }
    let chain = |n: usize| {
        let mut p = syn();
        for i in 0..n {
            p = p.ext(if i % 2 == 0 {
                Ext::DestOpts { len: 0 }
            } else {
                Ext::Routing { len: 0 }
            });
        }
        p
    };
    fx.expect("six extension headers", &chain(6), nope);
    fx.expect(
        "seven extension headers",
        &chain(7),
        Outcome::Drop(Reason::ExtChain),
    );
    fx.expect(
        "ten extension headers",
        &chain(10),
        Outcome::Drop(Reason::ExtChain),
    );
    fx.expect(
        "seven headers, AH last",
        &chain(6).ext(Ext::Ah { icv_words: 1 }),
        Outcome::Drop(Reason::ExtChain),
    );
    fx.expect(
        "six headers to an open port",
        &Packet::udp6(stranger6(), server6(), 1, OPEN_PORT)
            .ext(Ext::HopByHop { len: 0 })
            .ext(Ext::DestOpts { len: 0 })
            .ext(Ext::Routing { len: 0 })
            .ext(Ext::Fragment {
                offset: 0,
                more: false,
                id: 1,
            })
            .ext(Ext::Ah { icv_words: 1 })
            .ext(Ext::DestOpts { len: 0 }),
        Outcome::Untouched,
    );
    // One header long enough to push the upper layer past the bound.
    fx.expect(
        "2 KiB hop-by-hop",
        &syn().ext(Ext::HopByHop { len: 255 }),
        Outcome::Drop(Reason::ExtChain),
    );
    // Truncated extension headers.
    let bad = Outcome::Drop(Reason::Malformed);
    fx.expect(
        "hop-by-hop cut at 1 byte",
        &syn().ext(Ext::HopByHop { len: 0 }).truncate_l3(41),
        bad,
    );
    fx.expect(
        "fragment header cut at 6 bytes",
        &syn()
            .ext(Ext::Fragment {
                offset: 0,
                more: false,
                id: 1,
            })
            .truncate_l3(46),
        bad,
    );
    fx.expect(
        "AH cut at 1 byte",
        &syn().ext(Ext::Ah { icv_words: 1 }).truncate_l3(41),
        bad,
    );
    // A header whose length runs past the frame: the TCP header is missing.
    fx.expect(
        "routing header longer than the frame",
        &syn().ext(Ext::Routing { len: 1 }).truncate_l3(56),
        bad,
    );
    // ESP and "no next header" end the walk: not ours to judge.
    fx.expect(
        "ESP after hop-by-hop",
        &syn().ext(Ext::HopByHop { len: 0 }).protocol(50),
        Outcome::Untouched,
    );
    fx.expect(
        "ICMPv6 after destination options",
        &Packet::icmp6(stranger6(), server6()).ext(Ext::DestOpts { len: 0 }),
        Outcome::Untouched,
    );
    // And an admitted client through the extension headers.
    fx.admit(client6(), TCP_SVC, 0);
    let p = Packet::tcp6(client6(), server6(), 40000, TCP_PORT)
        .syn()
        .ext(Ext::HopByHop { len: 0 })
        .ext(Ext::Routing { len: 2 });
    fx.expect("admitted through extensions", &p, Outcome::Passed);
}
