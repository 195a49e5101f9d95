//! Numbers derived from names with FNV-1a. Kernel maps carry numbers, and a
//! restarted agent must derive the same numbers from the same names without
//! any stored state, so these must never change.

const FNV32_OFFSET: u32 = 0x811c_9dc5;
const FNV32_PRIME: u32 = 0x0100_0193;
const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 32 bits, over the UTF-8 bytes of `s`.
pub fn fnv1a32(s: &str) -> u32 {
    s.bytes().fold(FNV32_OFFSET, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(FNV32_PRIME)
    })
}

/// An identity's key (`Identity::key` in the kernel): FNV-1a, 64 bits, of its
/// name, so a restarted agent can map identity slots back to names.
pub fn identity_key(name: &str) -> u64 {
    name.bytes().fold(FNV64_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV64_PRIME)
    })
}

/// A service's id. Never 0, because 0 means "no service" in the kernel's port
/// table; 31 bits, so it stays positive wherever it is shown as a signed number.
pub fn service_id(name: &str) -> u32 {
    (fnv1a32(name) & 0x7fff_ffff) | 1
}
