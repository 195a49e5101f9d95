//! JSON Web Keys (RFC 7517) for checking JWS signatures (RFC 7515) with
//! `ring`, shared by token verification (keys from a JWKS file, selected by
//! `kid`) and proof of possession (a key in a token's `cnf` claim).
//!
//! A [`Jwk`] carries exactly one algorithm ([`Jwk::alg`]): the one its key type
//! implies (OKP/Ed25519 → EdDSA, EC/P-256 → ES256, RSA → RS256, oct → HS256).
//! An `"alg"` member, if present, must name that same algorithm; that is the
//! per-key allow-list of RFC 8725 §3.1, and [`Jwk::verify`] refuses any other
//! algorithm, which is what defeats algorithm confusion (RFC 8725 §2.1: an
//! RSA public key used as an HMAC secret, `none`, ...).
//!
//! [`KeySet`] is a parsed JWKS (RFC 7517 §5); [`JwksFile`] keeps one loaded
//! from a file and hot-reloads it, keeping the last good set when the file
//! turns bad.

mod json;

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac, signature};
use serde_json::{Map, Value};

pub(crate) use json::{JsonError, parse_object};

/// Largest single JWK accepted by [`Jwk::from_json`] (an 8192-bit RSA key is
/// about 1.5 KiB of JSON).
pub const MAX_JWK_BYTES: usize = 16 * 1024;
/// Largest JWKS document accepted by [`KeySet::from_jwks`] and [`JwksFile`].
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most keys (usable or not) in one JWKS.
pub const MAX_JWKS_KEYS: usize = 256;
/// Longest `kid` accepted.
pub const MAX_KID_BYTES: usize = 256;
/// Smallest RSA modulus accepted: RFC 7518 §3.3 ("A key of size 2048 bits or
/// larger MUST be used with these algorithms").
pub const RSA_MIN_BITS: usize = 2048;
/// Largest RSA modulus accepted (ring's limit for RS256).
pub const RSA_MAX_BITS: usize = 8192;
/// Shortest HS256 key: RFC 7518 §3.2 ("A key of the same size as the hash
/// output (for instance, 256 bits for "HS256") or larger MUST be used").
pub const HMAC_MIN_BYTES: usize = 32;

/// A JWS algorithm we verify (RFC 7518 §3.1 names; EdDSA from RFC 8037 §3.1).
/// Anything else, `none` included, has no value of this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// Ed25519 (RFC 8037 §3.1).
    EdDSA,
    /// ECDSA with P-256 and SHA-256 (RFC 7518 §3.4).
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 §3.3).
    RS256,
    /// HMAC with SHA-256 (RFC 7518 §3.2); only with a configured shared secret.
    HS256,
}

impl Alg {
    /// Every algorithm, in a stable order.
    pub const ALL: [Alg; 4] = [Alg::EdDSA, Alg::ES256, Alg::RS256, Alg::HS256];

