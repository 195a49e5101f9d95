//! Floods and events.

use super::*;

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn spoofed_syn_flood_grows_no_map() {
    let mut fx = Fx::new();
    fx.config(KernelConfig {
        events_per_sec: 5,
        ..KernelConfig::default()
    });
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.expect("legitimate SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    let (flows, admissions) = (fx.flows(), fx.admissions());
    assert_eq!((flows, admissions), (1, 1));
    let before = fx.counts();
    let start = Instant::now();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let n = 10_000;
    for i in 0..n {
        let r = rng.next();
        let src = [
            (r >> 24) as u8 | 1,
            (r >> 16) as u8,
            (r >> 8) as u8,
            r as u8,
        ];
        let pkt = if i % 2 == 0 {
            Packet::tcp4(src, SERVER4, (r >> 32) as u16, TCP_PORT)
                .syn()
                .build()
        } else {
            let mut a = [0u8; 16];
            a[0] = 0x20;
            a[1] = 0x01;
            a[8..].copy_from_slice(&r.to_be_bytes());
            Packet::tcp6(Ipv6Addr::from(a), server6(), (r >> 32) as u16, TCP_PORT)
                .syn()
                .build()
        };
        assert_eq!(fx.xdp_raw(&pkt), XDP_DROP, "flood packet {i}");
    }
    let d = delta(&before, &fx.counts());
    let mut want = [0u64; portcullis_common::DROP_COUNTERS as usize];
    want[Reason::NoAdmission as usize] = n;
    assert_eq!(describe(&d), describe(&want));
    assert_eq!(
        (fx.flows(), fx.admissions()),
        (flows, admissions),
        "no map grew"
    );
    // Sampling capped the events: 5 per CPU per second, and this thread is
    // pinned to one CPU.
    let windows = start.elapsed().as_secs() as usize + 1;
    let events = fx.k.maps.drain_events(100_000);
    if windows == 1 {
        assert_eq!(events.len(), 5);
    } else {
        assert!(
            (5..=5 * windows).contains(&events.len()),
            "{} events",
            events.len()
        );
    }
    assert!(
        events
            .iter()
            .all(|e| e.reason == Reason::NoAdmission as u32 && e.dport == TCP_PORT)
    );
    // The legitimate flow is untouched.
    fx.expect("legitimate ACK", &ack4(CLIENT4, 40000), Outcome::Passed);
}

#[test]
fn sampled_events_are_capped_and_accurate() {
    let mut fx = Fx::new();
    fx.config(KernelConfig {
        events_per_sec: 5,
        ..KernelConfig::default()
    });
    assert!(fx.k.maps.drain_events(100).is_empty());
    let t0 = monotonic_ns();
    for i in 0..100u16 {
        let p = Packet::tcp4([203, 0, 113, i as u8], SERVER4, 1000 + i, TCP_PORT).syn();
        fx.expect(&format!("drop {i}"), &p, Outcome::Drop(Reason::NoAdmission));
    }
    let t1 = monotonic_ns();
    let events = fx.k.maps.drain_events(1000);
    // The kernel never refills the budget itself: exactly the budget.
    assert_eq!(events.len(), 5, "one budget: exactly events_per_sec");
    for (i, ev) in events.iter().take(5).enumerate() {
        let i = i as u16;
        assert_eq!(ev.reason, Reason::NoAdmission as u32);
        assert_eq!(ev.service, TCP_SVC);
        assert_eq!(ev.src, addr_bytes(ip4([203, 0, 113, i as u8])));
        assert_eq!(ev.dst, addr_bytes(ip4(SERVER4)));
        assert_eq!((ev.sport, ev.dport), (1000 + i, TCP_PORT));
        assert_eq!((ev.proto, ev.family), (IPPROTO_TCP, FAMILY_V4));
        assert!(ev.time_ns >= t0 && ev.time_ns <= t1);
    }

    // Still exhausted until the agent starts a new second...
    fx.expect(
        "over budget",
        &syn4(STRANGER4, 2),
        Outcome::Drop(Reason::NoAdmission),
    );
    assert!(fx.k.maps.drain_events(1000).is_empty());
    // ...which samples again: other reasons and v6.
    fx.k.maps.reset_event_budget().unwrap();
    fx.expect(
        "v6 fragment",
        &Packet::udp6(stranger6(), server6(), 53, UDP_PORT).ext(Ext::Fragment {
            offset: 0,
            more: true,
            id: 1,
        }),
        Outcome::Drop(Reason::Fragment),
    );
    fx.expect(
        "malformed",
        &syn4(STRANGER4, 1).ihl(3),
        Outcome::Drop(Reason::Malformed),
    );
    let events = fx.k.maps.drain_events(1000);
    assert_eq!(events.len(), 2);
    let (frag, bad) = (events[0], events[1]);
    assert_eq!(frag.reason, Reason::Fragment as u32);
    assert_eq!(
        (frag.family, frag.proto, frag.sport, frag.dport),
        (FAMILY_V6, PROTO_UDP, 53, UDP_PORT)
    );
    assert_eq!((frag.src, frag.service), (stranger6().octets(), UDP_SVC));
    // Headers that could not be parsed carry no addresses.
    assert_eq!(bad.reason, Reason::Malformed as u32);
    assert_eq!(
        (bad.src, bad.sport, bad.family, bad.service),
        ([0; 16], 0, 0, 0)
    );
}

#[test]
fn no_events_when_sampling_is_off() {
    let mut fx = Fx::new();
    for i in 0..20 {
        fx.expect(
            "drop",
            &syn4(STRANGER4, i),
            Outcome::Drop(Reason::NoAdmission),
        );
    }
    assert!(fx.k.maps.drain_events(100).is_empty());
}
