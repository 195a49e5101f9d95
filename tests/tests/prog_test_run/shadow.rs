//! Shadow mode: a service in shadow passes what enforcing would drop and
//! counts it under the reason's shadow counter; traffic that would pass is
//! unchanged; other services keep enforcing; switching back enforces.

use super::*;

fn services(tcp_shadow: bool, udp_shadow: bool) -> Vec<ServiceEntry> {
    let mut s = default_services();
    s[0].shadow = tcp_shadow;
    s[1].shadow = udp_shadow;
    s
}

#[test]
fn a_shadow_service_passes_what_it_would_drop_and_counts_it() {
    let mut fx = Fx::new();
    fx.k.maps.sync_services(&services(true, false), 0).unwrap();
    let shadow = |r| Outcome::Shadow(r);
    // Every refusal of a packet for the service, v4 and v6.
    fx.expect(
        "SYN, no admission",
        &syn4(STRANGER4, 40000),
        shadow(Reason::NoAdmission),
    );
    fx.expect(
        "v6 SYN, no admission",
        &Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT).syn(),
        shadow(Reason::NoAdmission),
    );
    fx.expect(
        "RST without a flow",
        &Packet::tcp4(STRANGER4, SERVER4, 40000, TCP_PORT).flags(TCP_RST),
        shadow(Reason::BadFlags),
    );
    fx.expect(
        "first fragment",
        &syn4(STRANGER4, 40000).fragment(0, true),
        shadow(Reason::Fragment),
    );
    assert_eq!(fx.flows(), 0, "shadow passes create no flow");
    // The other service still enforces.
    fx.expect(
        "udp service enforcing",
        &Packet::udp4(STRANGER4, SERVER4, 5000, UDP_PORT),
        Outcome::Drop(Reason::NoAdmission),
    );
    // Admitted traffic is unchanged: passed and counted as such.
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("admitted SYN", &syn4(CLIENT4, 40001), Outcome::Passed);
    // Malformed packets are judged before the service is known: dropped.
    let mut short = syn4(STRANGER4, 40000).build();
    short.truncate(14 + 20 + 8);
    fx.expect_frame(
        "truncated TCP header",
        &short,
        Outcome::Drop(Reason::Malformed),
    );

    // Back to enforcing.
    fx.k.maps.sync_services(&services(false, false), 0).unwrap();
    fx.expect(
        "enforcing again",
        &syn4(STRANGER4, 40002),
        Outcome::Drop(Reason::NoAdmission),
    );
}

#[test]
fn shadow_applies_to_address_specific_services_and_identity_refusals() {
    let mut fx = Fx::new();
    let entries = vec![ServiceEntry {
        id: TCP_SVC,
        proto: PROTO_TCP,
        port: TCP_PORT,
        addr: Some(ip4(SERVER4)),
        shadow: true,
    }];
    fx.k.maps.sync_services(&entries, 0).unwrap();
    fx.expect(
        "address-specific, no admission",
        &syn4(STRANGER4, 40000),
        Outcome::Shadow(Reason::NoAdmission),
    );
    // An expired admission would drop as `expired`.
    fx.admit_until(ip4(CLIENT4), TCP_SVC, 0, monotonic_ns().saturating_sub(1));
    fx.expect(
        "expired",
        &syn4(CLIENT4, 40000),
        Outcome::Shadow(Reason::Expired),
    );
    assert_eq!(
        fx.k.maps.identity_stats(fx.slot).unwrap().dropped,
        0,
        "a shadow pass is not charged as a drop"
    );
}