    /// The registered `alg` value (case-sensitive, RFC 7515 §4.1.1).
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::EdDSA => "EdDSA",
            Alg::ES256 => "ES256",
            Alg::RS256 => "RS256",
            Alg::HS256 => "HS256",
        }
    }

    /// True for the MAC algorithm (a shared secret, not a public key).
    pub fn is_symmetric(self) -> bool {
        self == Alg::HS256
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Alg {
    type Err = JwkError;

    /// Exact, case-sensitive match (RFC 7515 §4.1.1: "a case-sensitive ASCII
    /// string"); `none` and every other value is [`JwkError::UnsupportedAlg`].
    fn from_str(s: &str) -> Result<Alg, JwkError> {
        Alg::ALL
            .into_iter()
            .find(|alg| alg.as_str() == s)
            .ok_or_else(|| JwkError::UnsupportedAlg(clip(s)))
    }
}

/// Why a key, key set or key file was refused, or a signature did not check.
/// [`JwkError::reason`] is stable (metrics, audit); `Display` explains.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    #[error("{what} is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("{what} is not a JSON object: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error(
        "{what} has the member {name} more than once (RFC 7517 §4: member names must be unique)"
    )]
    DuplicateMember { what: &'static str, name: String },
    #[error("the JWK has no {0:?} member (RFC 7517 §4, RFC 7518 §6)")]
    MissingMember(&'static str),
    #[error("the JWK member {member:?} is invalid: {detail}")]
    BadMember {
        member: &'static str,
        detail: String,
    },
    #[error("unsupported key type (kty) {0}; supported: OKP, EC, RSA, oct")]
    UnsupportedKty(String),
    #[error("unsupported curve (crv) {0}; supported: Ed25519 (OKP), P-256 (EC)")]
    UnsupportedCurve(String),
    #[error("unsupported algorithm {0}; supported: EdDSA, ES256, RS256, HS256")]
    UnsupportedAlg(String),
    #[error(
        "the JWK says \"alg\":\"{alg}\" but its key type {kty} is only used with {implied} (RFC 7517 §4.4, RFC 8725 §3.1)"
    )]
    AlgMismatch {
        kty: &'static str,
        alg: Alg,
        implied: Alg,
    },
    #[error("the key is not for signatures: {0} (RFC 7517 §4.2-4.3)")]
    NotForSigning(String),
    #[error("the JWK contains private key material ({0:?}); publish only public keys")]
    PrivateKey(&'static str),
    #[error(
        "RSA key of {bits} bits is too small; at least {RSA_MIN_BITS} are required (RFC 7518 §3.3)"
    )]
    RsaTooSmall { bits: usize },
    #[error("RSA key of {bits} bits is too large; at most {RSA_MAX_BITS} are supported")]
    RsaTooLarge { bits: usize },
    #[error(
        "HS256 key of {bytes} bytes is too short; at least {HMAC_MIN_BYTES} are required (RFC 7518 §3.2)"
    )]
    HmacKeyTooShort { bytes: usize },
    #[error("a symmetric (oct) HS256 key, refused because tokens.allow_hs256 = false")]
    Hs256Disabled,
    #[error("not a JWK set: {0} (RFC 7517 §5)")]
    NotAKeySet(String),
    #[error("a key in the JWK set has no \"kid\"; every key needs one to be selected")]
    MissingKid,
    #[error("the kid {0} is used by two keys in the JWK set")]
    DuplicateKid(String),
    #[error("the JWK set has {count} keys, more than the limit of {MAX_JWKS_KEYS}")]
    TooManyKeys { count: usize },
    #[error(
        "the JWK set has no usable signing key ({skipped} key(s) skipped as unsupported or refused)"
    )]
    NoUsableKeys { skipped: usize },
    #[error("key #{index} (kid {kid}): {source}")]
    InKey {
        index: usize,
        kid: String,
        source: Box<JwkError>,
    },
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error(
        "algorithm {requested} is not allowed for this key, which only verifies {allowed} (RFC 8725 §3.1)"
    )]
    AlgNotAllowed { requested: Alg, allowed: Alg },
    #[error("signature does not verify: {0}")]
    BadSignature(&'static str),
}

impl JwkError {
    /// A stable snake_case name for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            JwkError::TooLarge { .. } => "jwk_too_large",
            JwkError::Malformed { .. } => "jwk_malformed",
            JwkError::DuplicateMember { .. } => "jwk_duplicate_member",
            JwkError::MissingMember(_) => "jwk_missing_member",
            JwkError::BadMember { .. } => "jwk_member_invalid",
            JwkError::UnsupportedKty(_) => "jwk_unsupported_kty",
            JwkError::UnsupportedCurve(_) => "jwk_unsupported_curve",
            JwkError::UnsupportedAlg(_) => "jwk_unsupported_alg",
            JwkError::AlgMismatch { .. } => "jwk_alg_mismatch",
            JwkError::NotForSigning(_) => "jwk_not_for_signing",
            JwkError::PrivateKey(_) => "jwk_private_key",
            JwkError::RsaTooSmall { .. } => "jwk_rsa_key_too_small",
            JwkError::RsaTooLarge { .. } => "jwk_rsa_key_too_large",
            JwkError::HmacKeyTooShort { .. } => "jwk_hmac_key_too_short",
            JwkError::Hs256Disabled => "jwk_hs256_disabled",
            JwkError::NotAKeySet(_) => "jwks_malformed",
            JwkError::MissingKid => "jwks_missing_kid",
            JwkError::DuplicateKid(_) => "jwks_duplicate_kid",
            JwkError::TooManyKeys { .. } => "jwks_too_many_keys",
            JwkError::NoUsableKeys { .. } => "jwks_no_usable_keys",
            JwkError::InKey { source, .. } => source.reason(),
            JwkError::Io { .. } => "jwks_io",
            JwkError::AlgNotAllowed { .. } => "alg_not_allowed",
            JwkError::BadSignature(_) => "bad_signature",
        }
    }

    /// The error without [`JwkError::InKey`] context.
    pub fn root(&self) -> &JwkError {
        match self {
            JwkError::InKey { source, .. } => source.root(),
            other => other,
        }
    }

    /// Well-formed keys that are simply not for us (another algorithm, curve
    /// or key type, or an encryption key): a JWKS may list them beside ours.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            JwkError::UnsupportedKty(_)
                | JwkError::UnsupportedCurve(_)
                | JwkError::UnsupportedAlg(_)
                | JwkError::NotForSigning(_)
        )
    }
}

