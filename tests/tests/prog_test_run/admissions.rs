//! Protected TCP service: admissions, expiry, revocation, flow scope, addresses, UDP.

use super::*;

#[test]
fn admitted_syn_creates_flow_then_established_packets_pass() {
    let mut fx = Fx::new();
    let expires = monotonic_ns() + 60 * SEC;
    fx.admit_until(ip4(CLIENT4), TCP_SVC, 0, expires);
    // Other sources are still shut out.
    fx.expect(
        "stranger",
        &syn4(STRANGER4, 40000),
        Outcome::Drop(Reason::NoAdmission),
    );
    assert_eq!(fx.flows(), 0);

    let syn = syn4(CLIENT4, 40000).build();
    let t0 = monotonic_ns();
    fx.expect_frame("admitted SYN", &syn, Outcome::Passed);
    let key = flow_key(ip4(CLIENT4), ip4(SERVER4), 40000, TCP_PORT, PROTO_TCP);
    let flow = fx.flow(&key).expect("the SYN created a flow");
    assert_eq!(
        (flow.identity, flow.service, flow.epoch),
        (fx.slot, TCP_SVC, 0)
    );
    // Cached expiry: at most one second ahead (revocation reaches it).
    assert!(
        flow.expires_ns > t0 && flow.expires_ns <= monotonic_ns() + SEC,
        "{flow:?}"
    );
    assert_eq!(fx.flows(), 1);

    let ack = ack4(CLIENT4, 40000).payload(&[7; 100]).build();
    fx.expect_frame("established ACK", &ack, Outcome::Passed);
    fx.expect_frame("established ACK again", &ack, Outcome::Passed);
    assert_eq!(fx.flows(), 1, "established packets add no flow");
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!(st.connections, 1);
    assert_eq!(st.packets_in, 3);
    assert_eq!(st.bytes_in, (syn.len() + 2 * ack.len()) as u64);
    assert_eq!(st.dropped, 0);

    // A second connection from the same admitted source: another flow.
    fx.expect("second connection", &syn4(CLIENT4, 40001), Outcome::Passed);
    assert_eq!(fx.flows(), 2);
    assert_eq!(fx.k.maps.identity_stats(fx.slot).unwrap().connections, 2);
    assert_eq!(
        fx.admissions(),
        1,
        "a source-wide admission is not consumed"
    );
}

#[test]
fn admitted_ipv6_client_behind_vlans() {
    let mut fx = Fx::new();
    fx.admit(client6(), TCP_SVC, 0);
    let syn = Packet::tcp6(client6(), server6(), 50000, TCP_PORT)
        .syn()
        .qinq(100, 10);
    fx.expect("v6 SYN in QinQ", &syn, Outcome::Passed);
    let key = flow_key(client6(), server6(), 50000, TCP_PORT, PROTO_TCP);
    assert!(fx.flow(&key).is_some());
    let ack = Packet::tcp6(client6(), server6(), 50000, TCP_PORT)
        .ack()
        .vlan(10);
    fx.expect("v6 ACK, other tagging", &ack, Outcome::Passed);
    // The IPv4-mapped form of an IPv6 admission is a different source.
    fx.expect(
        "v4 stranger",
        &syn4(CLIENT4, 1),
        Outcome::Drop(Reason::NoAdmission),
    );
    assert_eq!(fx.flows(), 1);
}

#[test]
fn admission_is_per_service() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), UDP_SVC, 0);
    fx.expect(
        "TCP service",
        &syn4(CLIENT4, 40000),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.expect(
        "UDP service",
        &Packet::udp4(CLIENT4, SERVER4, 5000, UDP_PORT),
        Outcome::Passed,
    );
}

#[test]
fn expired_admission_is_dropped_expired() {
    let mut fx = Fx::new();
    fx.admit_until(ip4(CLIENT4), TCP_SVC, 0, monotonic_ns() - 1);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Drop(Reason::Expired));
    fx.expect("ACK", &ack4(CLIENT4, 40000), Outcome::Drop(Reason::Expired));
    assert_eq!(fx.flows(), 0);
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!((st.dropped, st.connections, st.packets_in), (2, 0, 0));
}

