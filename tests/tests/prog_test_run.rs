//! BPF_PROG_TEST_RUN tests of the kernel programs: every parse path and
//! decision, each asserting the verdict AND the exact per-reason counter
//! deltas (so a packet that passes or drops for the wrong reason fails).
//!
//! Each test loads its own copy of the object (fresh maps), so tests are
//! independent and run in parallel. Needs root (CAP_BPF, CAP_NET_ADMIN).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread::sleep,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use portcullis_agent::kernel::{ServiceEntry, Unattached, clock::monotonic_ns, maps::addr_bytes};
use portcullis_common::{
    BYTE_COST_SHIFT, FAMILY_V4, FAMILY_V6, Flow, FlowKey, IDENTITY_REVOKED, Identity, KernelConfig,
    PROTO_TCP, PROTO_UDP, Reason, programs,
};
use portcullis_tests::packet::{
    Ext, IPPROTO_TCP, Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1) as the kernel reports it in the u32 retval.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;

const TCP_PORT: u16 = 8000;
const UDP_PORT: u16 = 8001;
const OPEN_PORT: u16 = 9999;
const KNOCK_PORT: u16 = 7000;
const TCP_SVC: u32 = 1;
const UDP_SVC: u32 = 2;

const CLIENT4: [u8; 4] = [10, 0, 0, 2];
const SERVER4: [u8; 4] = [10, 0, 0, 1];
const STRANGER4: [u8; 4] = [192, 0, 2, 7];
const SEC: u64 = 1_000_000_000;

fn client6() -> Ipv6Addr {
    "fd00::2".parse().unwrap()
}
fn server6() -> Ipv6Addr {
    "fd00::1".parse().unwrap()
}
fn stranger6() -> Ipv6Addr {
    "2001:db8::7".parse().unwrap()
}
fn ip4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn default_services() -> Vec<ServiceEntry> {
    vec![
        ServiceEntry {
            id: TCP_SVC,
            proto: PROTO_TCP,
            port: TCP_PORT,
            addr: None,
        },
        ServiceEntry {
            id: UDP_SVC,
            proto: PROTO_UDP,
            port: UDP_PORT,
            addr: None,
        },
    ]
}

/// An identity without limits.
fn unlimited() -> Identity {
    Identity {
        key: 0x5eed,
        ..Identity::default()
    }
}

/// GCRA parameters the way the agent precomputes them.
fn conn_limit(mut id: Identity, per_sec: u64, burst: u64) -> Identity {
    id.conn_cost_ns = SEC / per_sec;
    id.conn_burst_ns = id.conn_cost_ns * burst;
    id
}
fn in_byte_limit(mut id: Identity, bytes_per_sec: u64, burst_bytes: u64) -> Identity {
    id.in_byte_cost = (SEC << BYTE_COST_SHIFT) / bytes_per_sec;
    id.in_burst_ns = burst_bytes * SEC / bytes_per_sec;
    id
}
fn out_byte_limit(mut id: Identity, bytes_per_sec: u64, burst_bytes: u64) -> Identity {
    id.out_byte_cost = (SEC << BYTE_COST_SHIFT) / bytes_per_sec;
    id.out_burst_ns = burst_bytes * SEC / bytes_per_sec;
    id
}

/// What a packet should do, as verdict plus counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// XDP_PASS without touching any counter (not ours to judge).
    Untouched,
    /// XDP_PASS to a protected service: `Passed` + 1.
    Passed,
    /// Knock datagram handed to the agent: `KnockPassed` + 1.
    Knock,
    /// XDP_DROP with this reason + 1.
    Drop(Reason),
}

type Counts = [u64; Reason::COUNT as usize];

fn describe(delta: &Counts) -> String {
    let moved: Vec<String> = Reason::ALL
        .iter()
        .filter(|r| delta[**r as usize] != 0)
        .map(|r| format!("{}+{}", r.name(), delta[*r as usize]))
        .collect();
    if moved.is_empty() {
        "no counter".into()
    } else {
        moved.join(", ")
    }
}