/// Quotes an untrusted string for an error message, cut to 64 characters.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}

/// base64url without padding, canonical only (RFC 7515 §2: "with all
/// trailing '=' characters omitted"; RFC 4648 §3.5: non-zero pad bits are
/// refused). `+`, `/`, `=`, whitespace: refused.
pub fn b64url_decode(s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD.decode(s).map_err(|e| e.to_string())
}

/// base64url without padding (RFC 7515 §2).
pub fn b64url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// Public key material, or the shared secret of an oct key.
#[derive(Clone, PartialEq, Eq)]
enum Material {
    /// The 32-byte Ed25519 public key (RFC 8037 §2 `x`).
    Ed25519([u8; 32]),
    /// The uncompressed P-256 point 0x04 || x || y (SEC 1 §2.3.3).
    P256(Box<[u8; 65]>),
    /// Big-endian modulus and exponent, no leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The HMAC secret.
    Oct(Vec<u8>),
}

/// One verification key (RFC 7517 §4) with the one algorithm it may be used
/// with. The key material is private; `Debug` never prints a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    /// The key ID (RFC 7517 §4.5), if the JWK has one.
    pub kid: Option<String>,
    /// The effective algorithm: the only one [`Jwk::verify`] accepts.
    pub alg: Alg,
    material: Material,
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kty", &self.kty())
            .field(
                "thumbprint",
                // An oct thumbprint is a hash of the secret: not for logs.
                &if self.alg.is_symmetric() {
                    "(secret)".to_owned()
                } else {
                    self.thumbprint()
                },
            )
            .finish()
    }
}

impl Jwk {
    /// Parses one JWK object (RFC 7517 §4): `kty` OKP with `crv` Ed25519,
    /// EC with `crv` P-256 (`x`, `y`), RSA (`n`, `e`) or oct (`k`). `alg`, if
    /// present, must be the algorithm the key type implies; `use`, if
    /// present, must be `sig`; `key_ops`, if present, must include `verify`.
    /// Private members (`d`, ...) are refused for asymmetric keys.
    pub fn from_json(v: &[u8]) -> Result<Jwk, JwkError> {
        if v.len() > MAX_JWK_BYTES {
            return Err(JwkError::TooLarge {
                what: "the JWK",
                len: v.len() as u64,
                max: MAX_JWK_BYTES,
            });
        }
        let map = parse_object(v).map_err(|e| json_error("the JWK", e))?;
        Jwk::from_map(&map)
    }

    /// [`Jwk::from_json`] on an already parsed object (a JWKS entry, a `cnf`).
    pub(crate) fn from_map(map: &Map<String, Value>) -> Result<Jwk, JwkError> {
        // RFC 7517 §4.1: "kty" is REQUIRED, case-sensitive.
        let kty = str_member(map, "kty")?.ok_or(JwkError::MissingMember("kty"))?;
        // RFC 7517 §4.2: "sig" (signature) or "enc" (encryption).
        if let Some(usage) = str_member(map, "use")?
            && usage != "sig"
        {
            return Err(JwkError::NotForSigning(format!(
                "\"use\" is {}",
                clip(usage)
            )));
        }
        // RFC 7517 §4.3: an array of unique operation names.
        if let Some(ops) = map.get("key_ops") {
            check_key_ops(ops)?;
        }
        // RFC 7517 §4.4: the algorithm intended for use with the key.
        let declared = str_member(map, "alg")?.map(Alg::from_str).transpose()?;
        // RFC 7517 §4.5: a string; we bound it.
        let kid = str_member(map, "kid")?.map(str::to_owned);
        if let Some(kid) = &kid
            && (kid.is_empty() || kid.len() > MAX_KID_BYTES)
        {
            return Err(JwkError::BadMember {
                member: "kid",
                detail: format!("must be 1 to {MAX_KID_BYTES} bytes"),
            });
        }

        let (kty, material) = match kty {
            "OKP" => ("OKP", okp_material(map)?),
            "EC" => ("EC", ec_material(map)?),
            "RSA" => ("RSA", rsa_material(map)?),
            "oct" => ("oct", oct_material(map)?),
            other => return Err(JwkError::UnsupportedKty(clip(other))),
        };
        let implied = match material {
            Material::Ed25519(_) => Alg::EdDSA,
            Material::P256(_) => Alg::ES256,
            Material::Rsa { .. } => Alg::RS256,
            Material::Oct(_) => Alg::HS256,
        };
        // RFC 8725 §3.1: each key is used with exactly one algorithm.
        if let Some(alg) = declared
            && alg != implied
        {
            return Err(JwkError::AlgMismatch { kty, alg, implied });
        }
        Ok(Jwk {
            kid,
            alg: implied,
            material,
        })
    }

