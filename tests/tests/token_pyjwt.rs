//! Interoperability with an independent JOSE implementation: PyJWT with the
//! `cryptography` package generates keys (Ed25519, P-256, RSA-2048, an HMAC
//! secret), writes the JWKS with its own JWK exporter, and mints tokens; the
//! verifier must accept the good ones and refuse every tampered variant with
//! the right reason. The other direction too: PyJWT verifies tokens minted by
//! `portcullis::devtoken`.
//!
//! Needs the project's Python environment with PyJWT and cryptography
//! (`cargo xtask setup` creates `.venv/`). Missing them is a failure, not a skip.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use portcullis_agent::admission::{
    jwk::{Jwk, JwksFile, KeySet},
    token::{TokenPolicy, Verifier},
};
use portcullis_e2e::devtoken::{self, MintClaims};
use serde_json::{Value, json};

const ISS: &str = "https://idp.example.test";
const AUD: &str = "portcullis-interop";

/// Keys, JWKS and tokens made by PyJWT. Printed as one JSON document.
const MINT_PY: &str = r#"
import base64, hashlib, hmac, json, secrets, sys, time
import jwt
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISS, AUD = sys.argv[1], sys.argv[2]
now = int(time.time())
keys = {
    "ed": ed25519.Ed25519PrivateKey.generate(),
    "ed2": ed25519.Ed25519PrivateKey.generate(),
    "ec": ec.generate_private_key(ec.SECP256R1()),
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "hs": secrets.token_bytes(32),
}
algs = {"ed": "EdDSA", "ed2": "EdDSA", "ec": "ES256", "rsa": "RS256", "hs": "HS256"}
exporters = {"ed": OKPAlgorithm, "ed2": OKPAlgorithm, "ec": ECAlgorithm, "rsa": RSAAlgorithm}

def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

def public_jwk(name):
    key = keys[name]
    if name == "hs":
        jwk = json.loads(HMACAlgorithm.to_jwk(key))
    else:
        jwk = json.loads(exporters[name].to_jwk(key.public_key()))
    jwk.update(kid="py-" + name, alg=algs[name], use="sig")
    return jwk

def thumbprint(jwk):
    required = {"OKP": ["crv", "kty", "x"], "EC": ["crv", "kty", "x", "y"],
                "RSA": ["e", "kty", "n"], "oct": ["k", "kty"]}[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in required}, separators=(",", ":"), sort_keys=True)
    return b64(hashlib.sha256(canonical.encode()).digest())

def claims(**changes):
    c = {"iss": ISS, "aud": AUD, "sub": "alice", "client_id": "pyjwt", "iat": now, "nbf": now,
         "exp": now + 300, "jti": secrets.token_urlsafe(16), "scope": "openid model:llm:invoke",
         "roles": ["analyst"], "tenant": "acme"}
    c.update(changes)
    return {name: value for name, value in c.items() if value is not None}

def mint(name, kid=None, headers=None, **changes):
    h = {"kid": kid or "py-" + name, "typ": "at+jwt"}
    h.update(headers or {})
    return jwt.encode(claims(**changes), keys[name], algorithm=algs[name], headers=h)

jwks = {"keys": [public_jwk(n) for n in keys]}
rsa_pem = keys["rsa"].public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

# The classic algorithm confusion (RFC 8725 section 2.1): HS256 "signed" with
# the RSA public key as the shared secret. PyJWT itself refuses to do this, so
# it is assembled by hand.
def hs256_with(secret, kid):
    header = b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "at+jwt"}).encode())
    payload = b64(json.dumps(claims()).encode())
    sig = hmac.new(secret, (header + "." + payload).encode(), hashlib.sha256).digest()
    return header + "." + payload + "." + b64(sig)

weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
weak_jwk = json.loads(RSAAlgorithm.to_jwk(weak.public_key()))
weak_jwk.update(kid="py-weak", alg="RS256", use="sig")

