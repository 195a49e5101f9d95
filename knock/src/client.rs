//! The knocking side: build a knock, send it, wait for the signed reply.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use portcullis_proto::v1;
use prost::Message as _;
use ring::{
    rand::{SecureRandom as _, SystemRandom},
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _},
};
use tokio::net::UdpSocket;

use crate::wire::{
    KNOCK_VERSION, KnockError, KnockLimits, client_addr_bytes, decode, pop_signing_input,
    reply_signing_input,
};
use portcullis_trail::{
    node_key::{NodeKey, ed25519_thumbprint, parse_ed25519_pkcs8},
    pem::pkcs8_der,
    time,
};

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Largest payload of one UDP datagram over IPv4.
const MAX_UDP_PAYLOAD: usize = 65_507;
/// Replies are ~100 bytes; anything that does not fit is not a reply.
const REPLY_BUF: usize = 2048;

/// A proof-of-possession signing key: Ed25519 (EdDSA) or P-256 (ES256),
/// loaded from an unencrypted PKCS#8 document (PEM or DER). Its public JWK
/// goes into the knock; its RFC 7638 [`thumbprint`](PopKey::thumbprint) is
/// what the token's `cnf.jkt` must hold.
#[derive(Clone)]
pub struct PopKey {
    inner: Arc<PopKeyInner>,
}

enum PopKeyInner {
    Ed25519(Ed25519KeyPair),
    P256(EcdsaKeyPair, SystemRandom),
}

impl fmt::Debug for PopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PopKey")
            .field("alg", &self.alg())
            .field("thumbprint", &self.thumbprint())
            .finish_non_exhaustive()
    }
}

impl PopKey {
    /// Parses an Ed25519 or P-256 PKCS#8 key, PEM (`PRIVATE KEY`) or DER.
    pub fn from_pkcs8(bytes: &[u8]) -> Result<PopKey, String> {
        if let Ok(pair) = parse_ed25519_pkcs8(bytes) {
            return Ok(Self::wrap(PopKeyInner::Ed25519(pair)));
        }
        let der = pkcs8_der(bytes)?;
        let rng = SystemRandom::new();
        match EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng) {
            Ok(pair) => Ok(Self::wrap(PopKeyInner::P256(pair, rng))),
            Err(_) => Err("not an unencrypted Ed25519 or P-256 PKCS#8 private key".into()),
        }
    }

    /// A fresh Ed25519 key and its PKCS#8 (v2, DER) document.
    pub fn generate_ed25519() -> Result<(PopKey, Vec<u8>), String> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "the system random generator failed".to_string())?;
        let key = Self::from_pkcs8(doc.as_ref())?;
        Ok((key, doc.as_ref().to_vec()))
    }

    /// A fresh P-256 key and its PKCS#8 (DER) document.
    pub fn generate_p256() -> Result<(PopKey, Vec<u8>), String> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| "the system random generator failed".to_string())?;
        let key = Self::from_pkcs8(doc.as_ref())?;
        Ok((key, doc.as_ref().to_vec()))
    }

    fn wrap(inner: PopKeyInner) -> PopKey {
        PopKey {
            inner: Arc::new(inner),
        }
    }

    /// The JOSE algorithm of the signatures: `EdDSA` or `ES256`.
    pub fn alg(&self) -> &'static str {
        match &*self.inner {
            PopKeyInner::Ed25519(_) => "EdDSA",
            PopKeyInner::P256(..) => "ES256",
        }
    }

    /// The public key as JWK JSON (with `alg`), as sent in `Knock.pop_key`.
    pub fn public_jwk_json(&self) -> String {
        match &*self.inner {
            PopKeyInner::Ed25519(pair) => format!(
                r#"{{"alg":"EdDSA","crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                B64URL.encode(pair.public_key().as_ref())
            ),
            PopKeyInner::P256(pair, _) => {
                let (x, y) = p256_xy(pair);
                format!(r#"{{"alg":"ES256","crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
        }
    }

    /// RFC 7638 JWK thumbprint (SHA-256, base64url): the value for the
    /// token's `cnf.jkt`.
    pub fn thumbprint(&self) -> String {
        match &*self.inner {
            PopKeyInner::Ed25519(pair) => {
                let mut pk = [0u8; 32];
                pk.copy_from_slice(pair.public_key().as_ref());
                ed25519_thumbprint(&pk)
            }
            PopKeyInner::P256(pair, _) => {
                let (x, y) = p256_xy(pair);
                let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
                B64URL.encode(ring::digest::digest(
                    &ring::digest::SHA256,
                    canonical.as_bytes(),
                ))
            }
        }
    }

    /// Signs `msg` (Ed25519, or ECDSA P-256 SHA-256 in the JOSE r||s form).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        match &*self.inner {
            PopKeyInner::Ed25519(pair) => Ok(pair.sign(msg).as_ref().to_vec()),
            PopKeyInner::P256(pair, rng) => pair
                .sign(rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ECDSA signing failed".to_string()),
        }
    }
}

