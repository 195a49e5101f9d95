//! Usage per (identity, service).

use super::*;

/// Usage rows keyed by (slot, service id).
fn usage(fx: &Fx) -> std::collections::BTreeMap<(u32, u32), portcullis_common::IdentityStats> {
    fx.k.maps
        .usage()
        .unwrap()
        .into_iter()
        .map(|u| ((u.slot, u.service), u.stats))
        .collect()
}

#[test]
fn usage_is_counted_per_identity_and_service() {
    let mut fx = Fx::new();
    // A third service, address-specific, so its column comes from the
    // PCL_SERVICES entry rather than the port table.
    let mut services = default_services();
    services.push(ServiceEntry {
        id: 3,
        proto: PROTO_TCP,
        port: 9000,
        addr: Some(ip4(SERVER4)),
        shadow: false,
    });
    fx.k.maps.sync_services(&services, 0).unwrap();
    let cols = fx.k.maps.usage_columns().unwrap();
    for id in [TCP_SVC, UDP_SVC, 3] {
        assert_eq!(cols.iter().filter(|c| **c == id).count(), 1, "{cols:?}");
    }
    let a = fx.slot;
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(ip4(CLIENT4), UDP_SVC, 0);
    fx.admit(ip4(CLIENT4), 3, 0);
    let (b, _) =
        fx.k.maps
            .upsert_identity(
                Identity {
                    key: 0xb0b,
                    ..Identity::default()
                },
                "b",
            )
            .unwrap();
    fx.k.maps
        .admit(b, client6().into(), TCP_SVC, 0, monotonic_ns() + 60 * SEC)
        .unwrap();

    let syn = syn4(CLIENT4, 40000).build();
    let ack = ack4(CLIENT4, 40000).payload(&[1; 200]).build();
    fx.expect_frame("A tcp SYN", &syn, Outcome::Passed);
    fx.expect_frame("A tcp ACK", &ack, Outcome::Passed);
    fx.expect_frame("A tcp ACK", &ack, Outcome::Passed);
    let dgram = Packet::udp4(CLIENT4, SERVER4, 5000, UDP_PORT)
        .payload(&[2; 50])
        .build();
    for _ in 0..4 {
        fx.expect_frame("A udp", &dgram, Outcome::Passed);
    }
    let syn9 = Packet::tcp4(CLIENT4, SERVER4, 40001, 9000).syn().build();
    fx.expect_frame("A by-address SYN", &syn9, Outcome::Passed);
    let syn_b = Packet::tcp6(client6(), server6(), 50000, TCP_PORT)
        .syn()
        .build();
    fx.expect_frame("B tcp SYN", &syn_b, Outcome::Passed);
    // Responses: two on A's TCP flow, one on A's by-address flow.
    let resp = response4(CLIENT4, 40000, 500);
    assert_eq!(fx.tc_raw(&resp), TC_ACT_UNSPEC);
    assert_eq!(fx.tc_raw(&resp), TC_ACT_UNSPEC);
    let resp9 = Packet::tcp4(SERVER4, CLIENT4, 9000, 40001)
        .ack()
        .frame_len(300)
        .build();
    assert_eq!(fx.tc_raw(&resp9), TC_ACT_UNSPEC);

    let stats = |c: u64, pi: u64, bi: u64, po: u64, bo: u64| portcullis_common::IdentityStats {
        connections: c,
        packets_in: pi,
        bytes_in: bi,
        packets_out: po,
        bytes_out: bo,
        dropped: 0,
    };
    let want: std::collections::BTreeMap<_, _> = [
        (
            (a, TCP_SVC),
            stats(1, 3, (syn.len() + 2 * ack.len()) as u64, 2, 1000),
        ),
        ((a, UDP_SVC), stats(1, 4, 4 * dgram.len() as u64, 0, 0)),
        ((a, 3), stats(1, 1, syn9.len() as u64, 1, 300)),
        ((b, TCP_SVC), stats(1, 1, syn_b.len() as u64, 0, 0)),
    ]
    .into_iter()
    .collect();
    assert_eq!(usage(&fx), want);
    // The per-identity view is the sum over services.
    let st = fx.k.maps.identity_stats(a).unwrap();
    assert_eq!((st.connections, st.packets_in, st.packets_out), (3, 8, 3));

    // A drop attributed to an identity lands in that service's row.
    let mut ident = fx.k.maps.identity(b).unwrap();
    ident.state = IDENTITY_REVOKED;
    ident.epoch += 1;
    fx.k.maps.identities.set(b, ident, 0).unwrap();
    fx.expect_frame("B after revocation", &syn_b, Outcome::Drop(Reason::Revoked));
    assert_eq!(usage(&fx)[&(b, TCP_SVC)].dropped, 1);
    assert_eq!(
        fx.k.maps.usage_row(b, 0).unwrap().dropped
            + fx.k.maps.usage_row(b, 1).unwrap().dropped
            + fx.k.maps.usage_row(b, 2).unwrap().dropped,
        1
    );

    // Re-syncing (another order, as after a restart) keeps every column,
    // so counters stay with their service.
    services.reverse();
    fx.k.maps.sync_services(&services, 0).unwrap();
    assert_eq!(fx.k.maps.usage_columns().unwrap(), cols);
    assert_eq!(usage(&fx), {
        let mut w = want.clone();
        w.get_mut(&(b, TCP_SVC)).unwrap().dropped = 1;
        w
    });
}