#[test]
fn expiry_reaches_an_established_flow() {
    let mut fx = Fx::new();
    let expires = monotonic_ns() + 300_000_000;
    fx.admit_until(ip4(CLIENT4), TCP_SVC, 0, expires);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    let key = flow_key(ip4(CLIENT4), ip4(SERVER4), 40000, TCP_PORT, PROTO_TCP);
    assert_eq!(
        fx.flow(&key).unwrap().expires_ns,
        expires,
        "flow caches the admission expiry"
    );
    fx.expect("ACK before expiry", &ack4(CLIENT4, 40000), Outcome::Passed);
    while monotonic_ns() <= expires {
        sleep(Duration::from_millis(20));
    }
    fx.expect(
        "ACK after expiry",
        &ack4(CLIENT4, 40000),
        Outcome::Drop(Reason::Expired),
    );
    assert!(fx.flow(&key).is_none(), "the expired flow is removed");
}

/// An admission deleted without touching the flow table (an agent that
/// died half-way through a revocation) still stops its flows within 1 s.
#[test]
fn deleted_admission_stops_its_flow_within_a_second() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    let created = Instant::now();
    let akeys: Vec<_> = fx.k.maps.admissions().into_iter().map(|(k, _)| k).collect();
    for k in &akeys {
        fx.k.maps.admissions.remove(k).unwrap();
    }
    fx.expect(
        "ACK within the cached second",
        &ack4(CLIENT4, 40000),
        Outcome::Passed,
    );
    sleep(Duration::from_millis(1050).saturating_sub(created.elapsed()));
    fx.expect(
        "ACK after the recheck",
        &ack4(CLIENT4, 40000),
        Outcome::Drop(Reason::NoAdmission),
    );
    assert_eq!(fx.flows(), 0);
}

#[test]
fn revoked_identity_drops_established_flow_as_revoked() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    fx.expect("SYN 2", &syn4(CLIENT4, 40001), Outcome::Passed);
    // The kernel's view once the agent has flipped the identity (the first
    // step of `revoke_identity`): state revoked, epoch bumped.
    let mut ident = fx.k.maps.identity(fx.slot).unwrap();
    ident.state = IDENTITY_REVOKED;
    ident.epoch += 1;
    fx.k.maps.identities.set(fx.slot, ident, 0).unwrap();
    fx.expect(
        "established ACK",
        &ack4(CLIENT4, 40000),
        Outcome::Drop(Reason::Revoked),
    );
    assert_eq!(fx.flows(), 1, "the revoked flow is removed");
    fx.expect(
        "new SYN",
        &syn4(CLIENT4, 40002),
        Outcome::Drop(Reason::Revoked),
    );
    assert_eq!(fx.flows(), 1);
    assert_eq!(fx.k.maps.identity_stats(fx.slot).unwrap().dropped, 2);
}