fn p256_xy(pair: &EcdsaKeyPair) -> (String, String) {
    // Uncompressed SEC1 point: 0x04 || x (32) || y (32).
    let pk = pair.public_key().as_ref();
    (B64URL.encode(&pk[1..33]), B64URL.encode(&pk[33..65]))
}

/// What to knock with.
#[derive(Clone)]
pub struct KnockOptions {
    /// The agent's knock listener.
    pub server: SocketAddr,
    /// The access token (compact JWT).
    pub token: String,
    /// The service to be admitted to.
    pub service: String,
    /// Flow scope: admit only TCP connections from this source port; 0 = any.
    pub source_port: u16,
    /// The address the agent should admit instead of the datagram's source
    /// (clients behind NAT); requires `pop_key`.
    pub client_addr: Option<IpAddr>,
    /// Proof-of-possession key (the token's `cnf` key).
    pub pop_key: Option<PopKey>,
    /// The node's Ed25519 public key: when given, only replies signed by it
    /// count, and the outcome says `verified_reply`.
    pub node_public_key: Option<[u8; 32]>,
    /// How long to wait for a reply after each knock.
    pub timeout: Duration,
    /// How many more knocks to send (each with a new nonce and timestamp)
    /// when no reply came.
    pub retries: u32,
}

impl KnockOptions {
    /// Options with the defaults: no scope, no proof, 2 s timeout, 2 retries.
    pub fn new(server: SocketAddr, token: impl Into<String>, service: impl Into<String>) -> Self {
        KnockOptions {
            server,
            token: token.into(),
            service: service.into(),
            source_port: 0,
            client_addr: None,
            pop_key: None,
            node_public_key: None,
            timeout: Duration::from_secs(2),
            retries: 2,
        }
    }
}

impl fmt::Debug for KnockOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KnockOptions")
            .field("server", &self.server)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("service", &self.service)
            .field("source_port", &self.source_port)
            .field("client_addr", &self.client_addr)
            .field("pop_key", &self.pop_key)
            .field(
                "node_public_key",
                &self.node_public_key.map(|k| B64URL.encode(k)),
            )
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

/// An admission granted by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockOutcome {
    /// When the admission ends (the node's clock).
    pub expires_at: SystemTime,
    /// The service admitted to (as the agent names it).
    pub service: String,
    /// Whether the reply's signature was checked against
    /// [`KnockOptions::node_public_key`].
    pub verified_reply: bool,
}