/// Pins the test thread to the CPU it runs on: knock and event budgets are
/// per CPU, and test runs execute on the calling CPU.
fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on a zeroed cpu_set_t owned by this frame.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

struct Fx {
    k: Unattached,
    slot: u32,
}

impl Fx {
    /// Fresh object; TCP service on 8000, UDP service on 8001, one identity
    /// without limits; nothing admitted.
    fn new() -> Fx {
        Fx::with_identity(unlimited())
    }

    fn with_identity(ident: Identity) -> Fx {
        pin_to_current_cpu();
        let mut k = Unattached::load().expect("load the eBPF object (root needed)");
        k.maps.sync_services(&default_services(), 0).unwrap();
        let (slot, _epoch) = k.maps.upsert_identity(ident, "test").unwrap();
        Fx { k, slot }
    }

    fn config(&mut self, cfg: KernelConfig) {
        self.k.maps.set_kernel_config(cfg).unwrap();
    }

    fn admit_until(
        &mut self,
        src: impl Into<IpAddr>,
        service: u32,
        src_port: u16,
        expires_ns: u64,
    ) {
        let slot = self.slot;
        self.k
            .maps
            .admit(slot, src.into(), service, src_port, expires_ns)
            .unwrap();
    }

    /// Admits for a minute.
    fn admit(&mut self, src: impl Into<IpAddr>, service: u32, src_port: u16) {
        self.admit_until(src, service, src_port, monotonic_ns() + 60 * SEC);
    }

    fn counts(&self) -> Counts {
        self.k.maps.reason_counts().unwrap()
    }

    fn xdp_raw(&self, frame: &[u8]) -> u32 {
        self.k
            .xdp(programs::INGRESS)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .expect("XDP test run")
            .return_value
    }

    fn tc_raw(&self, frame: &[u8]) -> u32 {
        self.k
            .tc(programs::EGRESS)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..Default::default()
            })
            .expect("TC test run")
            .return_value
    }

    /// Runs the XDP program on `frame` and checks the verdict and that
    /// exactly the expected counter moved, by exactly one.
    fn expect_frame(&self, what: &str, frame: &[u8], outcome: Outcome) {
        let before = self.counts();
        let verdict = self.xdp_raw(frame);
        let after = self.counts();
        let delta = delta(&before, &after);
        let mut want = [0u64; Reason::COUNT as usize];
        let want_verdict = match outcome {
            Outcome::Untouched => XDP_PASS,
            Outcome::Passed => {
                want[Reason::Passed as usize] = 1;
                XDP_PASS
            }
            Outcome::Knock => {
                want[Reason::KnockPassed as usize] = 1;
                XDP_PASS
            }
            Outcome::Drop(r) => {
                want[r as usize] = 1;
                XDP_DROP
            }
        };
        assert_eq!(
            (verdict, describe(&delta)),
            (want_verdict, describe(&want)),
            "{what}: expected {outcome:?} ({} bytes)",
            frame.len()
        );
    }

    fn expect(&self, what: &str, pkt: &Packet, outcome: Outcome) {
        self.expect_frame(what, &pkt.build(), outcome);
    }

    fn flows(&self) -> usize {
        self.k.maps.flow_count()
    }

    fn admissions(&self) -> usize {
        self.k.maps.admissions().len()
    }

    fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.k.maps.flows.get(key, 0).ok()
    }
}

