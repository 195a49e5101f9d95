//! The embedded eBPF object and its identity.

use std::sync::OnceLock;

use portcullis_common::LAYOUT_VERSION;

/// The object `agent/build.rs` builds from `ebpf/` (nightly, bpf-linker,
/// BTF): the `portcullis-ebpf` binary of that crate.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis-ebpf"));

/// SHA-256 of the object: a restarted agent adopts pinned programs only when
/// they were loaded from exactly this object.
pub fn object_hash() -> [u8; 32] {
    static HASH: OnceLock<[u8; 32]> = OnceLock::new();
    *HASH.get_or_init(|| {
        let d = ring::digest::digest(&ring::digest::SHA256, OBJECT);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    })
}

pub fn meta() -> portcullis_common::Meta {
    portcullis_common::Meta {
        layout_version: LAYOUT_VERSION,
        identity_gen: 0,
        object_hash: object_hash(),
    }
}
