//! JWK, JWKS and key-file tests, with the RFC known-answer vectors.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;

use super::*;

/// RFC 7515 A.1-A.3, RFC 8037 A, RFC 7638 §3.1: copied from the RFCs.
const VECTORS: &str = include_str!("../../../tests/fixtures/rfc_jws_vectors.json");
/// A real 1024-bit RSA public key (generated with Python `cryptography`).
const RSA_1024: &str = include_str!("../../../tests/fixtures/rsa_1024.jwk.json");

fn vector(name: &str) -> Value {
    let all: Value = serde_json::from_str(VECTORS).unwrap();
    all[name].clone()
}

/// The key and (signing input, signature) of a published example JWS.
fn published(name: &str) -> (Jwk, String, Vec<u8>) {
    let v = vector(name);
    let key = Jwk::from_json(v["jwk"].to_string().as_bytes()).unwrap();
    let jws = v["jws"].as_str().unwrap();
    let (input, sig) = jws.rsplit_once('.').unwrap();
    (key, input.to_owned(), b64url_decode(sig).unwrap())
}

fn jwk(v: Value) -> Result<Jwk, JwkError> {
    Jwk::from_json(v.to_string().as_bytes())
}

fn reason<T: fmt::Debug>(r: Result<T, JwkError>) -> &'static str {
    r.unwrap_err().reason()
}

fn ed25519_json() -> Value {
    vector("rfc8037_a4")["jwk"].clone()
}

fn rsa_json() -> Value {
    vector("rfc7515_a2")["jwk"].clone()
}

fn ec_json() -> Value {
    vector("rfc7515_a3")["jwk"].clone()
}

fn with(mut v: Value, member: &str, value: Value) -> Value {
    v[member] = value;
    v
}

#[test]
fn rfc7515_a1_hs256_known_answer() {
    let (key, input, sig) = published("rfc7515_a1");
    assert_eq!(key.alg, Alg::HS256);
    key.verify(Alg::HS256, input.as_bytes(), &sig).unwrap();
    let mut tampered = sig.clone();
    tampered[0] ^= 1;
    assert_eq!(
        reason(key.verify(Alg::HS256, input.as_bytes(), &tampered)),
        "bad_signature"
    );
    assert_eq!(
        reason(key.verify(Alg::RS256, input.as_bytes(), &sig)),
        "alg_not_allowed"
    );
}

#[test]
fn rfc7515_a2_rs256_known_answer() {
    let (key, input, sig) = published("rfc7515_a2");
    assert_eq!(key.alg, Alg::RS256);
    assert_eq!(key.rsa_bits(), Some(2048));
    key.verify(Alg::RS256, input.as_bytes(), &sig).unwrap();
    let mut other_input = input.clone().into_bytes();
    other_input[30] ^= 1;
    assert_eq!(
        reason(key.verify(Alg::RS256, &other_input, &sig)),
        "bad_signature"
    );
    // The classic confusion: the same bytes "verified" as HS256.
    assert_eq!(
        reason(key.verify(Alg::HS256, input.as_bytes(), &sig)),
        "alg_not_allowed"
    );
}

#[test]
fn rfc7515_a3_es256_known_answer() {
    let (key, input, sig) = published("rfc7515_a3");
    assert_eq!(key.alg, Alg::ES256);
    key.verify(Alg::ES256, input.as_bytes(), &sig).unwrap();
    let mut tampered = sig.clone();
    tampered[63] ^= 0x80;
    assert_eq!(
        reason(key.verify(Alg::ES256, input.as_bytes(), &tampered)),
        "bad_signature"
    );
    // DER-encoded or truncated signatures are not the JWS form (RFC 7518 §3.4).
    assert_eq!(
        reason(key.verify(Alg::ES256, input.as_bytes(), &sig[..63])),
        "bad_signature"
    );
}

#[test]
fn rfc8037_a4_ed25519_known_answer() {
    let (key, input, sig) = published("rfc8037_a4");
    assert_eq!(key.alg, Alg::EdDSA);
    key.verify(Alg::EdDSA, input.as_bytes(), &sig).unwrap();
    let mut tampered = sig.clone();
    tampered[10] ^= 4;
    assert_eq!(
        reason(key.verify(Alg::EdDSA, input.as_bytes(), &tampered)),
        "bad_signature"
    );
    assert_eq!(
        reason(key.verify(Alg::ES256, input.as_bytes(), &sig)),
        "alg_not_allowed"
    );
}