    /// The `kty` value (RFC 7517 §4.1).
    pub fn kty(&self) -> &'static str {
        match self.material {
            Material::Ed25519(_) => "OKP",
            Material::P256(_) => "EC",
            Material::Rsa { .. } => "RSA",
            Material::Oct(_) => "oct",
        }
    }

    /// The RSA modulus size in bits; `None` for other key types.
    pub fn rsa_bits(&self) -> Option<usize> {
        match &self.material {
            Material::Rsa { n, .. } => Some(bit_len(n)),
            _ => None,
        }
    }

    /// The exact length of a valid signature from this key.
    pub fn signature_len(&self) -> usize {
        match &self.material {
            // RFC 8032 §5.1.6: 64 octets.
            Material::Ed25519(_) => 64,
            // RFC 7518 §3.4: R || S, 32 octets each for P-256.
            Material::P256(_) => 64,
            // RFC 8017 §8.2.2 step 1: the modulus length in octets.
            Material::Rsa { n, .. } => n.len(),
            // RFC 7518 §3.2: the full HMAC output, never truncated.
            Material::Oct(_) => 32,
        }
    }

    /// Checks `signature` over `signing_input` with algorithm `alg`, which
    /// must be this key's algorithm (RFC 8725 §3.1; RFC 7515 §5.2 step 8).
    pub fn verify(&self, alg: Alg, signing_input: &[u8], signature: &[u8]) -> Result<(), JwkError> {
        if alg != self.alg {
            return Err(JwkError::AlgNotAllowed {
                requested: alg,
                allowed: self.alg,
            });
        }
        if signature.len() != self.signature_len() {
            return Err(JwkError::BadSignature("wrong length for the algorithm"));
        }
        let checked = match &self.material {
            Material::Ed25519(key) => signature::UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(signing_input, signature),
            Material::P256(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point[..])
                    .verify(signing_input, signature)
            }
            Material::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }.verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                signing_input,
                signature,
            ),
            Material::Oct(secret) => hmac::verify(
                &hmac::Key::new(hmac::HMAC_SHA256, secret),
                signing_input,
                signature,
            ),
        };
        checked.map_err(|_| JwkError::BadSignature("wrong key or altered content"))
    }

    /// The RFC 7638 SHA-256 JWK thumbprint, base64url without padding: the
    /// hash of the required members in lexicographic order, no whitespace
    /// (RFC 7638 §3.2; OKP members from RFC 8037 §2).
    pub fn thumbprint(&self) -> String {
        let canonical = match &self.material {
            Material::Ed25519(x) => {
                format!(
                    r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                    b64url_encode(x)
                )
            }
            Material::P256(point) => format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                b64url_encode(&point[1..33]),
                b64url_encode(&point[33..])
            ),
            Material::Rsa { n, e } => format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                b64url_encode(e),
                b64url_encode(n)
            ),
            Material::Oct(k) => format!(r#"{{"k":"{}","kty":"oct"}}"#, b64url_encode(k)),
        };
        b64url_encode(&sha256(canonical.as_bytes()))
    }

    /// The public JWK as JSON (`kty`, curve and key members, `kid` if any,
    /// `alg`, `use` = `sig`); `None` for an oct key, which has no public form.
    pub fn to_public_json(&self) -> Option<Value> {
        let mut map = Map::new();
        map.insert("kty".into(), self.kty().into());
        match &self.material {
            Material::Ed25519(x) => {
                map.insert("crv".into(), "Ed25519".into());
                map.insert("x".into(), b64url_encode(x).into());
            }
            Material::P256(point) => {
                map.insert("crv".into(), "P-256".into());
                map.insert("x".into(), b64url_encode(&point[1..33]).into());
                map.insert("y".into(), b64url_encode(&point[33..]).into());
            }
            Material::Rsa { n, e } => {
                map.insert("n".into(), b64url_encode(n).into());
                map.insert("e".into(), b64url_encode(e).into());
            }
            Material::Oct(_) => return None,
        }
        if let Some(kid) = &self.kid {
            map.insert("kid".into(), kid.clone().into());
        }
        map.insert("alg".into(), self.alg.as_str().into());
        map.insert("use".into(), "sig".into());
        Some(Value::Object(map))
    }
}