fn flow_key(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    sport: u16,
    dport: u16,
    proto: u8,
) -> FlowKey {
    FlowKey {
        src: addr_bytes(src.into()),
        dst: addr_bytes(dst.into()),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

fn syn4(src: [u8; 4], sport: u16) -> Packet {
    Packet::tcp4(src, SERVER4, sport, TCP_PORT).syn()
}
fn ack4(src: [u8; 4], sport: u16) -> Packet {
    Packet::tcp4(src, SERVER4, sport, TCP_PORT).ack()
}

// ---------------------------------------------------------------------------
// Traffic that is not ours to judge

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

fn delta(before: &Counts, after: &Counts) -> Counts {
    let mut d = [0u64; Reason::COUNT as usize];
    for i in 0..d.len() {
        d[i] = after[i] - before[i];
    }
    d
}

// ---------------------------------------------------------------------------
// Protected TCP service: default deny, admissions, flows

#[test]
fn syn_from_unknown_source_is_dropped() {
    let fx = Fx::new();
    let nope = Outcome::Drop(Reason::NoAdmission);
    fx.expect("v4", &syn4(STRANGER4, 40000), nope);
    fx.expect("v4 802.1Q", &syn4(STRANGER4, 40000).vlan(10), nope);
    fx.expect("v4 QinQ", &syn4(STRANGER4, 40000).qinq(100, 10), nope);
    fx.expect(
        "v6",
        &Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT).syn(),
        nope,
    );
    fx.expect(
        "v6 QinQ",
        &Packet::tcp6(stranger6(), server6(), 40000, TCP_PORT)
            .syn()
            .qinq(1, 2),
        nope,
    );
    fx.expect(
        "udp v4",
        &Packet::udp4(STRANGER4, SERVER4, 5000, UDP_PORT),
        nope,
    );
    fx.expect(
        "udp v6",
        &Packet::udp6(stranger6(), server6(), 5000, UDP_PORT),
        nope,
    );
    assert_eq!(fx.flows(), 0);
    assert_eq!(
        fx.k.maps.identity_stats(fx.slot).unwrap().dropped,
        0,
        "no identity to charge"
    );
}

#[test]
fn non_syn_from_unknown_source_is_dropped() {
    let fx = Fx::new();
    // Segments that could continue a connection need an admission...
    for (name, flags) in [
        ("ACK", TCP_ACK),
        ("PSH-ACK", TCP_PSH | TCP_ACK),
        ("FIN-ACK", TCP_FIN | TCP_ACK),
    ] {
        let p = Packet::tcp4(STRANGER4, SERVER4, 40000, TCP_PORT).flags(flags);
        fx.expect(name, &p, Outcome::Drop(Reason::NoAdmission));
    }
    // ... the rest can neither open nor continue one: dropped before any
    // admission lookup.
    for (name, flags) in [
        ("SYN-ACK", TCP_SYN | TCP_ACK),
        ("RST", TCP_RST),
        ("no flags", 0),
    ] {
        let p = Packet::tcp4(STRANGER4, SERVER4, 40000, TCP_PORT).flags(flags);
        fx.expect(name, &p, Outcome::Drop(Reason::BadFlags));
    }
    assert_eq!(fx.flows(), 0);
}

const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

/// Only a clean SYN opens a flow (RFC 9293 §3.5), and only an
/// acknowledging segment may re-create an evicted one; whatever else an
/// admitted source sends without a flow leaves no state behind.
#[test]
fn only_a_clean_syn_opens_a_flow() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(client6(), TCP_SVC, 0);
    let bad = [
        ("SYN+RST", TCP_SYN | TCP_RST),
        ("SYN+FIN", TCP_SYN | TCP_FIN),
        ("SYN+ACK", TCP_SYN | TCP_ACK),
        ("SYN+FIN+ACK", TCP_SYN | TCP_FIN | TCP_ACK),
        ("RST", TCP_RST),
        ("RST+ACK", TCP_RST | TCP_ACK),
        ("FIN", TCP_FIN),
        ("null", 0),
        ("Xmas (FIN+PSH+URG)", TCP_FIN | TCP_PSH | TCP_URG),
        ("all flags", 0xff),
        ("PSH only", TCP_PSH),
    ];
    for (i, (name, flags)) in bad.iter().enumerate() {
        let port = 41000 + i as u16;
        let p4 = Packet::tcp4(CLIENT4, SERVER4, port, TCP_PORT).flags(*flags);
        fx.expect(&format!("v4 {name}"), &p4, Outcome::Drop(Reason::BadFlags));
        let p6 = Packet::tcp6(client6(), server6(), port, TCP_PORT).flags(*flags);
        fx.expect(&format!("v6 {name}"), &p6, Outcome::Drop(Reason::BadFlags));
    }
    assert_eq!(fx.flows(), 0, "no bad-flag segment created a flow");
    // A clean SYN, ECN-setup flags allowed, opens one.
    let syn = syn4(CLIENT4, 42000).flags(TCP_SYN | TCP_ECE | TCP_CWR);
    fx.expect("ECN-setup SYN", &syn, Outcome::Passed);
    assert_eq!(fx.flows(), 1);
    // Inside an existing flow, every flag combination is the endpoints'
    // business: unaffected.
    for (name, flags) in bad.iter().filter(|(_, f)| f & TCP_SYN == 0) {
        let p = Packet::tcp4(CLIENT4, SERVER4, 42000, TCP_PORT).flags(*flags);
        fx.expect(&format!("in-flow {name}"), &p, Outcome::Passed);
    }
    // An acknowledging segment without a flow (the LRU evicted it)
    // re-creates it from the admission.
    fx.expect("evicted flow's ACK", &ack4(CLIENT4, 43000), Outcome::Passed);
    fx.expect(
        "evicted flow's FIN+ACK",
        &Packet::tcp4(CLIENT4, SERVER4, 43001, TCP_PORT).flags(TCP_FIN | TCP_ACK),
        Outcome::Passed,
    );
    assert_eq!(fx.flows(), 3);
}