#[test]
fn rfc7638_and_rfc8037_thumbprints() {
    let v = vector("rfc7638_3_1");
    let key = jwk(v["jwk"].clone()).unwrap();
    assert_eq!(key.kid.as_deref(), Some("2011-04-29"));
    assert_eq!(key.thumbprint(), v["thumbprint"].as_str().unwrap());
    let v = vector("rfc8037_a4");
    assert_eq!(
        jwk(v["jwk"].clone()).unwrap().thumbprint(),
        v["thumbprint"].as_str().unwrap()
    );
    // Optional members do not change it (RFC 7638 §3.2).
    let decorated = with(with(ed25519_json(), "kid", json!("k")), "use", json!("sig"));
    assert_eq!(
        jwk(decorated).unwrap().thumbprint(),
        v["thumbprint"].as_str().unwrap()
    );
}

#[test]
fn public_json_round_trips() {
    for v in [ed25519_json(), rsa_json(), ec_json()] {
        let key = jwk(with(v, "kid", json!("k1"))).unwrap();
        let again = jwk(key.to_public_json().unwrap()).unwrap();
        assert_eq!(again, key);
    }
    let oct = jwk(vector("rfc7515_a1")["jwk"].clone()).unwrap();
    assert!(oct.to_public_json().is_none());
    assert!(
        !format!("{oct:?}").contains("AyM1"),
        "Debug leaks the secret"
    );
}

#[test]
fn alg_names() {
    for alg in Alg::ALL {
        assert_eq!(alg.as_str().parse::<Alg>(), Ok(alg));
    }
    for bad in [
        "none", "None", "eddsa", "es256", "RS384", "PS256", "HS512", "Ed25519", "",
    ] {
        assert_eq!(reason(bad.parse::<Alg>()), "jwk_unsupported_alg", "{bad}");
    }
}

#[test]
fn per_key_alg_allow_list() {
    let key = jwk(with(rsa_json(), "alg", json!("RS256"))).unwrap();
    let (_, input, sig) = published("rfc7515_a2");
    key.verify(Alg::RS256, input.as_bytes(), &sig).unwrap();
    for other in [Alg::ES256, Alg::EdDSA, Alg::HS256] {
        assert_eq!(
            reason(key.verify(other, input.as_bytes(), &sig)),
            "alg_not_allowed"
        );
    }
    // An "alg" we do not support on the key: the key is not usable.
    for alg in ["RS384", "RS512", "PS256", "none"] {
        assert_eq!(
            reason(jwk(with(rsa_json(), "alg", json!(alg)))),
            "jwk_unsupported_alg",
            "{alg}"
        );
    }
    // An "alg" of ours that does not fit the key type: an error.
    for (v, alg) in [
        (rsa_json(), "ES256"),
        (rsa_json(), "HS256"),
        (ec_json(), "RS256"),
        (ed25519_json(), "ES256"),
        (vector("rfc7515_a1")["jwk"].clone(), "RS256"),
    ] {
        assert_eq!(reason(jwk(with(v, "alg", json!(alg)))), "jwk_alg_mismatch");
    }
    assert_eq!(
        reason(jwk(with(rsa_json(), "alg", json!(256)))),
        "jwk_member_invalid"
    );
}

