//! The knock datagram and its reply (`portcullis.v1.Knock`,
//! `proto/portcullis/v1/knock.proto`): decoding and bounds ([`decode`]),
//! freshness ([`check_fresh`]), what the proof of possession and the reply
//! sign, and the signed reply ([`reply`]). The node agent checks the rest,
//! in this order: [`decode`], [`check_fresh`], the nonce (replay), the
//! token, the proof of possession against its `cnf`, scope and policy,
//! then the admission and [`reply`] (only on success; silence otherwise).
//!
//! Every refusal is a [`KnockError`] whose [`KnockError::reason`] is a stable
//! snake_case label for counters and events ([`KnockRefusals`] counts them).
//! Nothing here allocates more than a small multiple of the datagram size.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use portcullis_proto::v1;
use portcullis_trail::{node_key::NodeKey, time};
use prost::Message as _;

/// The only knock (and reply) wire version this agent speaks.
pub const KNOCK_VERSION: u32 = 1;
/// The default UDP port of the knock listener.
pub const DEFAULT_KNOCK_PORT: u16 = 62201;
/// Domain separation for the proof-of-possession signature.
pub const POP_CONTEXT: &[u8] = b"portcullis-knock-v1\0";
/// Domain separation for the node's reply signature.
pub const REPLY_CONTEXT: &[u8] = b"portcullis-knock-reply-v1\0";
/// Below this a datagram cannot be a knock: version (2) + nonce (18) +
/// service (>= 3) + token (>= 3) + a current timestamp (7) + the body's
/// framing (2) is 35 bytes already.
pub const MIN_DATAGRAM: usize = 32;
/// Longest accepted token (bytes).
pub const MAX_TOKEN: usize = 8192;
/// Longest accepted service name (characters, `[a-z0-9_-]`).
pub const MAX_SERVICE: usize = 64;
/// Longest accepted proof-of-possession signature (bytes).
pub const MAX_POP_SIGNATURE: usize = 512;
/// Longest accepted proof-of-possession key, JWK JSON (bytes).
pub const MAX_POP_KEY: usize = 2048;

/// Bounds on what the knock listener accepts and remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockLimits {
    /// Largest datagram that is decoded at all (bytes). Default 4096.
    pub max_datagram: usize,
    /// Freshness window, both into the past and into the future. Default 30 s.
    pub window: Duration,
    /// Most nonces remembered at once; beyond that new knocks are refused
    /// (`nonce_cache_full`). Default 2^20.
    pub max_nonces: usize,
}

impl Default for KnockLimits {
    fn default() -> Self {
        KnockLimits {
            max_datagram: 4096,
            window: Duration::from_secs(30),
            max_nonces: 1 << 20,
        }
    }
}

/// A decoded, bounds-checked knock. Nothing in it is verified yet beyond
/// its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knock {
    /// The access token (compact JWT), not yet verified.
    pub token: String,
    /// The service asked for (`[a-z0-9_-]{1,64}`).
    pub service: String,
    /// The client's clock when it built the knock.
    pub timestamp: SystemTime,
    /// The knock's random nonce.
    pub nonce: [u8; 16],
    /// The address the client claims to connect from (NAT), if any.
    /// IPv4-mapped IPv6 addresses are returned as IPv4.
    pub client_addr: Option<IpAddr>,
    /// Flow scope: the one TCP source port the admission covers; 0 = any.
    pub source_port: u16,
    /// The proof-of-possession key, JWK JSON, if sent.
    pub pop_key: Option<Vec<u8>>,
    /// The proof-of-possession signature over
    /// [`pop_signing_input`]`(&body)`, if sent.
    pub pop_signature: Option<Vec<u8>>,
    /// The encoded `KnockBody` exactly as sent: the signed bytes.
    pub body: Vec<u8>,
}