#[test]
fn reused_slots_and_columns_start_from_zero() {
    let mut fx = Fx::new();
    let a = fx.slot;
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    assert_eq!(usage(&fx)[&(a, TCP_SVC)].connections, 1);
    let instance = fx.k.maps.usage_instance().unwrap();
    assert_eq!(fx.k.maps.usage_instance().unwrap(), instance, "stable");

    // Every column in use, then the TCP service replaced by another: the
    // newcomer gets a free column first, and only when none is left a
    // retired one, zeroed.
    let mut services = default_services();
    for i in 0..(portcullis_common::MAX_USAGE_SERVICES - 2) {
        services.push(ServiceEntry {
            id: 100 + i,
            proto: PROTO_TCP,
            port: 20_000 + i as u16,
            addr: None,
            shadow: false,
        });
    }
    fx.k.maps.sync_services(&services, 0).unwrap();
    let tcp_col =
        fx.k.maps
            .usage_columns()
            .unwrap()
            .iter()
            .position(|c| *c == TCP_SVC)
            .unwrap() as u32;
    assert_eq!(fx.k.maps.usage_row(a, tcp_col).unwrap().connections, 1);
    services[0].id = 77;
    fx.k.maps.sync_services(&services, 0).unwrap();
    let cols = fx.k.maps.usage_columns().unwrap();
    assert_eq!(cols[tcp_col as usize], 77, "{cols:?}");
    assert_eq!(fx.k.maps.usage_row(a, tcp_col).unwrap(), Default::default());
    // One more service than columns is refused.
    services.push(ServiceEntry {
        id: 999,
        proto: PROTO_UDP,
        port: 30_000,
        addr: None,
        shadow: false,
    });
    assert!(fx.k.maps.sync_services(&services, 0).is_err());
    services.pop();

    // A slot freed and given to another identity: its rows are zeroed.
    fx.k.maps
        .admit(a, ip4(CLIENT4), 77, 0, monotonic_ns() + 60 * SEC)
        .unwrap();
    fx.expect("SYN to 77", &syn4(CLIENT4, 40001), Outcome::Passed);
    assert_eq!(usage(&fx)[&(a, 77)].connections, 1);
    fx.k.maps.revoke_identity(a).unwrap();
    fx.k.maps.reclaim_idle(monotonic_ns()).unwrap();
    let (again, _) =
        fx.k.maps
            .upsert_identity(
                Identity {
                    key: 0xca201,
                    ..Identity::default()
                },
                "carol",
            )
            .unwrap();
    assert_eq!(again, a, "the freed slot is reused");
    assert!(usage(&fx).is_empty(), "{:?}", usage(&fx));

    // Another load of the object: other maps, another instance.
    let other = Unattached::load().unwrap();
    assert_ne!(other.maps.usage_instance().unwrap(), instance);
}
