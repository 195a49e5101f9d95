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
use portcullis_agent::loader::{ServiceEntry, Unattached, clock::monotonic_ns, maps::addr_bytes};
use portcullis_common::{
    BYTE_COST_SHIFT, FAMILY_V4, FAMILY_V6, Flow, FlowKey, IDENTITY_REVOKED, Identity, KernelConfig,
    PROTO_TCP, PROTO_UDP, Reason, SHADOW_COUNTERS, programs,
};
use portcullis_testkit::packet::{
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
            shadow: false,
        },
        ServiceEntry {
            id: UDP_SVC,
            proto: PROTO_UDP,
            port: UDP_PORT,
            addr: None,
            shadow: false,
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
    /// A shadow-mode service: XDP_PASS, and this reason's shadow counter
    /// + 1 (what enforcing would have dropped).
    Shadow(Reason),
}

type Counts = [u64; portcullis_common::DROP_COUNTERS as usize];

fn describe(delta: &Counts) -> String {
    let moved: Vec<String> = delta
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 0)
        .map(|(i, n)| {
            let r = Reason::from_u32(i as u32 % SHADOW_COUNTERS).expect("a reason");
            let mark = if i as u32 >= SHADOW_COUNTERS {
                "shadow_"
            } else {
                ""
            };
            format!("{mark}{}+{n}", r.name())
        })
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
    portcullis_testkit::pin_to_current_cpu().expect("pin the test thread to its CPU");
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
        let mut want = [0u64; portcullis_common::DROP_COUNTERS as usize];
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
            Outcome::Shadow(r) => {
                want[(SHADOW_COUNTERS + r as u32) as usize] = 1;
                XDP_PASS
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

fn delta(before: &Counts, after: &Counts) -> Counts {
    let mut d = [0u64; portcullis_common::DROP_COUNTERS as usize];
    for i in 0..d.len() {
        d[i] = after[i] - before[i];
    }
    d
}

fn response4(dst: [u8; 4], dport: u16, len: usize) -> Vec<u8> {
    Packet::tcp4(SERVER4, dst, TCP_PORT, dport)
        .ack()
        .frame_len(len)
        .build()
}

/// The client admitted to both services, with a TCP flow over IPv4 and a
/// UDP flow over IPv6 open.
fn open_tcp4_and_udp6(fx: &mut Fx) {
    fx.admit(ip4(CLIENT4), TCP_SVC, 0);
    fx.admit(client6(), UDP_SVC, 0);
    fx.expect("SYN", &syn4(CLIENT4, 40000), Outcome::Passed);
    fx.expect(
        "UDP v6",
        &Packet::udp6(client6(), server6(), 5000, UDP_PORT),
        Outcome::Passed,
    );
}

mod admissions;
mod default_deny;
mod egress;
mod floods;
mod fragments;
mod knock_limits;
mod malformed;
mod passthrough;
mod rates;
mod shadow;
mod usage;