#[test]
fn revoke_identity_cuts_flows_and_admissions() {
    let mut fx = Fx::new();
    open_tcp4_and_udp6(&mut fx);
    assert_eq!((fx.flows(), fx.admissions()), (2, 2));
    let slot = fx.slot;
    assert_eq!(fx.k.maps.revoke_identity(slot).unwrap(), 2);
    assert_eq!((fx.flows(), fx.admissions()), (0, 0));
    // The agent removed the flows and admissions, so the kernel finds none.
    fx.expect(
        "established ACK",
        &ack4(CLIENT4, 40000),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.expect(
        "UDP v6",
        &Packet::udp6(client6(), server6(), 5000, UDP_PORT),
        Outcome::Drop(Reason::NoAdmission),
    );
    // An admission written with the old epoch (a racing grant) is refused.
    let stale = portcullis_common::Admission {
        identity: slot,
        epoch: 0,
        expires_ns: monotonic_ns() + 60 * SEC,
        flags: 0,
        _pad: 0,
    };
    let akey = portcullis_common::AdmissionKey {
        addr: addr_bytes(ip4(CLIENT4)),
        service: TCP_SVC,
        src_port: 0,
        _pad: 0,
    };
    fx.k.maps.admissions.insert(akey, stale, 0).unwrap();
    fx.expect(
        "stale-epoch admission",
        &syn4(CLIENT4, 40001),
        Outcome::Drop(Reason::Revoked),
    );
    // Re-admitting the identity gives it a new epoch and works again.
    let (slot2, epoch) = fx.k.maps.upsert_identity(unlimited(), "test").unwrap();
    // Revocation bumped the epoch to 1, re-use of a revoked slot to 2.
    assert_eq!((slot2, epoch), (slot, 2));
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("re-admitted SYN", &syn4(CLIENT4, 40002), Outcome::Passed);
}

#[test]
fn revoke_source_removes_flow_and_admission() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(ip4(STRANGER4), TCP_SVC, 0);
    fx.expect("client SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    fx.expect("other SYN", &syn4(STRANGER4, 40000), Outcome::Passed);
    assert_eq!(fx.k.maps.revoke_source(ip4(CLIENT4), TCP_SVC).unwrap(), 1);
    assert_eq!((fx.flows(), fx.admissions()), (1, 1));
    let key = flow_key(ip4(CLIENT4), ip4(SERVER4), 40000, TCP_PORT, PROTO_TCP);
    assert!(fx.flow(&key).is_none());
    fx.expect(
        "new SYN",
        &syn4(CLIENT4, 40001),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.expect(
        "old flow's ACK",
        &ack4(CLIENT4, 40000),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.expect(
        "other source unaffected",
        &ack4(STRANGER4, 40000),
        Outcome::Passed,
    );
}

#[test]
fn flow_scoped_admission_covers_one_port_once() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 40000);
    fx.expect(
        "other port",
        &syn4(CLIENT4, 40001),
        Outcome::Drop(Reason::NoAdmission),
    );
    assert_eq!(fx.admissions(), 1);
    fx.expect("the port", &syn4(CLIENT4, 40000), Outcome::Passed);
    assert_eq!(
        (fx.admissions(), fx.flows()),
        (0, 1),
        "consumed by its flow"
    );
    fx.expect(
        "another port after use",
        &syn4(CLIENT4, 40002),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.expect("its flow continues", &ack4(CLIENT4, 40000), Outcome::Passed);
}

/// One use means one connection: a retransmission of the first SYN (same
/// initial sequence number) still passes, a new connection from the same
/// port (new ISN) does not, even while the flow entry lives.
#[test]
fn flow_scoped_admission_admits_one_connection_not_one_port() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 40000);
    let first = syn4(CLIENT4, 40000).seq(1_000, 0);
    fx.expect("first SYN", &first, Outcome::Passed);
    assert_eq!(fx.admissions(), 0, "consumed");
    // Keep the kernel looking for flow-scoped admissions (another pending
    // one exists), the situation in which the retransmit branch runs.
    fx.admit(ip4(CLIENT4), TCP_SVC, 40009);
    fx.expect("retransmitted first SYN", &first, Outcome::Passed);
    fx.expect(
        "new connection from the same port",
        &syn4(CLIENT4, 40000).seq(777_777, 0),
        Outcome::Drop(Reason::NoAdmission),
    );
}

/// A flow-scoped admission is consumed when its flow is created, so the
/// flow cannot re-validate against it: it must live until the admission's
/// expiry, not die at the one-second recheck.
#[test]
fn flow_scoped_connection_outlives_the_recheck() {
    let mut fx = Fx::new();
    let expires = monotonic_ns() + 60 * SEC;
    fx.admit_until(ip4(CLIENT4), TCP_SVC, 40000, expires);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    let key = flow_key(ip4(CLIENT4), ip4(SERVER4), 40000, TCP_PORT, PROTO_TCP);
    assert_eq!(fx.flow(&key).unwrap().expires_ns, expires);
    sleep(Duration::from_millis(1100));
    fx.expect("ACK after 1.1 s", &ack4(CLIENT4, 40000), Outcome::Passed);
    assert_eq!(fx.flows(), 1);
    // Revocation still reaches it at once, through the epoch.
    let slot = fx.slot;
    let mut ident = fx.k.maps.identity(slot).unwrap();
    ident.state = IDENTITY_REVOKED;
    ident.epoch += 1;
    fx.k.maps.identities.set(slot, ident, 0).unwrap();
    fx.expect(
        "after revocation",
        &ack4(CLIENT4, 40000),
        Outcome::Drop(Reason::Revoked),
    );
}