#[test]
fn rsa_key_rules() {
    assert_eq!(
        reason(Jwk::from_json(RSA_1024.as_bytes())),
        "jwk_rsa_key_too_small"
    );
    let err = Jwk::from_json(RSA_1024.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("1024 bits"), "{err}");
    // RFC 7518 §2: no leading zero octet.
    let n = b64url_decode(rsa_json()["n"].as_str().unwrap()).unwrap();
    let mut padded = vec![0u8];
    padded.extend_from_slice(&n);
    assert_eq!(
        reason(jwk(with(rsa_json(), "n", json!(b64url_encode(&padded))))),
        "jwk_member_invalid"
    );
    let mut even = n.clone();
    *even.last_mut().unwrap() &= 0xfe;
    assert_eq!(
        reason(jwk(with(rsa_json(), "n", json!(b64url_encode(&even))))),
        "jwk_member_invalid"
    );
    for e in [&[1u8][..], &[2], &[1, 0, 0], &[3, 0, 0, 0, 0, 1]] {
        assert_eq!(
            reason(jwk(with(rsa_json(), "e", json!(b64url_encode(e))))),
            "jwk_member_invalid",
            "{e:?}"
        );
    }
    let huge = [0xffu8; 1025];
    assert_eq!(
        reason(jwk(with(rsa_json(), "n", json!(b64url_encode(&huge))))),
        "jwk_rsa_key_too_large"
    );
    assert_eq!(
        reason(jwk(json!({"kty": "RSA", "e": "AQAB"}))),
        "jwk_missing_member"
    );
}

#[test]
fn private_material_is_refused() {
    let a2 = vector("rfc7515_a2");
    let mut private_rsa = rsa_json();
    private_rsa["d"] = a2["private"]["d"].clone();
    assert_eq!(reason(jwk(private_rsa)), "jwk_private_key");
    assert_eq!(
        reason(jwk(with(
            ec_json(),
            "d",
            json!("jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI")
        ))),
        "jwk_private_key"
    );
    assert_eq!(
        reason(jwk(with(
            ed25519_json(),
            "d",
            vector("rfc8037_a4")["d"].clone()
        ))),
        "jwk_private_key"
    );
}

#[test]
fn key_member_rules() {
    assert_eq!(
        reason(jwk(with(ed25519_json(), "use", json!("enc")))),
        "jwk_not_for_signing"
    );
    jwk(with(ed25519_json(), "use", json!("sig"))).unwrap();
    assert_eq!(
        reason(jwk(with(ed25519_json(), "use", json!(1)))),
        "jwk_member_invalid"
    );
    jwk(with(ed25519_json(), "key_ops", json!(["verify"]))).unwrap();
    assert_eq!(
        reason(jwk(with(ed25519_json(), "key_ops", json!(["encrypt"])))),
        "jwk_not_for_signing"
    );
    assert_eq!(
        reason(jwk(with(
            ed25519_json(),
            "key_ops",
            json!(["verify", "verify"])
        ))),
        "jwk_member_invalid"
    );
    assert_eq!(
        reason(jwk(with(ed25519_json(), "key_ops", json!("verify")))),
        "jwk_member_invalid"
    );
    assert_eq!(
        reason(jwk(with(ed25519_json(), "kid", json!(7)))),
        "jwk_member_invalid"
    );
    assert_eq!(
        reason(jwk(with(ed25519_json(), "kid", json!("")))),
        "jwk_member_invalid"
    );
    assert_eq!(
        reason(jwk(json!({"crv": "Ed25519", "x": "AA"}))),
        "jwk_missing_member"
    );
    assert_eq!(
        reason(jwk(with(ed25519_json(), "kty", json!("okp")))),
        "jwk_unsupported_kty"
    );
    assert_eq!(
        reason(jwk(with(ed25519_json(), "crv", json!("Ed448")))),
        "jwk_unsupported_curve"
    );
    assert_eq!(
        reason(jwk(with(ed25519_json(), "crv", json!("X25519")))),
        "jwk_unsupported_curve"
    );
    assert_eq!(
        reason(jwk(with(ec_json(), "crv", json!("P-384")))),
        "jwk_unsupported_curve"
    );
    assert_eq!(
        reason(jwk(with(ed25519_json(), "x", json!("AAAA")))),
        "jwk_member_invalid"
    );
    // Padding, the standard alphabet, and non-canonical final bits: refused.
    let x = ed25519_json()["x"].as_str().unwrap().to_owned();
    assert_eq!(
        reason(jwk(with(ed25519_json(), "x", json!(format!("{x}="))))),
        "jwk_member_invalid"
    );
    let std_alphabet = x.replace('_', "/");
    assert_eq!(
        reason(jwk(with(ed25519_json(), "x", json!(std_alphabet)))),
        "jwk_member_invalid"
    );
    // x ends in 'o' (0b101000): the low 2 bits are padding and must be 0.
    assert!(x.ends_with('o'));
    let noncanonical = format!("{}p", &x[..x.len() - 1]);
    assert_eq!(
        reason(jwk(with(ed25519_json(), "x", json!(noncanonical)))),
        "jwk_member_invalid"
    );
    let mut ec = ec_json();
    ec.as_object_mut().unwrap().remove("y");
    assert_eq!(reason(jwk(ec)), "jwk_missing_member");
    let short_secret = json!({"kty": "oct", "k": b64url_encode(&[1; 31])});
    assert_eq!(reason(jwk(short_secret)), "jwk_hmac_key_too_short");
    assert_eq!(
        jwk(json!({"kty": "oct", "k": b64url_encode(&[1; 32])}))
            .unwrap()
            .alg,
        Alg::HS256
    );
}