/// Why knocking failed.
#[derive(Debug, thiserror::Error)]
pub enum KnockClientError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the knock is malformed and every agent would drop it: {0}")]
    InvalidKnock(KnockError),
    #[error("the knock is {0} bytes, more than fits in one UDP datagram")]
    TooLarge(usize),
    #[error("proof-of-possession signing failed: {0}")]
    Signing(String),
    #[error("the system random generator failed")]
    Random,
    #[error(
        "no reply from {server} within {} ({attempts} knock{}): the knock was refused \
         (the server stays silent on refusal), lost, or the port is wrong{}",
        fmt_secs(*.waited),
        if *.attempts == 1 { "" } else { "s" },
        size_note(*.knock_len)
    )]
    Timeout {
        server: SocketAddr,
        waited: Duration,
        attempts: u32,
        knock_len: usize,
    },
    #[error(
        "{server} answered ICMP port unreachable: nothing listens on that UDP port \
         (wrong --port, or the agent's knock listener is not running)"
    )]
    Unreachable { server: SocketAddr },
    #[error(
        "{server} replied, but the reply's signature does not verify with the given node \
         public key (wrong node key, or a forged reply)"
    )]
    BadReplySignature { server: SocketAddr },
}

fn size_note(knock_len: usize) -> String {
    let default_max = KnockLimits::default().max_datagram;
    if knock_len > default_max {
        format!(
            "; note: the knock was {knock_len} bytes and agents refuse knocks over \
             {default_max} bytes by default"
        )
    } else {
        String::new()
    }
}

fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Builds one knock datagram for `opts` with the given nonce and timestamp
/// (signed with the proof key when there is one), and checks it against the
/// same bounds the agent applies, so that a knock every agent would drop
/// fails here with a clear error instead of a timeout.
pub fn build_knock(
    opts: &KnockOptions,
    nonce: [u8; 16],
    timestamp: SystemTime,
) -> Result<Vec<u8>, KnockClientError> {
    let body = v1::KnockBody {
        version: KNOCK_VERSION,
        token: opts.token.clone(),
        service: opts.service.clone(),
        timestamp_unix_ms: time::unix_ms(timestamp),
        nonce: nonce.to_vec(),
        client_addr: opts.client_addr.map(client_addr_bytes).unwrap_or_default(),
        source_port: u32::from(opts.source_port),
    }
    .encode_to_vec();
    let (pop_key, pop_signature) = match &opts.pop_key {
        Some(key) => (
            key.public_jwk_json().into_bytes(),
            key.sign(&pop_signing_input(&body))
                .map_err(KnockClientError::Signing)?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let datagram = v1::Knock {
        body,
        pop_key,
        pop_signature,
    }
    .encode_to_vec();
    if datagram.len() > MAX_UDP_PAYLOAD {
        return Err(KnockClientError::TooLarge(datagram.len()));
    }
    let limits = KnockLimits {
        max_datagram: MAX_UDP_PAYLOAD,
        ..KnockLimits::default()
    };
    decode(&datagram, &limits).map_err(KnockClientError::InvalidKnock)?;
    if opts.client_addr.is_some() && opts.pop_key.is_none() {
        return Err(KnockClientError::InvalidKnock(KnockError::PopMissing));
    }
    Ok(datagram)
}

/// A decoded reply (see [`decode_reply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockReplyInfo {
    /// The nonce of the knock it answers.
    pub nonce: [u8; 16],
    pub expires_at: SystemTime,
    pub service: String,
    /// The signature verified with the node key given to [`decode_reply`].
    pub verified: bool,
}

/// Why a datagram is not an acceptable reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnockReplyError {
    #[error("not a knock reply")]
    Malformed,
    #[error("reply signature does not verify")]
    BadSignature,
}

/// Decodes a reply; with `node_public_key`, refuses it unless the node's
/// signature over [`reply_signing_input`]`(body)` verifies.
pub fn decode_reply(
    datagram: &[u8],
    node_public_key: Option<&[u8; 32]>,
) -> Result<KnockReplyInfo, KnockReplyError> {
    let reply = v1::KnockReply::decode(datagram).map_err(|_| KnockReplyError::Malformed)?;
    let body = v1::KnockReplyBody::decode(reply.body.as_slice())
        .map_err(|_| KnockReplyError::Malformed)?;
    if body.version != KNOCK_VERSION {
        return Err(KnockReplyError::Malformed);
    }
    let nonce: [u8; 16] = body
        .nonce
        .as_slice()
        .try_into()
        .map_err(|_| KnockReplyError::Malformed)?;
    let verified = match node_public_key {
        Some(pk) => {
            if !NodeKey::verify_with(pk, &reply_signing_input(&reply.body), &reply.signature) {
                return Err(KnockReplyError::BadSignature);
            }
            true
        }
        None => false,
    };
    Ok(KnockReplyInfo {
        nonce,
        expires_at: time::from_unix_ms(body.expires_unix_ms),
        service: body.service,
        verified,
    })
}

