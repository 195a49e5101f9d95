//! Rates.

use super::*;

#[test]
fn connection_rate_allows_exactly_the_burst() {
    let burst = 4;
    let mut fx = Fx::with_identity(conn_limit(unlimited(), 1, burst));
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    for i in 0..10u16 {
        let want = if u64::from(i) < burst {
            Outcome::Passed
        } else {
            Outcome::Drop(Reason::ConnRate)
        };
        fx.expect(&format!("SYN #{i}"), &syn4(CLIENT4, 41000 + i), want);
    }
    assert_eq!(fx.flows(), burst as usize);
    // Established flows are not new connections: they still pass.
    fx.expect("established ACK", &ack4(CLIENT4, 41000), Outcome::Passed);
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!((st.connections, st.dropped), (burst, 10 - burst));
}

#[test]
fn ingress_byte_rate_allows_exactly_the_burst() {
    // 100 B/s with a 300-byte burst: three 100-byte frames, then drops.
    let mut fx = Fx::with_identity(in_byte_limit(unlimited(), 100, 300));
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    let syn = syn4(CLIENT4, 40000).frame_len(100);
    let ack = ack4(CLIENT4, 40000).frame_len(100);
    fx.expect("SYN", &syn, Outcome::Passed);
    fx.expect("ACK 1", &ack, Outcome::Passed);
    fx.expect("ACK 2", &ack, Outcome::Passed);
    for i in 3..8 {
        fx.expect(&format!("ACK {i}"), &ack, Outcome::Drop(Reason::ByteRate));
    }
    let st = fx.k.maps.identity_stats(fx.slot).unwrap();
    assert_eq!((st.packets_in, st.bytes_in, st.dropped), (3, 300, 5));
}