/// Why a knock was refused. [`reason`](KnockError::reason) is the stable
/// label for counters and audit events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnockError {
    #[error("datagram too short ({len} bytes, minimum {MIN_DATAGRAM})")]
    TooShort { len: usize },
    #[error("datagram too long ({len} bytes, maximum {max})")]
    TooLong { len: usize, max: usize },
    #[error("not a valid knock protobuf: {0}")]
    BadProtobuf(prost::DecodeError),
    #[error("unsupported knock version {0} (this agent speaks {KNOCK_VERSION})")]
    BadVersion(u32),
    #[error("nonce must be 16 bytes, got {0}")]
    BadNonce(usize),
    #[error("client address must be empty, 4 or 16 bytes of a unicast address")]
    BadClientAddr,
    #[error("source port {0} is out of range")]
    BadSourcePort(u32),
    #[error("service name must be 1 to {MAX_SERVICE} characters of [a-z0-9_-]")]
    BadService,
    #[error("no token in the knock")]
    TokenMissing,
    #[error("token too long ({0} bytes, maximum {MAX_TOKEN})")]
    TokenTooLong(usize),
    #[error("proof-of-possession key too long ({0} bytes, maximum {MAX_POP_KEY})")]
    PopKeyTooLong(usize),
    #[error("proof-of-possession signature too long ({0} bytes, maximum {MAX_POP_SIGNATURE})")]
    PopSignatureTooLong(usize),
    #[error("timestamp is older than the freshness window")]
    Stale,
    #[error("timestamp is further in the future than the freshness window")]
    FromFuture,
    #[error("nonce already seen within the freshness window")]
    ReplayedNonce,
    #[error("nonce cache is full; refusing new knocks until nonces expire")]
    NonceCacheFull,
    #[error("proof of possession required but missing")]
    PopMissing,
    #[error("proof-of-possession key is not a usable EdDSA or ES256 JWK")]
    PopKeyInvalid,
    #[error("proof-of-possession key does not match the token's cnf claim")]
    PopKeyMismatch,
    #[error("proof-of-possession signature does not verify")]
    PopInvalid,
    #[error("a client address was claimed but the token is not bound to a key (no cnf)")]
    PopUnbound,
}

impl KnockError {
    /// Every reason label, in [`index`](KnockError::index) order.
    pub const REASONS: [&'static str; 21] = [
        "too_short",
        "too_long",
        "bad_protobuf",
        "bad_version",
        "bad_nonce",
        "bad_client_addr",
        "bad_source_port",
        "bad_service",
        "token_missing",
        "token_too_long",
        "pop_key_too_long",
        "pop_signature_too_long",
        "stale",
        "from_future",
        "replayed_nonce",
        "nonce_cache_full",
        "pop_missing",
        "pop_key_invalid",
        "pop_key_mismatch",
        "pop_invalid",
        "pop_unbound",
    ];

    /// Position of this error's reason in [`REASONS`](KnockError::REASONS).
    pub fn index(&self) -> usize {
        use KnockError::*;
        match self {
            TooShort { .. } => 0,
            TooLong { .. } => 1,
            BadProtobuf(_) => 2,
            BadVersion(_) => 3,
            BadNonce(_) => 4,
            BadClientAddr => 5,
            BadSourcePort(_) => 6,
            BadService => 7,
            TokenMissing => 8,
            TokenTooLong(_) => 9,
            PopKeyTooLong(_) => 10,
            PopSignatureTooLong(_) => 11,
            Stale => 12,
            FromFuture => 13,
            ReplayedNonce => 14,
            NonceCacheFull => 15,
            PopMissing => 16,
            PopKeyInvalid => 17,
            PopKeyMismatch => 18,
            PopInvalid => 19,
            PopUnbound => 20,
        }
    }

    /// Stable snake_case label (`too_short`, `stale`, `replayed_nonce`, ...).
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.index()]
    }
}

/// Refusal counters, one per [`KnockError::reason`]; lock-free.
#[derive(Debug, Default)]
pub struct KnockRefusals {
    counts: [AtomicU64; KnockError::REASONS.len()],
}