/// Knocks with the given options (see [`knock`]).
#[derive(Debug, Clone)]
pub struct KnockClient {
    opts: KnockOptions,
}

impl KnockClient {
    pub fn new(opts: KnockOptions) -> Self {
        KnockClient { opts }
    }

    pub fn options(&self) -> &KnockOptions {
        &self.opts
    }

    /// Sends up to `1 + retries` knocks, each with a fresh nonce and
    /// timestamp, waiting `timeout` for a reply after each. A reply counts
    /// when it comes from the server, decodes, echoes the nonce of one of
    /// these knocks (a late answer to an earlier try is still an admission),
    /// and, with a node key, its signature verifies; anything else is ignored.
    pub async fn knock(&self) -> Result<KnockOutcome, KnockClientError> {
        let opts = &self.opts;
        let io = |context: &str| {
            let context = format!("{context} ({})", opts.server);
            move |source| KnockClientError::Io { context, source }
        };
        let local: SocketAddr = match opts.server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local)
            .await
            .map_err(io("binding a UDP socket"))?;
        // Connected: the kernel drops datagrams from anyone but the server.
        sock.connect(opts.server)
            .await
            .map_err(io("connecting the UDP socket"))?;

        let rng = SystemRandom::new();
        let attempts = opts.retries.saturating_add(1);
        let mut sent: Vec<[u8; 16]> = Vec::with_capacity(attempts.min(64) as usize);
        let mut knock_len = 0;
        let mut bad_signature = false;
        let mut unreachable = false;
        let mut buf = vec![0u8; REPLY_BUF];
        for _ in 0..attempts {
            let mut nonce = [0u8; 16];
            rng.fill(&mut nonce).map_err(|_| KnockClientError::Random)?;
            let datagram = build_knock(opts, nonce, SystemTime::now())?;
            knock_len = datagram.len();
            sent.push(nonce);
            match sock.send(&datagram).await {
                Ok(_) => {}
                // A pending ICMP error from an earlier knock.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => unreachable = true,
                Err(e) => return Err(io("sending the knock")(e)),
            }
            let deadline = tokio::time::Instant::now() + opts.timeout;
            loop {
                let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        unreachable = true;
                        continue;
                    }
                    Ok(Err(e)) => return Err(io("receiving the reply")(e)),
                };
                match decode_reply(&buf[..n], opts.node_public_key.as_ref()) {
                    Ok(info) if sent.contains(&info.nonce) => {
                        return Ok(KnockOutcome {
                            expires_at: info.expires_at,
                            service: info.service,
                            verified_reply: info.verified,
                        });
                    }
                    Ok(_) | Err(KnockReplyError::Malformed) => {}
                    Err(KnockReplyError::BadSignature) => bad_signature = true,
                }
            }
        }
        if bad_signature {
            return Err(KnockClientError::BadReplySignature {
                server: opts.server,
            });
        }
        if unreachable {
            return Err(KnockClientError::Unreachable {
                server: opts.server,
            });
        }
        Err(KnockClientError::Timeout {
            server: opts.server,
            waited: opts.timeout.saturating_mul(attempts),
            attempts,
            knock_len,
        })
    }
}

/// Knocks once (with retries) and waits for the admission; see
/// [`KnockClient::knock`].
pub async fn knock(opts: &KnockOptions) -> Result<KnockOutcome, KnockClientError> {
    KnockClient::new(opts.clone()).knock().await
}