#[test]
fn malformed_json_is_refused() {
    assert_eq!(reason(Jwk::from_json(b"[]")), "jwk_malformed");
    assert_eq!(reason(Jwk::from_json(b"{")), "jwk_malformed");
    assert_eq!(
        reason(Jwk::from_json(
            br#"{"kty":"OKP","kty":"OKP","crv":"Ed25519","x":"AA"}"#
        )),
        "jwk_duplicate_member"
    );
    let big = vec![b' '; MAX_JWK_BYTES + 1];
    assert_eq!(reason(Jwk::from_json(&big)), "jwk_too_large");
}

fn set(keys: Vec<Value>) -> Vec<u8> {
    json!({ "keys": keys }).to_string().into_bytes()
}

fn named(v: Value, kid: &str) -> Value {
    with(v, "kid", json!(kid))
}

#[test]
fn key_sets() {
    let good = set(vec![
        named(ed25519_json(), "ed"),
        named(ec_json(), "ec"),
        named(rsa_json(), "rsa"),
        named(vector("rfc7515_a1")["jwk"].clone(), "hs"),
        // Not for us, skipped: an encryption key, an RS384 key, an X25519 key.
        named(with(ec_json(), "use", json!("enc")), "enc"),
        named(with(rsa_json(), "alg", json!("RS384")), "rs384"),
        named(with(ed25519_json(), "crv", json!("X25519")), "x25519"),
    ]);
    let keys = KeySet::from_jwks(&good, true).unwrap();
    assert_eq!(keys.len(), 4);
    assert_eq!(keys.kids(), ["ec", "ed", "hs", "rsa"]);
    assert_eq!(keys.get("ed").unwrap().alg, Alg::EdDSA);
    assert_eq!(keys.get("hs").unwrap().alg, Alg::HS256);
    assert!(keys.get("enc").is_none());
    assert_eq!(keys.skipped().len(), 3);
    assert_eq!(keys.skipped()[1].kid.as_deref(), Some("rs384"));
    assert_eq!(keys.skipped()[1].reason.reason(), "jwk_unsupported_alg");

    // HS256 not enabled: the oct key is refused, the others are used.
    let keys = KeySet::from_jwks(&good, false).unwrap();
    assert_eq!(keys.kids(), ["ec", "ed", "rsa"]);
    assert_eq!(keys.skipped()[0].kid.as_deref(), Some("hs"));
    assert_eq!(keys.skipped()[0].reason, JwkError::Hs256Disabled);
    assert!(
        keys.refused("hs").unwrap().contains("allow_hs256"),
        "{:?}",
        keys.refused("hs")
    );
    assert_eq!(keys.refused("ed"), None);
}