impl KnockRefusals {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one refusal.
    pub fn record(&self, err: &KnockError) {
        self.counts[err.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// The count for one reason label (0 for unknown labels).
    pub fn get(&self, reason: &str) -> u64 {
        KnockError::REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    /// `(reason, count)` for every reason (zeros included).
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        KnockError::REASONS
            .iter()
            .zip(&self.counts)
            .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Decodes and bounds-checks one datagram. Checks, in order: size (before
/// anything is parsed), the `Knock` envelope, the `KnockBody`, then each
/// field. Allocation is bounded by the datagram: prost refuses any length
/// prefix larger than what remains of the buffer.
pub fn decode(datagram: &[u8], limits: &KnockLimits) -> Result<Knock, KnockError> {
    let len = datagram.len();
    if len < MIN_DATAGRAM {
        return Err(KnockError::TooShort { len });
    }
    if len > limits.max_datagram {
        return Err(KnockError::TooLong {
            len,
            max: limits.max_datagram,
        });
    }
    let envelope = v1::Knock::decode(datagram).map_err(KnockError::BadProtobuf)?;
    let body = v1::KnockBody::decode(envelope.body.as_slice()).map_err(KnockError::BadProtobuf)?;
    if body.version != KNOCK_VERSION {
        return Err(KnockError::BadVersion(body.version));
    }
    let nonce: [u8; 16] = body
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| KnockError::BadNonce(body.nonce.len()))?;
    let client_addr = parse_client_addr(&body.client_addr)?;
    let source_port =
        u16::try_from(body.source_port).map_err(|_| KnockError::BadSourcePort(body.source_port))?;
    if !valid_service(&body.service) {
        return Err(KnockError::BadService);
    }
    if body.token.is_empty() {
        return Err(KnockError::TokenMissing);
    }
    if body.token.len() > MAX_TOKEN {
        return Err(KnockError::TokenTooLong(body.token.len()));
    }
    if envelope.pop_key.len() > MAX_POP_KEY {
        return Err(KnockError::PopKeyTooLong(envelope.pop_key.len()));
    }
    if envelope.pop_signature.len() > MAX_POP_SIGNATURE {
        return Err(KnockError::PopSignatureTooLong(
            envelope.pop_signature.len(),
        ));
    }
    // A key without a signature proves nothing (and is what a knock cut
    // short after its key looks like). A signature without a key is allowed:
    // the token's `cnf.jwk` may carry the key.
    if !envelope.pop_key.is_empty() && envelope.pop_signature.is_empty() {
        return Err(KnockError::PopMissing);
    }
    let timestamp = time::from_unix_ms(body.timestamp_unix_ms);
    let non_empty = |v: Vec<u8>| (!v.is_empty()).then_some(v);
    Ok(Knock {
        token: body.token,
        service: body.service,
        timestamp,
        nonce,
        client_addr,
        source_port,
        pop_key: non_empty(envelope.pop_key),
        pop_signature: non_empty(envelope.pop_signature),
        body: envelope.body,
    })
}

/// `[a-z0-9_-]{1,64}`.
pub fn valid_service(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SERVICE
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn parse_client_addr(b: &[u8]) -> Result<Option<IpAddr>, KnockError> {
    let ip = match b.len() {
        0 => return Ok(None),
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap_or_default())),
        16 => {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap_or_default())).to_canonical()
        }
        _ => return Err(KnockError::BadClientAddr),
    };
    // No TCP connection comes from these; claiming one is a malformed knock.
    let bogus = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if bogus {
        return Err(KnockError::BadClientAddr);
    }
    Ok(Some(ip))
}

/// Encodes an address for `KnockBody.client_addr` (4 or 16 bytes).
pub fn client_addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Refuses a timestamp more than `window` before (`stale`) or after
/// (`from_future`) `now`. Exactly `window` away is still fresh.
pub fn check_fresh(ts: SystemTime, now: SystemTime, window: Duration) -> Result<(), KnockError> {
    match now.duration_since(ts) {
        Ok(age) if age > window => Err(KnockError::Stale),
        Ok(_) => Ok(()),
        Err(ahead) if ahead.duration() > window => Err(KnockError::FromFuture),
        Err(_) => Ok(()),
    }
}

/// What the proof-of-possession key signs: `"portcullis-knock-v1\0" || body`.
pub fn pop_signing_input(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(POP_CONTEXT.len() + body.len());
    v.extend_from_slice(POP_CONTEXT);
    v.extend_from_slice(body);
    v
}

/// What the node key signs in a reply: `"portcullis-knock-reply-v1\0" || body`.
pub fn reply_signing_input(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(REPLY_CONTEXT.len() + body.len());
    v.extend_from_slice(REPLY_CONTEXT);
    v.extend_from_slice(body);
    v
}

/// The signed reply to an admitted knock, or `None` when it would be larger
/// than the request (`request_len`, the knock datagram's size): a reply
/// never amplifies.
pub fn reply(
    node: &NodeKey,
    knock: &Knock,
    service: &str,
    expires: SystemTime,
    request_len: usize,
) -> Option<Vec<u8>> {
    reply_to(node, &knock.nonce, service, expires, request_len)
}

/// [`reply`] from the knock's nonce alone.
pub fn reply_to(
    node: &NodeKey,
    nonce: &[u8; 16],
    service: &str,
    expires: SystemTime,
    request_len: usize,
) -> Option<Vec<u8>> {
    let body = v1::KnockReplyBody {
        version: KNOCK_VERSION,
        nonce: nonce.to_vec(),
        expires_unix_ms: time::unix_ms(expires),
        service: service.to_owned(),
    }
    .encode_to_vec();
    // Cheap bound before signing: the reply is body + signature + framing.
    if body.len() + 64 + 4 > request_len {
        return None;
    }
    let signature = node.sign(&reply_signing_input(&body)).to_vec();
    let out = v1::KnockReply { body, signature }.encode_to_vec();
    (out.len() <= request_len).then_some(out)
}

#[cfg(test)]
mod tests;