print(json.dumps({
    "jwks": jwks,
    "jwks_without_oct": {"keys": [k for k in jwks["keys"] if k["kty"] != "oct"]},
    "weak_jwks": {"keys": [public_jwk("ed"), weak_jwk]},
    "thumbprints": {k["kid"]: thumbprint(k) for k in jwks["keys"]},
    "valid": {name: mint(name) for name in ["ed", "ec", "rsa", "hs"]},
    "aud_list": mint("ec", aud=["someone-else", AUD]),
    "refused": {
        "alg_none": [jwt.encode(claims(), None, algorithm="none",
                                headers={"kid": "py-ed", "typ": "at+jwt"}), "alg_not_allowed"],
        "hs256_rsa_pem": [hs256_with(rsa_pem, "py-rsa"), "alg_not_allowed"],
        "hs256_rsa_jwk_n": [hs256_with(base64.urlsafe_b64decode(
            public_jwk("rsa")["n"] + "=="), "py-rsa"), "alg_not_allowed"],
        "kid_same_alg": [mint("ed", kid="py-ed2"), "bad_signature"],
        "kid_other_alg": [mint("ed", kid="py-ec"), "alg_not_allowed"],
        "kid_unknown": [mint("ed", kid="py-nope"), "unknown_kid"],
        "typ_jwt": [mint("ed", headers={"typ": "JWT"}), "typ_invalid"],
        "expired": [mint("ed", iat=now - 900, nbf=now - 900, exp=now - 600), "token_expired"],
        "not_yet_valid": [mint("ed", nbf=now + 900, exp=now + 1200), "token_not_yet_valid"],
        "issued_in_future": [mint("rsa", iat=now + 900, nbf=None, exp=now + 1200),
                             "token_issued_in_future"],
        "long_lived": [mint("ec", exp=now + 86400), "token_lifetime_too_long"],
        "wrong_aud": [mint("ed", aud="someone-else"), "audience_mismatch"],
        "wrong_iss": [mint("ed", iss="https://evil.example.test"), "issuer_mismatch"],
        "no_jti": [mint("ed", jti=None), "missing_jti"],
        "empty_sub": [mint("hs", sub=""), "claim_invalid_sub"],
        "bad_scope": [mint("hs", scope="model:*:*"), "scope_invalid"],
    },
}))
"#;

/// Verifies tokens minted in Rust with PyJWT; prints "ok" or the error.
const VERIFY_PY: &str = r#"
import json, sys
import jwt
from jwt.algorithms import OKPAlgorithm
jwks, token, iss, aud = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
header = jwt.get_unverified_header(token)
assert header["typ"] == "at+jwt" and header["alg"] == "EdDSA", header
key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
claims = jwt.decode(token, OKPAlgorithm.from_jwk(json.dumps(key)), algorithms=["EdDSA"],
                    audience=aud, issuer=iss, options={"require": ["exp", "iat", "nbf", "jti", "sub"]})
print(json.dumps(claims))
"#;