/// One key the product refuses never refuses the set: the others load and
/// the refused one is listed with why (a cold start and key rotation go
/// on). Each refusal kind, next to one good key.
#[test]
fn a_refused_key_leaves_the_others_usable() {
    let cases: Vec<(Value, Option<&str>, &str)> = vec![
        (ed25519_json(), None, "jwks_missing_kid"),
        (
            serde_json::from_str(RSA_1024).unwrap(),
            Some("weak-1024"),
            "jwk_rsa_key_too_small",
        ),
        (
            named(serde_json::from_str(RSA_1024).unwrap(), "weak"),
            Some("weak"),
            "jwk_rsa_key_too_small",
        ),
        (
            named(with(ec_json(), "x", json!("AA")), "badx"),
            Some("badx"),
            "jwk_member_invalid",
        ),
        (json!("key"), None, "jwks_malformed"),
        (
            named(json!({"kty": "foo"}), "foo"),
            Some("foo"),
            "jwk_unsupported_kty",
        ),
        (
            named(vector("rfc7515_a1")["jwk"].clone(), "hs"),
            Some("hs"),
            "jwk_hs256_disabled",
        ),
    ];
    for (bad, kid, want) in cases {
        let doc = set(vec![named(ed25519_json(), "good"), bad.clone()]);
        let keys = KeySet::from_jwks(&doc, false).unwrap_or_else(|e| panic!("{bad}: {e}"));
        assert_eq!(keys.kids(), ["good"], "{bad}");
        assert_eq!(keys.skipped().len(), 1, "{bad}");
        let skipped = &keys.skipped()[0];
        assert_eq!(
            (
                skipped.index,
                skipped.kid.as_deref(),
                skipped.reason.reason()
            ),
            (1, kid, want),
            "{bad}"
        );
        if let Some(kid) = kid {
            assert!(keys.refused(kid).is_some());
        }
    }
    // A kid two keys share names neither of them.
    let doc = set(vec![
        named(ed25519_json(), "good"),
        named(ed25519_json(), "twice"),
        named(ec_json(), "twice"),
    ]);
    let keys = KeySet::from_jwks(&doc, false).unwrap();
    assert_eq!(keys.kids(), ["good"]);
    assert_eq!(
        keys.refused("twice")
            .as_deref()
            .map(|r| r.contains("two keys")),
        Some(true)
    );
}

