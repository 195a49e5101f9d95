//! Decoding a knock never allocates much more than the datagram, whatever
//! length prefixes it claims: measured with a counting allocator.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::atomic::{AtomicUsize, Ordering},
};

use portcullis_knock::{KnockLimits, decode};
use portcullis_proto::v1;
use prost::Message as _;

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
}
static TOTAL: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if TRACK.with(Cell::get) {
        TOTAL.fetch_add(size, Ordering::Relaxed);
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// (total bytes requested, largest single request) while decoding `d`.
fn measure(d: &[u8]) -> (usize, usize, &'static str) {
    let limits = KnockLimits::default();
    TOTAL.store(0, Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
    TRACK.with(|t| t.set(true));
    let r = decode(d, &limits);
    TRACK.with(|t| t.set(false));
    let reason = match &r {
        Ok(_) => "ok",
        Err(e) => e.reason(),
    };
    drop(r);
    (
        TOTAL.load(Ordering::Relaxed),
        LARGEST.load(Ordering::Relaxed),
        reason,
    )
}

// One test function: the counters are global and tests run in parallel.
#[test]
fn decode_allocation_is_bounded_by_the_datagram() {
    // The outer `body` field claims 2^62 bytes.
    let mut d = vec![0x0a];
    prost::encoding::encode_varint(1 << 62, &mut d);
    d.resize(64, b'A');
    let (total, largest, reason) = measure(&d);
    assert_eq!(reason, "bad_protobuf");
    assert!(total <= 1024, "total {total}");
    assert!(largest <= 256, "largest {largest}");

    // A well-formed envelope whose body's `token` claims 4 GiB, and whose
    // `nonce` claims 2^40 bytes.
    for (tag, claim) in [(0x12u8, u32::MAX as u64), (0x2a, 1 << 40)] {
        let mut inner = vec![0x08, 0x01, tag];
        prost::encoding::encode_varint(claim, &mut inner);
        inner.resize(3000, b'a');
        let d = v1::Knock {
            body: inner,
            ..Default::default()
        }
        .encode_to_vec();
        let (total, largest, reason) = measure(&d);
        assert_eq!(reason, "bad_protobuf");
        assert!(total <= 4 * d.len(), "total {total} for {} bytes", d.len());
        assert!(largest <= d.len(), "largest {largest}");
    }

    // The same claims in `pop_key` and `pop_signature` of the envelope.
    for tag in [0x12u8, 0x1a] {
        let mut d = v1::Knock {
            body: vec![0x08, 0x01],
            ..Default::default()
        }
        .encode_to_vec();
        d.push(tag);
        prost::encoding::encode_varint(1 << 33, &mut d);
        d.resize(4000, 0);
        let (total, largest, reason) = measure(&d);
        assert_eq!(reason, "bad_protobuf");
        assert!(total <= 4 * d.len(), "total {total}");
        assert!(largest <= d.len(), "largest {largest}");
    }

    // Oversized datagrams are refused before anything is allocated.
    let big = vec![0x0a; 1 << 20];
    let (total, _, reason) = measure(&big);
    assert_eq!(reason, "too_long");
    assert_eq!(total, 0);

    // A valid knock at the size limit costs about two copies of itself.
    let body = v1::KnockBody {
        version: 1,
        token: "t".repeat(3900),
        service: "llm".into(),
        timestamp_unix_ms: 1,
        nonce: vec![1; 16],
        client_addr: vec![],
        source_port: 0,
    };
    let d = v1::Knock {
        body: body.encode_to_vec(),
        pop_key: vec![b'k'; 64],
        pop_signature: vec![b's'; 64],
    }
    .encode_to_vec();
    let (total, largest, reason) = measure(&d);
    assert_eq!(reason, "ok");
    // (The counter works: the body alone is copied once.)
    assert!(total >= d.len() / 2, "total {total}");
    assert!(total <= 3 * d.len(), "total {total} for {} bytes", d.len());
    assert!(largest <= d.len(), "largest {largest}");
}