fn json_error(what: &'static str, e: JsonError) -> JwkError {
    match e {
        JsonError::Duplicate(name) => JwkError::DuplicateMember {
            what,
            name: clip(&name),
        },
        other => JwkError::Malformed {
            what,
            detail: other.to_string(),
        },
    }
}

/// A member that must be a string if present.
fn str_member<'a>(
    map: &'a Map<String, Value>,
    member: &'static str,
) -> Result<Option<&'a str>, JwkError> {
    match map.get(member) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(JwkError::BadMember {
            member,
            detail: "not a string".into(),
        }),
    }
}

/// A required base64url member, decoded.
fn b64_member(map: &Map<String, Value>, member: &'static str) -> Result<Vec<u8>, JwkError> {
    let text = str_member(map, member)?.ok_or(JwkError::MissingMember(member))?;
    b64url_decode(text).map_err(|e| JwkError::BadMember {
        member,
        detail: format!("not base64url without padding (RFC 7515 §2): {e}"),
    })
}

/// A fixed-size base64url member (RFC 7518 §6.2.1.2: EC coordinates are the
/// full coordinate size; RFC 8037 §2: `x` is the 32-byte public key).
fn fixed_member<const N: usize>(
    map: &Map<String, Value>,
    member: &'static str,
) -> Result<[u8; N], JwkError> {
    let bytes = b64_member(map, member)?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| JwkError::BadMember {
            member,
            detail: format!("must decode to {N} bytes, not {}", bytes.len()),
        })
}