#[test]
fn key_set_refusals() {
    // Sets left without any usable key, and documents that are no JWK set.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (set(vec![ed25519_json()]), "jwks_no_usable_keys"),
        (
            set(vec![named(ed25519_json(), "a"), named(ec_json(), "a")]),
            "jwks_no_usable_keys",
        ),
        (
            set(vec![serde_json::from_str(RSA_1024).unwrap()]),
            "jwks_no_usable_keys",
        ),
        (
            set(vec![named(with(ec_json(), "x", json!("AA")), "a")]),
            "jwks_no_usable_keys",
        ),
        (set(vec![]), "jwks_no_usable_keys"),
        (
            set(vec![named(with(ec_json(), "use", json!("enc")), "a")]),
            "jwks_no_usable_keys",
        ),
        (set(vec![json!("key")]), "jwks_no_usable_keys"),
        (br#"{"kys":[]}"#.to_vec(), "jwks_malformed"),
        (br#"{"keys":{}}"#.to_vec(), "jwks_malformed"),
        (b"[]".to_vec(), "jwk_malformed"),
        (b"".to_vec(), "jwk_malformed"),
        (br#"{"keys":[],"keys":[]}"#.to_vec(), "jwk_duplicate_member"),
        (
            set((0..=MAX_JWKS_KEYS)
                .map(|i| named(ed25519_json(), &i.to_string()))
                .collect()),
            "jwks_too_many_keys",
        ),
        (vec![b' '; MAX_JWKS_BYTES + 1], "jwk_too_large"),
    ];
    for (doc, want) in cases {
        assert_eq!(
            reason(KeySet::from_jwks(&doc, true)),
            want,
            "{}",
            String::from_utf8_lossy(&doc[..doc.len().min(200)])
        );
    }
}

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "portcullis-jwks-{name}-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

#[test]
fn jwks_file_reload_good_bad_good() {
    let path = temp_path("reload");
    fs::write(&path, set(vec![named(ed25519_json(), "one")])).unwrap();
    let file = JwksFile::load(&path, false).unwrap();
    let first = file.current();
    assert_eq!(first.kids(), ["one"]);
    assert_eq!(file.reload_if_changed(), Ok(false));

    // Bad: only an RSA key that is too small. The old set stays; Err
    // says why.
    fs::write(&path, set(vec![serde_json::from_str(RSA_1024).unwrap()])).unwrap();
    let err = file.reload_if_changed().unwrap_err();
    assert_eq!(err.reason(), "jwks_no_usable_keys");
    assert!(Arc::ptr_eq(&file.current(), &first));
    // Reported once; still visible through last_error.
    assert_eq!(file.reload_if_changed(), Ok(false));
    assert_eq!(
        file.last_error().map(|e| e.reason()),
        Some("jwks_no_usable_keys")
    );

    // Rotation with one weak key beside the new one: the new key is used,
    // the weak one is listed as refused.
    fs::write(
        &path,
        set(vec![
            named(ed25519_json(), "rotated"),
            named(serde_json::from_str(RSA_1024).unwrap(), "weak"),
        ]),
    )
    .unwrap();
    assert_eq!(file.reload_if_changed(), Ok(true));
    assert_eq!(file.current().kids(), ["rotated"]);
    assert_eq!(file.current().skipped()[0].kid.as_deref(), Some("weak"));

    // Differently bad: reported again.
    fs::write(&path, b"{\"keys\": [").unwrap();
    assert_eq!(reason(file.reload_if_changed()), "jwk_malformed");
    assert_eq!(file.current().kids(), ["rotated"]);

    // Gone: still the old set.
    fs::remove_file(&path).unwrap();
    assert_eq!(reason(file.reload_if_changed()), "jwks_io");
    assert_eq!(file.reload_if_changed(), Ok(false));
    assert_eq!(file.current().kids(), ["rotated"]);

    // Good again: swapped.
    fs::write(
        &path,
        set(vec![
            named(ed25519_json(), "two"),
            named(ec_json(), "three"),
        ]),
    )
    .unwrap();
    assert_eq!(file.reload_if_changed(), Ok(true));
    assert_eq!(file.current().kids(), ["three", "two"]);
    assert_eq!(file.last_error(), None);
    assert_eq!(file.reload_if_changed(), Ok(false));

    // Same length, same second: the content hash still sees the change.
    let before = fs::read(&path).unwrap();
    let renamed = String::from_utf8(before.clone())
        .unwrap()
        .replace("\"two\"", "\"owt\"");
    assert_eq!(renamed.len(), before.len());
    fs::write(&path, renamed).unwrap();
    assert_eq!(file.reload_if_changed(), Ok(true));
    assert_eq!(file.current().kids(), ["owt", "three"]);
    fs::remove_file(&path).unwrap();
}

#[test]
fn jwks_file_initial_load_must_succeed() {
    let path = temp_path("initial");
    assert_eq!(reason(JwksFile::load(&path, false)), "jwks_io");
    fs::write(&path, b"{}").unwrap();
    assert_eq!(reason(JwksFile::load(&path, false)), "jwks_malformed");
    fs::write(
        &path,
        set(vec![named(vector("rfc7515_a1")["jwk"].clone(), "hs")]),
    )
    .unwrap();
    // Its only key refused: nothing to verify with, so the start stops.
    assert_eq!(reason(JwksFile::load(&path, false)), "jwks_no_usable_keys");
    assert_eq!(JwksFile::load(&path, true).unwrap().current().len(), 1);
    fs::write(&path, vec![b' '; MAX_JWKS_BYTES + 1]).unwrap();
    assert_eq!(reason(JwksFile::load(&path, true)), "jwk_too_large");
    fs::remove_file(&path).unwrap();
    assert_eq!(
        reason(JwksFile::load(Path::new("/dev/zero"), true)),
        "jwks_io"
    );
}

#[test]
fn jwks_file_refuses_a_fifo_without_hanging() {
    let path = temp_path("fifo");
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_eq!(reason(JwksFile::load(&path, false)), "jwks_io");
    fs::remove_file(&path).unwrap();
}

#[test]
fn mtime_is_trusted_only_once_settled() {
    let stamp = |secs: i64, nanos: i64| Stamp {
        dev: 1,
        ino: 2,
        len: 3,
        mtime: (secs, nanos),
    };
    let read_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    assert!(stamp(997, 999_999_999).settled_before(read_at));
    assert!(stamp(998, 0).settled_before(read_at));
    assert!(!stamp(998, 1).settled_before(read_at));
    assert!(!stamp(1_001, 0).settled_before(read_at));
    assert!(!stamp(-5, 0).settled_before(read_at));
    assert!(!stamp(i64::MAX, 0).settled_before(read_at));
    assert!(!stamp(5, -1).settled_before(read_at));
}