#[test]
fn address_specific_services() {
    let mut fx = Fx::new();
    let other4 = [10, 0, 0, 9];
    let services = vec![
        // 8000 protected on 10.0.0.1 and fd00::1 only.
        ServiceEntry {
            id: 3,
            proto: PROTO_TCP,
            port: TCP_PORT,
            addr: Some(ip4(SERVER4)),
            shadow: false,
        },
        ServiceEntry {
            id: 3,
            proto: PROTO_TCP,
            port: TCP_PORT,
            addr: Some(IpAddr::V6(server6())),
            shadow: false,
        },
        // 9000: service 4 on 10.0.0.1, wildcard service 5 elsewhere.
        ServiceEntry {
            id: 4,
            proto: PROTO_TCP,
            port: 9000,
            addr: Some(ip4(SERVER4)),
            shadow: false,
        },
        ServiceEntry {
            id: 5,
            proto: PROTO_TCP,
            port: 9000,
            addr: None,
            shadow: false,
        },
        // UDP 8001 on 10.0.0.1 only.
        ServiceEntry {
            id: 6,
            proto: PROTO_UDP,
            port: UDP_PORT,
            addr: Some(ip4(SERVER4)),
            shadow: false,
        },
    ];
    fx.k.maps.sync_services(&services, 0).unwrap();
    let nope = Outcome::Drop(Reason::NoAdmission);
    let to = |dst: [u8; 4], port: u16| Packet::tcp4(CLIENT4, dst, 40000, port).syn();
    fx.expect("8000 on the service address", &to(SERVER4, TCP_PORT), nope);
    fx.expect("8000 elsewhere", &to(other4, TCP_PORT), Outcome::Untouched);
    let v6 = |dst: Ipv6Addr| Packet::tcp6(client6(), dst, 40000, TCP_PORT).syn();
    fx.expect("8000 on the v6 service address", &v6(server6()), nope);
    fx.expect(
        "8000 on another v6 address",
        &v6("fd00::99".parse().unwrap()),
        Outcome::Untouched,
    );
    fx.expect("9000 on the specific address", &to(SERVER4, 9000), nope);
    fx.expect("9000 elsewhere (wildcard)", &to(other4, 9000), nope);
    fx.expect(
        "udp 8001 on the address",
        &Packet::udp4(CLIENT4, SERVER4, 1, UDP_PORT),
        nope,
    );
    fx.expect(
        "udp 8001 elsewhere",
        &Packet::udp4(CLIENT4, other4, 1, UDP_PORT),
        Outcome::Untouched,
    );

    // Admissions name the service the address resolves to.
    fx.admit(ip4(CLIENT4), 5, 0);
    fx.expect(
        "wildcard service admitted",
        &to(other4, 9000),
        Outcome::Passed,
    );
    fx.expect("specific service not admitted", &to(SERVER4, 9000), nope);
    fx.admit(ip4(CLIENT4), 3, 0);
    fx.expect(
        "service 3 admitted",
        &to(SERVER4, TCP_PORT),
        Outcome::Passed,
    );
    let key = flow_key(ip4(CLIENT4), ip4(SERVER4), 40000, TCP_PORT, PROTO_TCP);
    assert_eq!(fx.flow(&key).unwrap().service, 3);

    // Removing the address-specific entries unprotects the port again.
    fx.k.maps.sync_services(&default_services(), 0).unwrap();
    assert_eq!(fx.k.maps.services.keys().count(), 0);
    fx.expect("9000 after resync", &to(SERVER4, 9000), Outcome::Untouched);
}

#[test]
fn udp_service_needs_an_admission() {
    let mut fx = Fx::new();
    let dgram =
        |src: [u8; 4], sport: u16| Packet::udp4(src, SERVER4, sport, UDP_PORT).payload(b"query");
    fx.expect(
        "unadmitted",
        &dgram(CLIENT4, 5000),
        Outcome::Drop(Reason::NoAdmission),
    );
    fx.admit(ip4(CLIENT4), UDP_SVC, 0);
    fx.expect("first datagram", &dgram(CLIENT4, 5000), Outcome::Passed);
    let key = flow_key(ip4(CLIENT4), ip4(SERVER4), 5000, UDP_PORT, PROTO_UDP);
    assert_eq!(fx.flow(&key).unwrap().service, UDP_SVC);
    fx.expect("second datagram", &dgram(CLIENT4, 5000), Outcome::Passed);
    fx.expect(
        "stranger",
        &dgram(STRANGER4, 5000),
        Outcome::Drop(Reason::NoAdmission),
    );
    let v6 = Packet::udp6(client6(), server6(), 5000, UDP_PORT);
    fx.expect(
        "v6 source not admitted",
        &v6,
        Outcome::Drop(Reason::NoAdmission),
    );
    assert_eq!(fx.flows(), 1);
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!((st.connections, st.packets_in), (1, 2));
}