fn python_ready() {
    let ok = Command::new(portcullis_testkit::require_python())
        .args(["-c", "import jwt, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the project's Python environment lacks PyJWT or cryptography: \
         run `cargo xtask setup` (it installs them into .venv)"
    );
}

fn python(script: &str, args: &[&str]) -> String {
    python_ready();
    let out = Command::new(portcullis_testkit::python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("python output is UTF-8")
}

/// PyJWT's keys and tokens, made once per test binary.
fn fixture() -> &'static Value {
    static FIXTURE: OnceLock<Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        serde_json::from_str(&python(MINT_PY, &[ISS, AUD])).expect("python printed JSON")
    })
}

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "portcullis-pyjwt-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Loads a JWKS the way the agent does: from a file.
fn load(jwks: &Value, allow_hs256: bool) -> Result<JwksFile, String> {
    let path = temp_path("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let loaded = JwksFile::load(&path, allow_hs256);
    std::fs::remove_file(&path).unwrap();
    loaded.map_err(|e| e.reason().to_owned())
}

fn verifier(jwks: &Value, allow_hs256: bool) -> Verifier {
    let keys = load(jwks, allow_hs256).expect("PyJWT's JWKS loads");
    Verifier::new(TokenPolicy::new(ISS, AUD), Arc::new(keys))
}

fn reason(verifier: &Verifier, token: &str) -> String {
    match verifier.verify(token, SystemTime::now()) {
        Ok(claims) => format!("accepted {claims:?}"),
        Err(e) => e.reason().to_owned(),
    }
}

#[test]
fn pyjwt_jwks_loads_with_matching_thumbprints() {
    let fx = fixture();
    let keys = load(&fx["jwks"], true).unwrap().current();
    assert_eq!(keys.kids(), ["py-ec", "py-ed", "py-ed2", "py-hs", "py-rsa"]);
    assert!(keys.skipped().is_empty());
    for (kid, thumbprint) in fx["thumbprints"].as_object().unwrap() {
        assert_eq!(
            keys.get(kid).unwrap().thumbprint(),
            thumbprint.as_str().unwrap(),
            "RFC 7638 thumbprint of {kid}"
        );
    }
    assert_eq!(keys.get("py-rsa").unwrap().rsa_bits(), Some(2048));
}

#[test]
fn pyjwt_tokens_for_each_alg_are_accepted() {
    let fx = fixture();
    let verifier = verifier(&fx["jwks"], true);
    for alg in ["ed", "ec", "rsa", "hs"] {
        let token = fx["valid"][alg].as_str().unwrap();
        let claims = verifier
            .verify(token, SystemTime::now())
            .unwrap_or_else(|e| panic!("{alg}: {} ({e})", e.reason()));
        assert_eq!(claims.subject, "alice");
        assert_eq!(claims.tenant.as_deref(), Some("acme"));
        assert_eq!(claims.roles, ["analyst"]);
        assert!(claims.allows("llm", "invoke"), "{alg}");
        assert!(!claims.allows("llm", "retrain"), "{alg}");
        // Again: from the cache, the same claims.
        let again = verifier.verify(token, SystemTime::now()).unwrap();
        assert!(Arc::ptr_eq(&claims, &again));
    }
    verifier
        .verify(fx["aud_list"].as_str().unwrap(), SystemTime::now())
        .unwrap();
}

#[test]
fn pyjwt_made_bad_tokens_are_refused() {
    let fx = fixture();
    let verifier = verifier(&fx["jwks"], true);
    for (name, case) in fx["refused"].as_object().unwrap() {
        let token = case[0].as_str().unwrap();
        let want = case[1].as_str().unwrap();
        assert_eq!(reason(&verifier, token), want, "{name}: {token}");
    }
}

/// Header, payload and signature segments of a token.
fn segments(token: &str) -> (String, String, String) {
    let mut parts = token.split('.').map(str::to_owned);
    let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("not a JWS: {token}")
    };
    (h, p, s)
}

fn decode_json(segment: &str) -> Value {
    serde_json::from_slice(&B64.decode(segment).unwrap()).unwrap()
}

fn encode_json(v: &Value) -> String {
    B64.encode(v.to_string())
}

#[test]
fn tampered_pyjwt_tokens_are_refused() {
    let fx = fixture();
    let verifier = verifier(&fx["jwks"], true);
    for alg in ["ed", "ec", "rsa", "hs"] {
        let token = fx["valid"][alg].as_str().unwrap();
        let (h, p, s) = segments(token);
        let mut cases: Vec<(&str, String, &str)> = Vec::new();

        // One payload byte flipped.
        let mut payload = B64.decode(&p).unwrap();
        let at = payload.iter().position(|&b| b == b'a').unwrap();
        payload[at] = b'b';
        cases.push((
            "payload byte",
            format!("{h}.{}.{s}", B64.encode(&payload)),
            "bad_signature",
        ));
        // One signature byte flipped.
        let mut sig = B64.decode(&s).unwrap();
        let middle = sig.len() / 2;
        sig[middle] ^= 0x01;
        cases.push((
            "signature byte",
            format!("{h}.{p}.{}", B64.encode(&sig)),
            "bad_signature",
        ));

        // Header rewrites, keeping the original signature.
        let header = decode_json(&h);
        let rewrite = |field: &str, value: Value| {
            let mut hd = header.clone();
            hd[field] = value;
            encode_json(&hd)
        };
        cases.push((
            "alg none, signature kept",
            format!("{}.{p}.{s}", rewrite("alg", json!("none"))),
            "alg_not_allowed",
        ));
        cases.push((
            "alg none, no signature",
            format!("{}.{p}.", rewrite("alg", json!("none"))),
            "alg_not_allowed",
        ));
        let switched = if alg == "hs" { "RS256" } else { "HS256" };
        cases.push((
            "alg switched",
            format!("{}.{p}.{s}", rewrite("alg", json!(switched))),
            "alg_not_allowed",
        ));
        let (other_kid, want) = match alg {
            "ed" => ("py-ed2", "bad_signature"),
            _ => ("py-ed", "alg_not_allowed"),
        };
        cases.push((
            "kid swapped",
            format!("{}.{p}.{s}", rewrite("kid", json!(other_kid))),
            want,
        ));
        cases.push((
            "kid unknown",
            format!("{}.{p}.{s}", rewrite("kid", json!("py-zz"))),
            "unknown_kid",
        ));
        cases.push((
            "typ JWT",
            format!("{}.{p}.{s}", rewrite("typ", json!("JWT"))),
            "typ_invalid",
        ));
        // Cut at a 4-character boundary of the signature so what is left
        // still decodes: a signature that is too short.
        let cut = s.len() % 4 + 4;
        cases.push((
            "truncated",
            token[..token.len() - cut].to_owned(),
            "token_truncated",
        ));
        cases.push((
            "two segments",
            format!("{h}.{p}"),
            "token_not_three_segments",
        ));
        cases.push(("padded", format!("{h}.{p}.{s}=="), "token_bad_base64"));

        for (what, bad, want) in cases {
            assert_eq!(reason(&verifier, &bad), want, "{alg}: {what}: {bad}");
        }
    }
}