/// Below the limit a retransmitted SYN is counted again (looking it up
/// would cost every SYN a lookup): the count errs high, and the agent's
/// recount puts it right; idle flows leave the count and the table.
#[test]
fn flow_counts_err_high_and_the_recount_corrects_them() {
    let mut ident = unlimited();
    ident.max_flows = 10;
    let mut fx = Fx::with_identity(ident);
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    let count = |fx: &Fx| fx.k.maps.flow_counts().unwrap()[fx.slot as usize];
    fx.expect("SYN", &syn4(CLIENT4, 40001), Outcome::Passed);
    fx.expect("retransmitted SYN", &syn4(CLIENT4, 40001), Outcome::Passed);
    assert_eq!((fx.flows(), count(&fx)), (1, 2));
    let census = fx.k.maps.recount_flows(monotonic_ns()).unwrap();
    assert_eq!((census.live, census.removed), (1, 0));
    assert_eq!(count(&fx), 1);
    // Thirty seconds without a packet: idle, removed, uncounted.
    let later = monotonic_ns() + 40 * SEC;
    let census = fx.k.maps.recount_flows(later).unwrap();
    assert_eq!((census.live, census.removed), (0, 1));
    assert_eq!((fx.flows(), count(&fx)), (0, 0));
    // Its next segment re-creates the flow from the admission.
    fx.expect(
        "the idle connection's next ACK",
        &ack4(CLIENT4, 40001),
        Outcome::Passed,
    );
    assert_eq!((fx.flows(), count(&fx)), (1, 1));
}