/// Refuses private members of an asymmetric key.
fn no_private(map: &Map<String, Value>, members: &[&'static str]) -> Result<(), JwkError> {
    match members.iter().find(|m| map.contains_key(**m)) {
        Some(m) => Err(JwkError::PrivateKey(m)),
        None => Ok(()),
    }
}

fn check_key_ops(ops: &Value) -> Result<(), JwkError> {
    let Value::Array(items) = ops else {
        return Err(JwkError::BadMember {
            member: "key_ops",
            detail: "not an array".into(),
        });
    };
    let mut seen: Vec<&str> = Vec::with_capacity(items.len().min(16));
    for item in items {
        let Value::String(op) = item else {
            return Err(JwkError::BadMember {
                member: "key_ops",
                detail: "holds a non-string".into(),
            });
        };
        // RFC 7517 §4.3: "Duplicate key operation values MUST NOT be present".
        if seen.contains(&op.as_str()) {
            return Err(JwkError::BadMember {
                member: "key_ops",
                detail: format!("lists {} twice", clip(op)),
            });
        }
        seen.push(op);
    }
    if seen.contains(&"verify") {
        Ok(())
    } else {
        Err(JwkError::NotForSigning(
            "\"key_ops\" does not include \"verify\"".into(),
        ))
    }
}

fn okp_material(map: &Map<String, Value>) -> Result<Material, JwkError> {
    // RFC 8037 §2: "crv", "x" (public), "d" (private).
    let crv = str_member(map, "crv")?.ok_or(JwkError::MissingMember("crv"))?;
    if crv != "Ed25519" {
        return Err(JwkError::UnsupportedCurve(clip(crv)));
    }
    no_private(map, &["d"])?;
    Ok(Material::Ed25519(fixed_member::<32>(map, "x")?))
}

fn ec_material(map: &Map<String, Value>) -> Result<Material, JwkError> {
    // RFC 7518 §6.2.1: "crv", "x", "y"; §6.2.2: "d" is private.
    let crv = str_member(map, "crv")?.ok_or(JwkError::MissingMember("crv"))?;
    if crv != "P-256" {
        return Err(JwkError::UnsupportedCurve(clip(crv)));
    }
    no_private(map, &["d"])?;
    let x = fixed_member::<32>(map, "x")?;
    let y = fixed_member::<32>(map, "y")?;
    let mut point = Box::new([0u8; 65]);
    point[0] = 0x04;
    point[1..33].copy_from_slice(&x);
    point[33..].copy_from_slice(&y);
    Ok(Material::P256(point))
}

fn rsa_material(map: &Map<String, Value>) -> Result<Material, JwkError> {
    // RFC 7518 §6.3.2: private members.
    no_private(map, &["d", "p", "q", "dp", "dq", "qi", "oth"])?;
    let n = uint_member(map, "n")?;
    let e = uint_member(map, "e")?;
    let bits = bit_len(&n);
    if bits < RSA_MIN_BITS {
        return Err(JwkError::RsaTooSmall { bits });
    }
    if bits > RSA_MAX_BITS {
        return Err(JwkError::RsaTooLarge { bits });
    }
    // An RSA modulus is odd (a product of odd primes).
    if n.last().is_some_and(|b| b & 1 == 0) {
        return Err(JwkError::BadMember {
            member: "n",
            detail: "an RSA modulus is odd".into(),
        });
    }
    // The exponent ring accepts: odd, 3 <= e < 2^33 (NIST SP 800-89 §5.3.3).
    let e_value = e.iter().try_fold(0u64, |acc, &b| {
        if acc >> 48 != 0 {
            None
        } else {
            Some(acc << 8 | u64::from(b))
        }
    });
    match e_value {
        Some(v) if v >= 3 && v & 1 == 1 && v < 1 << 33 => {}
        _ => {
            return Err(JwkError::BadMember {
                member: "e",
                detail: "the exponent must be odd, at least 3 and below 2^33".into(),
            });
        }
    }
    Ok(Material::Rsa { n, e })
}

/// A Base64urlUInt (RFC 7518 §2): non-empty, "MUST utilize the minimum number
/// of octets needed to represent the value" (so no leading zero octet).
fn uint_member(map: &Map<String, Value>, member: &'static str) -> Result<Vec<u8>, JwkError> {
    let bytes = b64_member(map, member)?;
    match bytes.first() {
        None => Err(JwkError::BadMember {
            member,
            detail: "empty".into(),
        }),
        Some(0) => Err(JwkError::BadMember {
            member,
            detail: "has a leading zero octet (RFC 7518 §2: minimum number of octets)".into(),
        }),
        Some(_) => Ok(bytes),
    }
}

fn oct_material(map: &Map<String, Value>) -> Result<Material, JwkError> {
    // RFC 7518 §6.4.1: "k".
    let k = b64_member(map, "k")?;
    if k.len() < HMAC_MIN_BYTES {
        return Err(JwkError::HmacKeyTooShort { bytes: k.len() });
    }
    Ok(Material::Oct(k))
}

/// Bit length of a big-endian unsigned integer without leading zero octets.
fn bit_len(bytes: &[u8]) -> usize {
    match bytes.first() {
        None => 0,
        Some(&top) => (bytes.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
    }
}

/// A key the JWKS listed but that we cannot or will not use, and why; kept
/// for the log, the audit trail and the error a token naming it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    /// The key's position in the `keys` array.
    pub index: usize,
    /// The key's `kid`, if it had one.
    pub kid: Option<String>,
    /// Why it was skipped: not for us (another algorithm, curve, key type
    /// or use), or refused (a weak RSA key, a shared secret while HS256 is
    /// off, a malformed member, a `kid` listed twice).
    pub reason: JwkError,
}

/// A JWK set (RFC 7517 §5): signing keys by `kid`.
#[derive(Debug, Clone)]
pub struct KeySet {
    keys: HashMap<String, Jwk>,
    skipped: Vec<SkippedKey>,
}

impl KeySet {
    /// Parses a JWKS document `{"keys":[...]}`. Every usable key needs a
    /// unique `kid` (it is how tokens select keys). A key that is not for us
    /// (another algorithm, curve or key type, `"use":"enc"`) or that we
    /// refuse (RSA under 2048 bits, an oct key unless `allow_hs256`, a bad
    /// member, no `kid`, a `kid` two keys share) is skipped and listed in
    /// [`KeySet::skipped`], and the other keys are used: one bad key must
    /// neither stop a cold start nor freeze key rotation. A document that is
    /// not a JWK set, or has no usable key at all, is an error.
    pub fn from_jwks(json: &[u8], allow_hs256: bool) -> Result<KeySet, JwkError> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(JwkError::TooLarge {
                what: "the JWK set",
                len: json.len() as u64,
                max: MAX_JWKS_BYTES,
            });
        }
        let doc = parse_object(json).map_err(|e| json_error("the JWK set", e))?;
        // RFC 7517 §5.1: "keys" is REQUIRED, an array of JWKs.
        let Some(Value::Array(entries)) = doc.get("keys") else {
            return Err(JwkError::NotAKeySet("no \"keys\" array".into()));
        };
        if entries.len() > MAX_JWKS_KEYS {
            return Err(JwkError::TooManyKeys {
                count: entries.len(),
            });
        }
        let mut keys: HashMap<String, Jwk> = HashMap::with_capacity(entries.len());
        let mut skipped = Vec::new();
        let mut duplicated: Vec<String> = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let kid = match entry.get("kid") {
                Some(Value::String(kid)) => Some(kid.clone()),
                _ => None,
            };
            let mut skip = |reason: JwkError| {
                skipped.push(SkippedKey {
                    index,
                    kid: kid.clone(),
                    reason,
                })
            };
            let Value::Object(map) = entry else {
                skip(JwkError::NotAKeySet(format!(
                    "key #{index} is not an object"
                )));
                continue;
            };
            let jwk = match Jwk::from_map(map) {
                Ok(jwk) => jwk,
                Err(e) => {
                    skip(e);
                    continue;
                }
            };
            if jwk.alg.is_symmetric() && !allow_hs256 {
                skip(JwkError::Hs256Disabled);
                continue;
            }
            let Some(kid) = jwk.kid.clone() else {
                skip(JwkError::MissingKid);
                continue;
            };
            // RFC 7517 §4.5: keys in a set SHOULD use distinct "kid" values;
            // we select by kid alone, so a kid two keys share names neither.
            if keys.remove(&kid).is_some() || duplicated.contains(&kid) {
                if !duplicated.contains(&kid) {
                    duplicated.push(kid.clone());
                }
                skip(JwkError::DuplicateKid(clip(&kid)));
                continue;
            }
            keys.insert(kid, jwk);
        }
        if keys.is_empty() {
            return Err(JwkError::NoUsableKeys {
                skipped: skipped.len(),
            });
        }
        Ok(KeySet { keys, skipped })
    }

    /// The key with this `kid`.
    pub fn get(&self, kid: &str) -> Option<&Jwk> {
        self.keys.get(kid)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True if there are no usable keys (never, for a set that parsed).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The usable keys' kids, sorted.
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }

    /// Keys listed in the JWKS but skipped as not usable by us.
    pub fn skipped(&self) -> &[SkippedKey] {
        &self.skipped
    }

    /// Why the key with this `kid` was skipped, if one was.
    pub fn refused(&self, kid: &str) -> Option<String> {
        self.skipped
            .iter()
            .find(|s| s.kid.as_deref() == Some(kid))
            .map(|s| s.reason.to_string())
    }
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }

    /// Has the file been unmodified for [`RACY_WINDOW`] before `read_at`? If
    /// not (or the mtime is out of range), its stamp is not trusted.
    fn settled_before(&self, read_at: SystemTime) -> bool {
        let (secs, nanos) = self.mtime;
        let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
            return false;
        };
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos))))
            .and_then(|t| t.checked_add(RACY_WINDOW))
            .is_some_and(|settled| settled <= read_at)
    }
}