#[test]
fn hs256_needs_a_configured_secret() {
    let fx = fixture();
    // A JWKS with an oct key loads without it unless HS256 is enabled, and
    // a token naming it says the key was refused.
    let refusing = verifier(&fx["jwks"], false);
    let hs = fx["valid"]["hs"].as_str().unwrap();
    assert_eq!(reason(&refusing, hs), "key_refused");
    let err = refusing.verify(hs, SystemTime::now()).unwrap_err();
    assert!(err.to_string().contains("allow_hs256 = false"), "{err}");
    // Without one, HS256 tokens have nothing to verify against, and the
    // confusion attack still fails on the RSA key's one algorithm.
    let verifier = verifier(&fx["jwks_without_oct"], false);
    assert_eq!(
        reason(&verifier, fx["valid"]["hs"].as_str().unwrap()),
        "unknown_kid"
    );
    let confused = fx["refused"]["hs256_rsa_pem"][0].as_str().unwrap();
    assert_eq!(reason(&verifier, confused), "alg_not_allowed");
    verifier
        .verify(fx["valid"]["rsa"].as_str().unwrap(), SystemTime::now())
        .unwrap();
}

#[test]
fn weak_rsa_key_is_refused() {
    let fx = fixture();
    // The weak key is refused; the set's other key is used.
    let file = load(&fx["weak_jwks"], false).unwrap();
    let set = file.current();
    assert_eq!(set.len(), 1);
    assert_eq!(set.skipped()[0].reason.reason(), "jwk_rsa_key_too_small");
    let weak = &fx["weak_jwks"]["keys"][1];
    let err = Jwk::from_json(weak.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.reason(), "jwk_rsa_key_too_small");
    // Alone, it leaves nothing to verify with.
    let alone = serde_json::json!({"keys": [weak]});
    assert!(KeySet::from_jwks(alone.to_string().as_bytes(), false).is_err());
}

#[test]
fn devtoken_mints_what_pyjwt_accepts() {
    let dir = temp_path("devtoken");
    let out = devtoken::keygen(&dir).unwrap();
    let claims = MintClaims {
        issuer: ISS.into(),
        audience: AUD.into(),
        subject: "bob".into(),
        tenant: Some("globex".into()),
        client_id: None,
        roles: vec!["admin".into()],
        scopes: vec!["model:*:read".into()],
        ttl: Duration::from_secs(120),
        cnf_jkt: None,
    };
    let token = devtoken::mint(&out.key_path, claims).unwrap();
    let jwks = std::fs::read_to_string(&out.jwks_path).unwrap();
    let verified: Value =
        serde_json::from_str(&python(VERIFY_PY, &[&jwks, &token, ISS, AUD])).unwrap();
    assert_eq!(verified["sub"], "bob");
    assert_eq!(verified["scope"], "model:*:read");
    assert_eq!(verified["tenant"], "globex");
    assert_eq!(
        verified["exp"].as_u64().unwrap() - verified["iat"].as_u64().unwrap(),
        120
    );
    // And our own verifier agrees.
    let keys = JwksFile::load(&out.jwks_path, false).unwrap();
    let ours = Verifier::new(TokenPolicy::new(ISS, AUD), Arc::new(keys));
    assert!(
        ours.verify(&token, SystemTime::now())
            .unwrap()
            .allows("any", "read")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
