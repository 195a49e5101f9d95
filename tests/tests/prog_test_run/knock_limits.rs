//! Knock pre-auth limits.

use super::*;

fn knock_config(
    src_per_sec: u64,
    src_burst: u64,
    all_per_sec: u64,
    all_burst: u64,
) -> KernelConfig {
    let cost = |r: u64| SEC.checked_div(r).unwrap_or(0);
    KernelConfig {
        knock_port: KNOCK_PORT,
        knock_src_cost_ns: cost(src_per_sec),
        knock_src_burst_ns: cost(src_per_sec) * src_burst,
        knock_all_cost_ns: cost(all_per_sec),
        knock_all_burst_ns: cost(all_per_sec) * all_burst,
        ..KernelConfig::default()
    }
}

fn knock(src: [u8; 4]) -> Packet {
    Packet::udp4(src, SERVER4, 33333, KNOCK_PORT).payload(&[0x42; 200])
}

#[test]
fn knock_per_source_limit() {
    let mut fx = Fx::new();
    fx.k.maps
        .sync_services(&default_services(), KNOCK_PORT)
        .unwrap();
    fx.config(knock_config(1, 3, 0, 0));
    for i in 0..3 {
        fx.expect(&format!("knock {i}"), &knock(CLIENT4), Outcome::Knock);
    }
    for i in 3..6 {
        fx.expect(
            &format!("knock {i}"),
            &knock(CLIENT4),
            Outcome::Drop(Reason::KnockSourceRate),
        );
    }
    fx.expect("another source", &knock(STRANGER4), Outcome::Knock);
    let v6 = Packet::udp6(client6(), server6(), 1, KNOCK_PORT);
    fx.expect("a v6 source", &v6, Outcome::Knock);
    // TCP to the knock port is not a knock.
    fx.expect(
        "TCP to the knock port",
        &Packet::tcp4(CLIENT4, SERVER4, 1, KNOCK_PORT).syn(),
        Outcome::Untouched,
    );
    // Knocks create no flows and need no admission.
    assert_eq!(fx.flows(), 0);
}

#[test]
fn knock_global_limit() {
    let mut fx = Fx::new();
    fx.k.maps
        .sync_services(&default_services(), KNOCK_PORT)
        .unwrap();
    // Per source: 1/s burst 2; node-wide: 1/s burst 5.
    fx.config(knock_config(1, 2, 1, 5));
    for i in 0..5u8 {
        fx.expect(
            &format!("source {i}"),
            &knock([198, 51, 100, i]),
            Outcome::Knock,
        );
    }
    for i in 5..9u8 {
        fx.expect(
            &format!("source {i}"),
            &knock([198, 51, 100, i]),
            Outcome::Drop(Reason::KnockGlobalRate),
        );
    }
    // The per-source limit is checked first.
    fx.expect(
        "source 0 again",
        &knock([198, 51, 100, 0]),
        Outcome::Drop(Reason::KnockGlobalRate),
    );
    fx.expect(
        "source 0, over its own limit",
        &knock([198, 51, 100, 0]),
        Outcome::Drop(Reason::KnockSourceRate),
    );
}