/// A file's mtime is trusted to detect changes only once it is this much
/// older than our last read: a write in the same timestamp tick as the one we
/// read would otherwise go unnoticed (the "racy clean" problem).
const RACY_WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct FileState {
    stamp: Option<Stamp>,
    read_at: SystemTime,
    /// Hash of the content last read, good or bad.
    hash: [u8; 32],
    last_error: Option<JwkError>,
}

/// A JWKS loaded from a file and reloaded when it changes. Readers take the
/// current set with [`JwksFile::current`] (an `Arc` clone); a reload swaps it
/// atomically.
#[derive(Debug)]
pub struct JwksFile {
    path: Option<PathBuf>,
    allow_hs256: bool,
    current: RwLock<Arc<KeySet>>,
    state: Mutex<FileState>,
}

impl JwksFile {
    /// Loads the JWKS at `path`; this initial load must succeed.
    pub fn load(path: &Path, allow_hs256: bool) -> Result<JwksFile, JwkError> {
        let (stamp, bytes) = read_jwks(path)?;
        let set = KeySet::from_jwks(&bytes, allow_hs256)?;
        Ok(JwksFile {
            path: Some(path.to_owned()),
            allow_hs256,
            current: RwLock::new(Arc::new(set)),
            state: Mutex::new(FileState {
                stamp: Some(stamp),
                read_at: SystemTime::now(),
                hash: sha256(&bytes),
                last_error: None,
            }),
        })
    }