/// `Identity::max_flows`: the kernel counts flows per identity and refuses
/// new ones at the limit; a retransmitted SYN of a flow it has, packets of
/// existing flows and other identities are unaffected.
#[test]
fn flow_quota_per_identity() {
    let mut ident = unlimited();
    ident.max_flows = 2;
    let mut fx = Fx::with_identity(ident);
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(ip4(CLIENT4), UDP_SVC, 0);
    let count = |fx: &Fx| fx.k.maps.flow_counts().unwrap()[fx.slot as usize];
    fx.expect("first flow", &syn4(CLIENT4, 40001), Outcome::Passed);
    fx.expect("second flow", &syn4(CLIENT4, 40002), Outcome::Passed);
    assert_eq!(count(&fx), 2);
    fx.expect(
        "third flow",
        &syn4(CLIENT4, 40003),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "third flow, UDP",
        &Packet::udp4(CLIENT4, SERVER4, 5000, UDP_PORT),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "third flow, re-created by an ACK",
        &ack4(CLIENT4, 40004),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "retransmitted SYN of the second flow",
        &syn4(CLIENT4, 40002),
        Outcome::Passed,
    );
    fx.expect("second flow's data", &ack4(CLIENT4, 40002), Outcome::Passed);
    assert_eq!(count(&fx), 2, "a retransmission is not a new flow");
    assert_eq!(fx.flows(), 2);
    assert_eq!(fx.k.maps.identity_stats(fx.slot).unwrap().dropped, 3);
    // Another identity has its own quota.
    let mut other = unlimited();
    other.key = 0xbeef;
    other.max_flows = 1;
    let (slot2, _) = fx.k.maps.upsert_identity(other, "other").unwrap();
    fx.k.maps
        .admit(
            slot2,
            client6().into(),
            TCP_SVC,
            0,
            monotonic_ns() + 60 * SEC,
        )
        .unwrap();
    let syn6 = |port| Packet::tcp6(client6(), server6(), port, TCP_PORT).syn();
    fx.expect("other identity", &syn6(40001), Outcome::Passed);
    fx.expect(
        "other identity over its quota",
        &syn6(40002),
        Outcome::Drop(Reason::FlowQuota),
    );
    fx.expect(
        "other identity's retransmitted SYN at its limit",
        &syn6(40001),
        Outcome::Passed,
    );
    // The agent's recount (flows the LRU evicted or that ended) frees room.
    fx.k.maps.remove_flows_of(fx.slot).unwrap();
    fx.k.maps.recount_flows(monotonic_ns()).unwrap();
    assert_eq!(count(&fx), 0);
    fx.expect("room again", &syn4(CLIENT4, 40003), Outcome::Passed);
}

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
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(client6(), UDP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    fx.expect(
        "UDP v6",
        &Packet::udp6(client6(), server6(), 5000, UDP_PORT),
        Outcome::Passed,
    );
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
        },
        ServiceEntry {
            id: 3,
            proto: PROTO_TCP,
            port: TCP_PORT,
            addr: Some(IpAddr::V6(server6())),
        },
        // 9000: service 4 on 10.0.0.1, wildcard service 5 elsewhere.
        ServiceEntry {
            id: 4,
            proto: PROTO_TCP,
            port: 9000,
            addr: Some(ip4(SERVER4)),
        },
        ServiceEntry {
            id: 5,
            proto: PROTO_TCP,
            port: 9000,
            addr: None,
        },
        // UDP 8001 on 10.0.0.1 only.
        ServiceEntry {
            id: 6,
            proto: PROTO_UDP,
            port: UDP_PORT,
            addr: Some(ip4(SERVER4)),
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

// ---------------------------------------------------------------------------
// Rates

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

// ---------------------------------------------------------------------------
// Malformed packets

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

// ---------------------------------------------------------------------------
// Fragments

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

// ---------------------------------------------------------------------------
// Knock pre-auth limits

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

// ---------------------------------------------------------------------------
// Floods and events

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
    let mut want = [0u64; Reason::COUNT as usize];
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

// ---------------------------------------------------------------------------
// TC egress

fn response4(dst: [u8; 4], dport: u16, len: usize) -> Vec<u8> {
    Packet::tcp4(SERVER4, dst, TCP_PORT, dport)
        .ack()
        .frame_len(len)
        .build()
}

#[test]
fn egress_counts_responses_of_admitted_flows() {
    let mut fx = Fx::new();
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(client6(), UDP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    fx.expect(
        "UDP v6",
        &Packet::udp6(client6(), server6(), 5000, UDP_PORT),
        Outcome::Passed,
    );
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
    let mut want = [0u64; Reason::COUNT as usize];
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

// ---------------------------------------------------------------------------
// Usage per (identity, service)

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
