//! Traffic that is not ours to judge.

use super::*;

#[test]
fn unprotected_ports_pass_untouched() {
    let fx = Fx::new();
    type Tagging = fn(Packet) -> Packet;
    let vlans: [(&str, Tagging); 3] = [
        ("untagged", |p| p),
        ("802.1Q", |p| p.vlan(10)),
        ("QinQ", |p| p.qinq(100, 10)),
    ];
    for (tag, add) in vlans {
        for (name, p) in [
            (
                "tcp4 syn",
                Packet::tcp4(STRANGER4, SERVER4, 1234, OPEN_PORT).syn(),
            ),
            (
                "tcp4 ack",
                Packet::tcp4(STRANGER4, SERVER4, 1234, OPEN_PORT).ack(),
            ),
            ("udp4", Packet::udp4(STRANGER4, SERVER4, 1234, OPEN_PORT)),
            (
                "tcp6 syn",
                Packet::tcp6(stranger6(), server6(), 1234, OPEN_PORT).syn(),
            ),
            (
                "udp6",
                Packet::udp6(stranger6(), server6(), 1234, OPEN_PORT),
            ),
            // The protected port numbers over the other protocol.
            (
                "udp4 to the tcp port",
                Packet::udp4(STRANGER4, SERVER4, 1234, TCP_PORT),
            ),
            (
                "tcp4 to the udp port",
                Packet::tcp4(STRANGER4, SERVER4, 1234, UDP_PORT).syn(),
            ),
            (
                "udp6 to the tcp port",
                Packet::udp6(stranger6(), server6(), 1234, TCP_PORT),
            ),
        ] {
            fx.expect(&format!("{name} {tag}"), &add(p), Outcome::Untouched);
        }
    }
    assert_eq!(fx.flows(), 0);
}

#[test]
fn non_ip_frames_pass_untouched() {
    let fx = Fx::new();
    fx.expect("ARP", &Packet::arp(STRANGER4, SERVER4), Outcome::Untouched);
    fx.expect(
        "ARP in a VLAN",
        &Packet::arp(STRANGER4, SERVER4).vlan(7),
        Outcome::Untouched,
    );
    fx.expect(
        "ARP in QinQ",
        &Packet::arp(STRANGER4, SERVER4).qinq(1, 2),
        Outcome::Untouched,
    );
    fx.expect(
        "unknown EtherType",
        &Packet::ethernet(0x88b5, &[0xab; 46]),
        Outcome::Untouched,
    );
    fx.expect(
        "unknown EtherType in a VLAN",
        &Packet::ethernet(0x88b5, &[0xab; 46]).vlan(3),
        Outcome::Untouched,
    );
    // A VLAN tag cut short: the parser cannot see what it carries.
    fx.expect(
        "truncated VLAN tag",
        &Packet::tcp4(STRANGER4, SERVER4, 1, TCP_PORT)
            .syn()
            .vlan(5)
            .truncate(16),
        Outcome::Untouched,
    );
}

#[test]
fn icmp_and_other_ip_protocols_pass_untouched() {
    let fx = Fx::new();
    fx.expect(
        "ICMP echo",
        &Packet::icmp4(STRANGER4, SERVER4),
        Outcome::Untouched,
    );
    fx.expect(
        "ICMP in a VLAN",
        &Packet::icmp4(STRANGER4, SERVER4).vlan(9),
        Outcome::Untouched,
    );
    fx.expect(
        "ICMPv6 echo",
        &Packet::icmp6(stranger6(), server6()),
        Outcome::Untouched,
    );
    fx.expect(
        "ICMPv6 in QinQ",
        &Packet::icmp6(stranger6(), server6()).qinq(1, 2),
        Outcome::Untouched,
    );
    fx.expect(
        "GRE",
        &Packet::ip4_raw(STRANGER4, SERVER4, 47).payload(&[0; 8]),
        Outcome::Untouched,
    );
    fx.expect(
        "ESP over IPv6",
        &Packet::udp6(stranger6(), server6(), 1, UDP_PORT).protocol(50),
        Outcome::Untouched,
    );
    fx.expect(
        "IPv6 no next header",
        &Packet::udp6(stranger6(), server6(), 1, UDP_PORT).protocol(59),
        Outcome::Untouched,
    );
}

/// Runts: the parser passes a frame shorter than an Ethernet header. The
/// kernel's test-run refuses such input outright (EINVAL below ETH_HLEN of
/// packet data, metadata or not), so a sub-14-byte frame is run only where
/// the kernel accepts it; the shortest legal frames are always checked.
#[test]
fn runt_and_header_only_frames() {
    let fx = Fx::new();
    let syn = syn4(STRANGER4, 1000).build();
    let mut accepted = 0;
    for len in 1..14 {
        let before = fx.counts();
        let r = fx.k.xdp(programs::INGRESS).test_run(TestRunOptions {
            data_in: Some(&syn[..len]),
            ..Default::default()
        });
        match r {
            Ok(r) => {
                accepted += 1;
                assert_eq!(r.return_value, XDP_PASS, "{len}-byte runt");
                assert_eq!(describe(&delta(&before, &fx.counts())), "no counter");
            }
            Err(e) => assert!(
                format!("{e:?}").contains("InvalidInput"),
                "{len}-byte runt: unexpected error {e:?}"
            ),
        }
    }
    if accepted == 0 {
        eprintln!(
            "note: this kernel refuses test-run frames under 14 bytes; runt verdicts not run"
        );
    }
    // Exactly an Ethernet header and nothing else.
    fx.expect_frame(
        "14-byte ARP",
        &syn4(STRANGER4, 1).ether_type(0x0806).build()[..14],
        Outcome::Untouched,
    );
    fx.expect_frame(
        "14-byte VLAN",
        &syn4(STRANGER4, 1).vlan(1).build()[..14],
        Outcome::Untouched,
    );
    fx.expect_frame(
        "14-byte IPv6",
        &Packet::udp6(stranger6(), server6(), 1, UDP_PORT).build()[..14],
        Outcome::Drop(Reason::Malformed),
    );
    fx.expect_frame("14-byte IPv4", &syn[..14], Outcome::Drop(Reason::Malformed));
}