    /// A fixed, in-memory key set that never reloads (tests, embedding).
    pub fn fixed(set: KeySet) -> JwksFile {
        JwksFile {
            path: None,
            allow_hs256: set.keys.values().any(|k| k.alg.is_symmetric()),
            current: RwLock::new(Arc::new(set)),
            state: Mutex::new(FileState {
                stamp: None,
                read_at: SystemTime::UNIX_EPOCH,
                hash: [0; 32],
                last_error: None,
            }),
        }
    }

    /// The file, if this set came from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The key set in force.
    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The problem with the file as last seen, if it is bad now (the set in
    /// force is then the last good one).
    pub fn last_error(&self) -> Option<JwkError> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_error
            .clone()
    }

    /// Looks at the file and swaps in its key set if the content changed.
    /// Cheap when nothing changed (one `stat`; the file is re-read and hashed
    /// only when device, inode, size or mtime differ, or the mtime is too
    /// recent to trust). `Ok(true)`: a new set is in force. `Ok(false)`:
    /// nothing new. `Err`: the file is newly bad (unreadable, too large, not a
    /// valid JWKS); the last good set stays in force. The same problem is
    /// reported once: later calls return `Ok(false)` until the file changes
    /// again, and [`JwksFile::last_error`] still says what is wrong.
    pub fn reload_if_changed(&self) -> Result<bool, JwkError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = SystemTime::now();
        let checked = fs::metadata(path)
            .map_err(|e| io_error(path, &e))
            .and_then(|meta| {
                let stamp = Stamp::of(&meta);
                if state.stamp == Some(stamp) && stamp.settled_before(state.read_at) {
                    return Ok(None);
                }
                read_jwks(path).map(Some)
            });
        let (stamp, bytes) = match checked {
            Ok(None) => return Ok(false),
            Ok(Some(read)) => read,
            Err(e) => {
                state.stamp = None;
                state.hash = [0; 32];
                return Self::report(&mut state, e);
            }
        };
        state.stamp = Some(stamp);
        state.read_at = now;
        let hash = sha256(&bytes);
        if hash == state.hash {
            return Ok(false);
        }
        state.hash = hash;
        match KeySet::from_jwks(&bytes, self.allow_hs256) {
            Ok(set) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                state.last_error = None;
                Ok(true)
            }
            Err(e) => {
                // Bad new content always counts as news.
                state.last_error = None;
                Self::report(&mut state, e)
            }
        }
    }

    fn report(state: &mut FileState, e: JwkError) -> Result<bool, JwkError> {
        if state.last_error.as_ref() == Some(&e) {
            return Ok(false);
        }
        state.last_error = Some(e.clone());
        Err(e)
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> JwkError {
    JwkError::Io {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// Reads a JWKS file: a regular file (never a FIFO or device), at most
/// [`MAX_JWKS_BYTES`].
fn read_jwks(path: &Path) -> Result<(Stamp, Vec<u8>), JwkError> {
    // O_NONBLOCK: opening a FIFO put in the file's place must not hang the
    // reload (it is then refused as not a regular file); no effect on files.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_error(path, &e))?;
    let meta = file.metadata().map_err(|e| io_error(path, &e))?;
    if !meta.is_file() {
        return Err(JwkError::Io {
            path: path.to_owned(),
            detail: "not a regular file".into(),
        });
    }
    let too_large = |len: u64| JwkError::TooLarge {
        what: "the JWK set file",
        len,
        max: MAX_JWKS_BYTES,
    };
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, &e))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok((Stamp::of(&meta), bytes))
}

#[cfg(test)]
mod tests;
