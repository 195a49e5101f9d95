//! Token verification tests: one per refusal (asserting the exact reason),
//! the happy paths for each algorithm, the cache and revocation.

use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};

use ring::rand::SystemRandom;
use ring::rsa::{KeyPairComponents, PublicKeyComponents};
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use serde_json::json;

use super::*;

const VECTORS: &str = include_str!("../../../tests/fixtures/rfc_jws_vectors.json");
const ISS: &str = "https://idp.example";
const AUD: &str = "portcullis";
/// 2027-01-15T08:00:00Z.
const NOW: u64 = 1_800_000_000;

fn now() -> SystemTime {
    at(NOW)
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

enum Key {
    Ed(Ed25519KeyPair),
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    Hmac(Vec<u8>),
}

/// A test signer (ring) with its public JWK.
struct Signer {
    kid: String,
    alg: Alg,
    key: Key,
}

impl Signer {
    fn ed(kid: &str) -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Signer {
            kid: kid.into(),
            alg: Alg::EdDSA,
            key: Key::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()),
        }
    }

    fn ec(kid: &str) -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Signer {
            kid: kid.into(),
            alg: Alg::ES256,
            key: Key::Ec(pair),
        }
    }

    /// The RFC 7515 A.2 key: a real 2048-bit RSA key with published private
    /// components.
    fn rsa(kid: &str) -> Signer {
        let v: Value = serde_json::from_str(VECTORS).unwrap();
        let v = &v["rfc7515_a2"];
        let b = |s: &Value| jwk::b64url_decode(s.as_str().unwrap()).unwrap();
        let p = &v["private"];
        let pair = RsaKeyPair::from_components(&KeyPairComponents {
            public_key: PublicKeyComponents {
                n: b(&v["jwk"]["n"]),
                e: b(&v["jwk"]["e"]),
            },
            d: b(&p["d"]),
            p: b(&p["p"]),
            q: b(&p["q"]),
            dP: b(&p["dp"]),
            dQ: b(&p["dq"]),
            qInv: b(&p["qi"]),
        })
        .unwrap();
        Signer {
            kid: kid.into(),
            alg: Alg::RS256,
            key: Key::Rsa(pair),
        }
    }

    fn hmac(kid: &str, secret: &[u8]) -> Signer {
        Signer {
            kid: kid.into(),
            alg: Alg::HS256,
            key: Key::Hmac(secret.to_vec()),
        }
    }

    fn jwk(&self) -> Value {
        let mut v = match &self.key {
            Key::Ed(pair) => json!({
                "kty": "OKP", "crv": "Ed25519",
                "x": jwk::b64url_encode(pair.public_key().as_ref()),
            }),
            Key::Ec(pair) => {
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "crv": "P-256",
                    "x": jwk::b64url_encode(&point[1..33]),
                    "y": jwk::b64url_encode(&point[33..]),
                })
            }
            Key::Rsa(pair) => {
                let public: PublicKeyComponents<Vec<u8>> = pair.public().into();
                json!({
                    "kty": "RSA",
                    "n": jwk::b64url_encode(&public.n),
                    "e": jwk::b64url_encode(&public.e),
                })
            }
            Key::Hmac(secret) => json!({"kty": "oct", "k": jwk::b64url_encode(secret)}),
        };
        v["kid"] = json!(self.kid);
        v["alg"] = json!(self.alg.as_str());
        v
    }

    fn signature(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            Key::Ed(pair) => pair.sign(input).as_ref().to_vec(),
            Key::Ec(pair) => pair.sign(&rng, input).unwrap().as_ref().to_vec(),
            Key::Rsa(pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, input, &mut sig).unwrap();
                sig
            }
            Key::Hmac(secret) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                ring::hmac::sign(&key, input).as_ref().to_vec()
            }
        }
    }

    /// The usual header for this key.
    fn header(&self) -> Value {
        json!({"alg": self.alg.as_str(), "typ": "at+jwt", "kid": self.kid})
    }

    /// Signs raw header and payload bytes (so tests can write any JSON).
    fn sign_raw(&self, header: &[u8], payload: &[u8]) -> String {
        let input = format!(
            "{}.{}",
            jwk::b64url_encode(header),
            jwk::b64url_encode(payload)
        );
        let sig = self.signature(input.as_bytes());
        format!("{input}.{}", jwk::b64url_encode(&sig))
    }

    fn sign(&self, header: &Value, payload: &Value) -> String {
        self.sign_raw(
            header.to_string().as_bytes(),
            payload.to_string().as_bytes(),
        )
    }

    /// A good token with these claim changes (`null` removes a claim).
    fn token(&self, changes: Value) -> String {
        self.sign(&self.header(), &payload(changes))
    }
}

/// A good claim set at [`NOW`], with `changes` applied (`null` removes).
fn payload(changes: Value) -> Value {
    static JTI: AtomicUsize = AtomicUsize::new(0);
    let mut claims = json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "client_id": "cli",
        "iat": NOW - 60,
        "nbf": NOW - 60,
        "exp": NOW + 600,
        "jti": format!("jti-{}", JTI.fetch_add(1, Ordering::Relaxed)),
        "scope": "openid model:llm:invoke",
        "roles": ["analyst"],
        "tenant": "acme",
    });
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

struct Env {
    ed: Signer,
    ec: Signer,
    rsa: Signer,
    hs: Signer,
    verifier: Verifier,
}

fn key_set(signers: &[&Signer]) -> KeySet {
    let keys: Vec<Value> = signers.iter().map(|s| s.jwk()).collect();
    KeySet::from_jwks(json!({ "keys": keys }).to_string().as_bytes(), true).unwrap()
}

fn env_with(edit: impl FnOnce(&mut TokenPolicy)) -> Env {
    let ed = Signer::ed("ed-1");
    let ec = Signer::ec("ec-1");
    let rsa = Signer::rsa("rsa-1");
    let hs = Signer::hmac("hs-1", b"a shared secret of at least 32 bytes!");
    let keys = Arc::new(JwksFile::fixed(key_set(&[&ed, &ec, &rsa, &hs])));
    let mut policy = TokenPolicy::new(ISS, AUD);
    edit(&mut policy);
    Env {
        ed,
        ec,
        rsa,
        hs,
        verifier: Verifier::new(policy, keys),
    }
}

fn env() -> Env {
    env_with(|_| {})
}

impl Env {
    fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        self.verifier.verify(token, now())
    }

    #[track_caller]
    fn refuses(&self, token: &str, reason: &str) {
        match self.verify(token) {
            Ok(claims) => panic!("accepted, expected {reason}: {claims:?}"),
            Err(e) => assert_eq!(e.reason(), reason, "{e}"),
        }
    }

    #[track_caller]
    fn refuses_claims(&self, changes: Value, reason: &str) {
        self.refuses(&self.ed.token(changes), reason);
    }
}

fn b64(s: &str) -> String {
    jwk::b64url_encode(s.as_bytes())
}

#[test]
fn verifier_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Verifier>();
    check::<Arc<Claims>>();
}

#[test]
fn happy_path_each_algorithm() {
    let env = env();
    for signer in [&env.ed, &env.ec, &env.rsa, &env.hs] {
        let token = signer.token(json!({}));
        let claims = env
            .verify(&token)
            .unwrap_or_else(|e| panic!("{:?}: {e}", signer.alg));
        assert_eq!(claims.subject, "alice");
        assert_eq!(claims.issuer, ISS);
        assert_eq!(claims.tenant.as_deref(), Some("acme"));
        assert_eq!(claims.roles, ["analyst"]);
        assert_eq!(
            claims.scopes,
            [Scope {
                service: Some("llm".into()),
                action: "invoke".into()
            }]
        );
        assert_eq!(claims.issued_at, at(NOW - 60));
        assert_eq!(claims.not_before, Some(at(NOW - 60)));
        assert_eq!(claims.expires_at, at(NOW + 600));
        assert_eq!(claims.token_hash, jwk::sha256(token.as_bytes()));
        assert_eq!(claims.jti_hash(), jwk::sha256(claims.jti.as_bytes()));
        assert!(claims.allows("llm", "invoke"));
        assert!(!claims.allows("llm", "retrain"));
        assert!(!claims.allows("other", "invoke"));
    }
}

#[test]
fn claims_mapping() {
    let env = env_with(|p| p.tenant_claim = Some("org".into()));
    let claims = env
        .verify(&env.ed.token(json!({
            "scope": "model:*:invoke model:llm:read openid",
            "scp": ["model:llm:read", "model:emb:retrain", "email"],
            "roles": ["a", "b", "a"],
            "org": "globex",
            "tenant": 7,
            "aud": ["other", AUD],
            "nbf": null,
            "exp": NOW as f64 + 0.5,
        })))
        .unwrap();
    assert_eq!(claims.tenant.as_deref(), Some("globex"));
    assert_eq!(claims.roles, ["a", "b"]);
    let scopes: Vec<String> = claims.scopes.iter().map(Scope::to_string).collect();
    assert_eq!(
        scopes,
        ["model:*:invoke", "model:llm:read", "model:emb:retrain"]
    );
    assert!(claims.allows("anything", "invoke"));
    assert!(claims.allows("emb", "retrain"));
    assert!(!claims.allows("llm", "retrain"));
    assert_eq!(claims.not_before, None);
    assert_eq!(claims.expires_at, at(NOW) + Duration::from_millis(500));
    let none = env
        .verify(
            &env.ed
                .token(json!({"scope": null, "roles": null, "org": "g"})),
        )
        .unwrap();
    assert!(none.scopes.is_empty() && none.roles.is_empty());
}

/// With a tenant claim configured, a token without it is refused unless a
/// default tenant is configured; `tenant_claim = ""` (None) turns tenants
/// off and ignores the claim.
#[test]
fn tenant_claim_is_required_unless_defaulted_or_off() {
    let env = env();
    env.refuses_claims(json!({"tenant": null}), "missing_tenant");
    let e = env
        .verify(&env.ed.token(json!({"tenant": null})))
        .unwrap_err();
    assert!(e.to_string().contains("tokens.default_tenant"), "{e}");
    let defaulted = env_with(|p| p.default_tenant = Some("shared".into()));
    let c = defaulted
        .verify(&defaulted.ed.token(json!({"tenant": null})))
        .unwrap();
    assert_eq!(c.tenant.as_deref(), Some("shared"));
    let c = defaulted.verify(&defaulted.ed.token(json!({}))).unwrap();
    assert_eq!(
        c.tenant.as_deref(),
        Some("acme"),
        "a claim wins over the default"
    );
    defaulted.refuses_claims(json!({"tenant": 3}), "claim_invalid_tenant");
    let off = env_with(|p| p.tenant_claim = None);
    let c = off.verify(&off.ed.token(json!({"tenant": 3}))).unwrap();
    assert_eq!(c.tenant, None);
}

/// RFC 9068 §2.2: client_id is REQUIRED, with an explicit opt-out.
#[test]
fn client_id_is_required_unless_opted_out() {
    let env = env();
    env.refuses_claims(json!({"client_id": null}), "missing_client_id");
    env.refuses_claims(json!({"client_id": ""}), "claim_invalid_client_id");
    env.refuses_claims(json!({"client_id": 42}), "claim_invalid_client_id");
    let c = env.verify(&env.ed.token(json!({}))).unwrap();
    assert_eq!(c.client_id.as_deref(), Some("cli"));
    let lax = env_with(|p| p.require_client_id = false);
    let c = lax
        .verify(&lax.ed.token(json!({"client_id": null})))
        .unwrap();
    assert_eq!(c.client_id, None);
    lax.refuses_claims(json!({"client_id": 42}), "claim_invalid_client_id");
}

/// A token naming a key the JWKS holds but the product refused says so
/// (`key_refused`, with why), not "unknown kid".
#[test]
fn a_refused_key_is_named_as_refused() {
    let ed = Signer::ed("ed-1");
    let hs = Signer::hmac("hs-1", b"a shared secret of at least 32 bytes!");
    let doc = serde_json::json!({"keys": [ed.jwk(), hs.jwk()]});
    let set = KeySet::from_jwks(doc.to_string().as_bytes(), false).unwrap();
    let verifier = Verifier::new(TokenPolicy::new(ISS, AUD), Arc::new(JwksFile::fixed(set)));
    let e = verifier.verify(&hs.token(json!({})), now()).unwrap_err();
    assert_eq!(e.reason(), "key_refused", "{e}");
    assert!(e.to_string().contains("allow_hs256 = false"), "{e}");
    let e = verifier
        .verify(&Signer::ed("other").token(json!({})), now())
        .unwrap_err();
    assert_eq!(e.reason(), "unknown_kid");
    verifier.verify(&ed.token(json!({})), now()).unwrap();
}

/// `id:` revocations: one identity (a subject in one tenant), not the
/// subject elsewhere.
#[test]
fn identity_revocation_is_per_tenant() {
    let env = env();
    env.verifier
        .revoke_identity(&crate::identity::IdentityName::new(Some("acme"), "alice"));
    env.refuses_claims(json!({}), "identity_revoked");
    env.verify(&env.ed.token(json!({"tenant": "globex"})))
        .unwrap();
    env.verifier
        .unrevoke_identity(&crate::identity::IdentityName::new(Some("acme"), "alice"));
    env.verify(&env.ed.token(json!({}))).unwrap();
}

#[test]
fn scope_allows() {
    let wild = Scope {
        service: None,
        action: "invoke".into(),
    };
    assert!(wild.allows("llm", "invoke"));
    assert!(!wild.allows("llm", "read"));
    let one = Scope {
        service: Some("llm".into()),
        action: "read".into(),
    };
    assert!(one.allows("llm", "read"));
    assert!(!one.allows("llm2", "read"));
}

#[test]
fn cnf_claims() {
    let env = env();
    let jkt = jwk::b64url_encode(&[9; 32]);
    let claims = env
        .verify(&env.ed.token(json!({"cnf": {"jkt": jkt}})))
        .unwrap();
    assert_eq!(claims.cnf, Some(Confirmation::Jkt(jkt)));
    let mut pop = env.ec.jwk();
    pop.as_object_mut().unwrap().remove("kid");
    let claims = env
        .verify(&env.ed.token(json!({"cnf": {"jwk": pop}})))
        .unwrap();
    let Some(Confirmation::Jwk(key)) = &claims.cnf else {
        panic!("{:?}", claims.cnf)
    };
    assert_eq!(key.alg, Alg::ES256);

    env.refuses_claims(json!({"cnf": {"jkt": "abc"}}), "cnf_invalid");
    env.refuses_claims(json!({"cnf": {"jkt": 5}}), "cnf_invalid");
    env.refuses_claims(json!({"cnf": {}}), "cnf_invalid");
    env.refuses_claims(json!({"cnf": "x"}), "cnf_invalid");
    env.refuses_claims(
        json!({"cnf": {"jkt": jwk::b64url_encode(&[9; 32]), "jwk": env.ec.jwk()}}),
        "cnf_invalid",
    );
    env.refuses_claims(json!({"cnf": {"jwk": env.hs.jwk()}}), "cnf_invalid");
    env.refuses_claims(json!({"cnf": {"jwk": {"kty": "EC"}}}), "cnf_invalid");
    let mut private = env.ed.jwk();
    private["d"] = json!(jwk::b64url_encode(&[1; 32]));
    env.refuses_claims(json!({"cnf": {"jwk": private}}), "cnf_invalid");
    env.refuses_claims(json!({"cnf": {"x5t#S256": "abc"}}), "cnf_unsupported");
    env.refuses_claims(json!({"cnf": {"kid": "k"}}), "cnf_unsupported");
}

#[test]
fn size_and_segments() {
    let env = env();
    let good = env.ed.token(json!({}));
    let huge = format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES));
    env.refuses(&huge, "token_too_large");
    env.refuses("", "token_truncated");
    env.refuses("abc", "token_not_three_segments");
    env.refuses("a.b", "token_not_three_segments");
    env.refuses(&format!("{good}.x"), "token_not_three_segments");
    env.refuses("a.b.c.d.e", "token_not_three_segments");
    let (header, rest) = good.split_once('.').unwrap();
    let (payload, _) = rest.split_once('.').unwrap();
    env.refuses(&format!(".{payload}.sig"), "token_truncated");
    env.refuses(&format!("{header}..sig"), "token_truncated");
    env.refuses(&format!("{header}.{payload}."), "token_truncated");
    // A signature cut short (at a 4-character boundary: 63 of 64 bytes).
    env.refuses(&good[..good.len() - 2], "token_truncated");
}

#[test]
fn base64url_rules() {
    let env = env();
    let good = env.ed.token(json!({}));
    let (header, rest) = good.split_once('.').unwrap();
    let (payload, sig) = rest.split_once('.').unwrap();
    // Padding, the standard alphabet, whitespace, junk.
    env.refuses(&format!("{header}=.{payload}.{sig}"), "token_bad_base64");
    let std_sig = sig.replace('-', "+").replace('_', "/");
    if std_sig != sig {
        env.refuses(&format!("{header}.{payload}.{std_sig}"), "token_bad_base64");
    }
    env.refuses(&format!("{header}.{payload}.{sig}/"), "token_bad_base64");
    env.refuses(&format!("{header} .{payload}.{sig}"), "token_bad_base64");
    env.refuses(&format!("{header}.{payload}.{sig}AAA"), "token_bad_base64");
    // Non-canonical final bits. An Ed25519 signature is 64 bytes = 86
    // characters, the last holding 2 data bits and 4 zero bits.
    assert_eq!(sig.len(), 86);
    let last = sig.as_bytes()[85];
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let index = alphabet.iter().position(|&c| c == last).unwrap();
    assert_eq!(index & 0xf, 0);
    let bumped = alphabet[index + 1] as char;
    env.refuses(
        &format!("{header}.{payload}.{}{bumped}", &sig[..85]),
        "token_bad_base64",
    );
    // A header padded to leave spare bits, re-encoded non-canonically.
    let h = format!("{} ", env.ed.header());
    let mut h = h;
    while h.len() % 3 != 1 {
        h.push(' ');
    }
    let enc = b64(&h);
    let last = enc.as_bytes()[enc.len() - 1];
    let index = alphabet.iter().position(|&c| c == last).unwrap();
    let odd = format!("{}{}", &enc[..enc.len() - 1], alphabet[index + 1] as char);
    env.refuses(&format!("{odd}.{payload}.{sig}"), "token_bad_base64");
    // Invalid UTF-8 is not JSON either.
    let latin1 = jwk::b64url_encode(b"{\"alg\":\"EdDSA\xff\"}");
    env.refuses(
        &format!("{latin1}.{payload}.{sig}"),
        "header_not_json_object",
    );
}

#[test]
fn header_and_payload_must_be_objects() {
    let env = env();
    let payload = payload(json!({})).to_string();
    for header in [
        "[1]",
        "\"at+jwt\"",
        "null",
        "not json",
        "{\"alg\":\"EdDSA\"",
    ] {
        env.refuses(
            &env.ed.sign_raw(header.as_bytes(), payload.as_bytes()),
            "header_not_json_object",
        );
    }
    let header = env.ed.header().to_string();
    for body in ["[]", "42", "{\"sub\":\"a\"", "{} {}"] {
        env.refuses(
            &env.ed.sign_raw(header.as_bytes(), body.as_bytes()),
            "payload_not_json_object",
        );
    }
    let deep = format!(r#"{{"sub":"a","x":{}1{}}}"#, "[".repeat(40), "]".repeat(40));
    env.refuses(
        &env.ed.sign_raw(header.as_bytes(), deep.as_bytes()),
        "json_too_deep",
    );
}

#[test]
fn duplicates_are_refused() {
    let env = env();
    let payload = payload(json!({})).to_string();
    let header = format!(
        r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{}","alg":"EdDSA"}}"#,
        env.ed.kid
    );
    env.refuses(
        &env.ed.sign_raw(header.as_bytes(), payload.as_bytes()),
        "duplicate_header_parameter",
    );
    // The classic: one parser sees the first "sub", another the last.
    let body = format!(
        r#"{{"sub":"alice",{},"sub":"admin"}}"#,
        &payload[1..payload.len() - 1]
    );
    env.refuses(
        &env.ed
            .sign_raw(env.ed.header().to_string().as_bytes(), body.as_bytes()),
        "duplicate_claim",
    );
}

#[test]
fn header_rules() {
    let env = env();
    let p = payload(json!({}));
    let kid = env.ed.kid.clone();
    let cases = [
        (json!({"typ": "at+jwt", "kid": kid}), "missing_alg"),
        (
            json!({"alg": 5, "typ": "at+jwt", "kid": kid}),
            "header_parameter_invalid",
        ),
        (json!({"alg": "EdDSA", "typ": "at+jwt"}), "missing_kid"),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": 1}),
            "header_parameter_invalid",
        ),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "nope"}),
            "unknown_kid",
        ),
        (
            json!({"alg": "none", "typ": "at+jwt", "kid": kid}),
            "alg_not_allowed",
        ),
        (
            json!({"alg": "NONE", "typ": "at+jwt", "kid": kid}),
            "alg_not_allowed",
        ),
        (
            json!({"alg": "RS384", "typ": "at+jwt", "kid": kid}),
            "alg_not_allowed",
        ),
        (
            json!({"alg": "eddsa", "typ": "at+jwt", "kid": kid}),
            "alg_not_allowed",
        ),
        (
            json!({"alg": "ES256", "typ": "at+jwt", "kid": kid}),
            "alg_not_allowed",
        ),
        (
            json!({"alg": "HS256", "typ": "at+jwt", "kid": kid}),
            "alg_not_allowed",
        ),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid, "crit": ["exp"], "exp": 1}),
            "crit_unsupported",
        ),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid, "crit": []}),
            "crit_unsupported",
        ),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid, "crit": "b64"}),
            "crit_unsupported",
        ),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid, "b64": false}),
            "header_parameter_invalid",
        ),
        (json!({"alg": "EdDSA", "kid": kid}), "typ_invalid"),
        (
            json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}),
            "typ_invalid",
        ),
        (
            json!({"alg": "EdDSA", "typ": "at+jwt+x", "kid": kid}),
            "typ_invalid",
        ),
        (
            json!({"alg": "EdDSA", "typ": ["at+jwt"], "kid": kid}),
            "typ_invalid",
        ),
    ];
    for (header, reason) in cases {
        env.refuses(&env.ed.sign(&header, &p), reason);
    }
    for typ in [
        "at+jwt",
        "AT+JWT",
        "application/at+jwt",
        "Application/At+JWT",
    ] {
        let header = json!({"alg": "EdDSA", "typ": typ, "kid": kid});
        env.verify(&env.ed.sign(&header, &payload(json!({}))))
            .unwrap();
    }
    // Unknown header parameters (and embedded keys) are ignored, never used.
    let header = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid, "x-y": 1,
        "jwk": env.ec.jwk(), "jku": "https://evil.example/jwks"});
    env.verify(&env.ed.sign(&header, &payload(json!({}))))
        .unwrap();
}

#[test]
fn typ_is_a_policy_flag() {
    let env = env_with(|p| p.require_typ = false);
    let kid = env.ed.kid.clone();
    for header in [
        json!({"alg": "EdDSA", "kid": kid}),
        json!({"alg": "EdDSA", "kid": kid, "typ": "JWT"}),
    ] {
        env.verify(&env.ed.sign(&header, &payload(json!({}))))
            .unwrap();
    }
}

#[test]
fn algorithm_confusion_is_refused() {
    let env = env();
    let p = payload(json!({}));
    // HS256 "signed" with the RSA public key (as its JWK JSON, its modulus,
    // and its PEM-ish text): the RSA key only verifies RS256.
    let rsa_public = env.rsa.jwk();
    let secrets = [
        rsa_public.to_string().into_bytes(),
        jwk::b64url_decode(rsa_public["n"].as_str().unwrap()).unwrap(),
    ];
    for secret in secrets {
        let forger = Signer::hmac(&env.rsa.kid, &secret);
        env.refuses(&forger.token(json!({})), "alg_not_allowed");
    }
    // Swapping kids between keys of different algorithms.
    let header = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": env.ec.kid});
    env.refuses(&env.ed.sign(&header, &p), "alg_not_allowed");
    let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": env.ec.kid});
    env.refuses(&env.ed.sign(&header, &p), "bad_signature");
    // HS256 is off unless a shared secret is configured: without an oct key
    // in the set there is nothing HS256 could verify with.
    let keys = JwksFile::fixed(key_set(&[&env.ed, &env.rsa]));
    let strict = Verifier::new(TokenPolicy::new(ISS, AUD), Arc::new(keys));
    let forged = Signer::hmac(&env.ed.kid, b"whatever secret, 32 bytes or more!!").token(json!({}));
    assert_eq!(
        strict.verify(&forged, now()).unwrap_err().reason(),
        "alg_not_allowed"
    );
    assert_eq!(
        strict
            .verify(&env.hs.token(json!({})), now())
            .unwrap_err()
            .reason(),
        "unknown_kid"
    );
}

#[test]
fn signature_is_checked() {
    let env = env();
    for signer in [&env.ed, &env.ec, &env.rsa, &env.hs] {
        let token = signer.token(json!({}));
        let (input, sig) = token.rsplit_once('.').unwrap();
        let mut bytes = jwk::b64url_decode(sig).unwrap();
        bytes[5] ^= 0x20;
        env.refuses(
            &format!("{input}.{}", jwk::b64url_encode(&bytes)),
            "bad_signature",
        );
        // A longer signature is not a truncated one.
        bytes[5] ^= 0x20;
        bytes.push(0);
        env.refuses(
            &format!("{input}.{}", jwk::b64url_encode(&bytes)),
            "bad_signature",
        );
        // A payload changed after signing.
        let (header, payload) = input.split_once('.').unwrap();
        let forged = b64(&payload_text_with_sub(payload, "admin"));
        env.refuses(&format!("{header}.{forged}.{sig}"), "bad_signature");
    }
    // Another key with the same algorithm and kid.
    let impostor = Signer::ed(&env.ed.kid);
    env.refuses(&impostor.token(json!({})), "bad_signature");
}

fn payload_text_with_sub(payload_b64: &str, sub: &str) -> String {
    let bytes = jwk::b64url_decode(payload_b64).unwrap();
    let mut v: Value = serde_json::from_slice(&bytes).unwrap();
    v["sub"] = json!(sub);
    v.to_string()
}

#[test]
fn issuer_and_audience() {
    let env = env();
    env.refuses_claims(json!({"iss": "https://evil.example"}), "issuer_mismatch");
    env.refuses_claims(json!({"iss": "https://IDP.example"}), "issuer_mismatch");
    env.refuses_claims(json!({"iss": null}), "missing_iss");
    env.refuses_claims(json!({"iss": 1}), "claim_invalid_iss");
    env.refuses_claims(json!({"aud": "someone-else"}), "audience_mismatch");
    env.refuses_claims(json!({"aud": ["a", "b"]}), "audience_mismatch");
    env.refuses_claims(json!({"aud": []}), "audience_mismatch");
    env.refuses_claims(json!({"aud": [AUD, 1]}), "claim_invalid_aud");
    env.refuses_claims(json!({"aud": {"x": AUD}}), "claim_invalid_aud");
    env.refuses_claims(json!({"aud": null}), "missing_aud");
    env.verify(&env.ed.token(json!({"aud": [AUD]}))).unwrap();
}

#[test]
fn required_claims() {
    let env = env();
    for claim in ["sub", "jti", "exp", "iat"] {
        env.refuses_claims(json!({ claim: null }), &format!("missing_{claim}"));
    }
    env.refuses_claims(json!({"sub": ""}), "claim_invalid_sub");
    env.refuses_claims(json!({"sub": 5}), "claim_invalid_sub");
    env.refuses_claims(json!({"jti": ""}), "claim_invalid_jti");
    env.refuses_claims(json!({"jti": ["a"]}), "claim_invalid_jti");
    env.refuses_claims(json!({"exp": "1800000600"}), "claim_invalid_exp");
    env.refuses_claims(json!({"exp": -1}), "claim_invalid_exp");
    env.refuses_claims(json!({"exp": 1e300}), "claim_invalid_exp");
    env.refuses_claims(json!({"exp": u64::MAX}), "claim_invalid_exp");
    env.refuses_claims(json!({"iat": true}), "claim_invalid_iat");
    env.refuses_claims(json!({"nbf": "now"}), "claim_invalid_nbf");
    env.refuses_claims(json!({"roles": "admin"}), "claim_invalid_roles");
    env.refuses_claims(json!({"roles": ["a", 1]}), "claim_invalid_roles");
    env.refuses_claims(json!({"roles": [""]}), "claim_invalid_roles");
    env.refuses_claims(json!({"tenant": 7}), "claim_invalid_tenant");
    env.refuses_claims(json!({"tenant": ""}), "claim_invalid_tenant");
}

#[test]
fn scope_rules() {
    let env = env();
    for scope in [
        "model:*:*",
        "model:llm",
        "model::invoke",
        "model:llm:",
        "model:llm:invoke:x",
        "model:l m:invoke",
        "openid  model:llm:invoke",
        " model:llm:invoke",
        "model:llm:invoke ",
        "model:llm:in\"voke",
        "openid\tmodel:llm:invoke",
    ] {
        env.refuses_claims(json!({ "scope": scope }), "scope_invalid");
    }
    env.refuses_claims(json!({"scope": ["model:llm:invoke"]}), "scope_invalid");
    env.refuses_claims(json!({"scp": "model:llm:invoke"}), "scope_invalid");
    env.refuses_claims(json!({"scp": ["model:llm:invoke", 1]}), "scope_invalid");
    env.refuses_claims(json!({"scp": ["two words"]}), "scope_invalid");
    let long = format!("model:{}:invoke", "s".repeat(65));
    env.refuses_claims(json!({ "scope": long }), "scope_invalid");
    let claims = env.verify(&env.ed.token(json!({"scope": ""}))).unwrap();
    assert!(claims.scopes.is_empty());
}

#[test]
fn time_rules() {
    let env = env(); // leeway 60 s, max lifetime 1 h
    // exp: refused from exp + leeway on.
    env.refuses_claims(
        json!({"exp": NOW - 60, "iat": NOW - 600, "nbf": null}),
        "token_expired",
    );
    env.refuses_claims(
        json!({"exp": NOW - 3000, "iat": NOW - 3600, "nbf": null}),
        "token_expired",
    );
    env.verify(
        &env.ed
            .token(json!({"exp": NOW - 59, "iat": NOW - 600, "nbf": null})),
    )
    .unwrap();
    // nbf: refused while now + leeway < nbf.
    env.refuses_claims(json!({"nbf": NOW + 61, "iat": NOW}), "token_not_yet_valid");
    env.verify(&env.ed.token(json!({"nbf": NOW + 60, "iat": NOW})))
        .unwrap();
    // iat in the future beyond the leeway.
    env.refuses_claims(
        json!({"iat": NOW + 61, "nbf": null}),
        "token_issued_in_future",
    );
    env.verify(&env.ed.token(json!({"iat": NOW + 60, "nbf": null})))
        .unwrap();
    // Lifetime exp - iat: at most the maximum.
    env.refuses_claims(
        json!({"iat": NOW - 60, "exp": NOW + 3541}),
        "token_lifetime_too_long",
    );
    env.verify(&env.ed.token(json!({"iat": NOW - 60, "exp": NOW + 3540})))
        .unwrap();
    env.refuses_claims(json!({"iat": NOW, "exp": NOW - 1}), "claim_invalid_exp");
    let err = env
        .verify(&env.ed.token(json!({"iat": NOW - 60, "exp": NOW + 86_400})))
        .unwrap_err();
    assert!(err.to_string().contains("86460s"), "{err}");
}

#[test]
fn leeway_is_capped() {
    let env = env_with(|p| {
        p.leeway = Duration::from_secs(3600);
        p.max_lifetime = Duration::from_secs(86_400);
    });
    assert_eq!(env.verifier.policy().leeway, MAX_LEEWAY);
    env.refuses_claims(
        json!({"exp": NOW - 301, "iat": NOW - 900, "nbf": null}),
        "token_expired",
    );
    env.verify(
        &env.ed
            .token(json!({"exp": NOW - 299, "iat": NOW - 900, "nbf": null})),
    )
    .unwrap();
}

#[test]
fn revocation() {
    let env = env();
    let token = env.ed.token(json!({"jti": "revoke-me"}));
    env.verify(&token).unwrap();
    env.verifier.revoke_jti("revoke-me", at(NOW + 600));
    env.refuses(&token, "jti_revoked");
    // A new token from the same subject is fine; revoking the subject is not.
    let other = env.ed.token(json!({}));
    let claims = env.verify(&other).unwrap();
    env.verifier.revoke_subject("alice");
    assert!(env.verifier.is_revoked(&claims));
    env.refuses(&other, "subject_revoked");
    env.refuses_claims(json!({}), "subject_revoked");
    env.verify(&env.ed.token(json!({"sub": "bob"}))).unwrap();
    env.verifier.unrevoke_subject("alice");
    assert!(!env.verifier.is_revoked(&claims));
    env.verify(&other).unwrap();
    // The jti revocation outlives the cache and is forgotten after `until`.
    env.verifier.purge(at(NOW + 599));
    env.refuses(&token, "jti_revoked");
    env.verifier.purge(at(NOW + 601));
    assert!(env.verifier.revoked_jtis.read().unwrap().is_empty());
}

#[test]
fn jti_is_remembered() {
    let env = env();
    let first = env.ed.token(json!({"jti": "same"}));
    env.verify(&first).unwrap();
    // The same token again is fine (cached or not); another one with that
    // jti is refused while the first is alive.
    env.verify(&first).unwrap();
    env.refuses(
        &env.ed.token(json!({"jti": "same", "sub": "mallory"})),
        "jti_reused",
    );
    env.refuses(&env.ec.token(json!({"jti": "same"})), "jti_reused");
    let uncached = env_with(|p| p.cache_entries = 0);
    let t = uncached.ed.token(json!({"jti": "x"}));
    uncached.verify(&t).unwrap();
    uncached.verify(&t).unwrap();
    assert_eq!(uncached.verifier.cache_len(), 0);
    uncached.refuses(
        &uncached.ed.token(json!({"jti": "x", "roles": []})),
        "jti_reused",
    );
    // After the first token died, the jti may be used again.
    let later = at(NOW + 1000);
    let reissued = env.ed.sign(
        &env.ed.header(),
        &payload(json!({"jti": "same", "iat": NOW + 900, "nbf": null, "exp": NOW + 1500})),
    );
    env.verifier.verify(&reissued, later).unwrap();
}

#[test]
fn jti_store_is_bounded() {
    let mut env = env();
    env.verifier.jti_capacity = 2;
    env.verify(&env.ed.token(json!({"exp": NOW + 10}))).unwrap();
    env.verify(&env.ed.token(json!({}))).unwrap();
    env.refuses_claims(json!({}), "jti_store_full");
    // Once the short-lived one is dead there is room again.
    let later = at(NOW + 100);
    let token = env
        .ed
        .sign(&env.ed.header(), &payload(json!({"iat": NOW + 50})));
    env.verifier.verify(&token, later).unwrap();
}

#[test]
fn cache_hits_and_rechecks() {
    let env = env();
    let token = env.ed.token(json!({"exp": NOW + 100}));
    let first = env.verify(&token).unwrap();
    let second = env.verify(&token).unwrap();
    assert!(Arc::ptr_eq(&first, &second), "not served from the cache");
    assert_eq!(env.verifier.cache_len(), 1);
    // Still expires.
    assert_eq!(
        env.verifier
            .verify(&token, at(NOW + 160))
            .unwrap_err()
            .reason(),
        "token_expired"
    );
    assert!(Arc::ptr_eq(
        &env.verifier.verify(&token, at(NOW + 159)).unwrap(),
        &first
    ));
    // Still revocable.
    env.verifier.revoke_subject("alice");
    env.refuses(&token, "subject_revoked");
    env.verifier.unrevoke_subject("alice");
    env.verifier.revoke_jti(&first.jti, first.expires_at);
    env.refuses(&token, "jti_revoked");
    // Purged once dead.
    env.verifier.purge(at(NOW + 159));
    assert_eq!(env.verifier.cache_len(), 1);
    env.verifier.purge(at(NOW + 160));
    assert_eq!(env.verifier.cache_len(), 0);
}

#[test]
fn cache_is_bounded() {
    let env = env_with(|p| p.cache_entries = 3);
    let tokens: Vec<String> = (0..10)
        .map(|i| env.ed.token(json!({"exp": NOW + 100 + i})))
        .collect();
    for t in &tokens {
        env.verify(t).unwrap();
        assert!(env.verifier.cache_len() <= 3);
    }
    // The latest-expiring ones stayed.
    let last = env.verify(&tokens[9]).unwrap();
    assert!(Arc::ptr_eq(&last, &env.verify(&tokens[9]).unwrap()));
}

#[test]
fn key_reload_empties_the_cache() {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "portcullis-token-reload-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let ed = Signer::ed("ed-1");
    let ec = Signer::ec("ec-1");
    fs::write(&path, json!({"keys": [ed.jwk(), ec.jwk()]}).to_string()).unwrap();
    let keys = Arc::new(JwksFile::load(&path, false).unwrap());
    let verifier = Verifier::new(TokenPolicy::new(ISS, AUD), keys.clone());
    let token = ed.token(json!({}));
    let first = verifier.verify(&token, now()).unwrap();
    assert!(Arc::ptr_eq(
        &first,
        &verifier.verify(&token, now()).unwrap()
    ));
    // The Ed25519 key is withdrawn: its tokens stop working at once.
    fs::write(&path, json!({"keys": [ec.jwk()]}).to_string()).unwrap();
    assert_eq!(keys.reload_if_changed(), Ok(true));
    assert_eq!(
        verifier.verify(&token, now()).unwrap_err().reason(),
        "unknown_kid"
    );
    verifier.verify(&ec.token(json!({})), now()).unwrap();
    // A bad file keeps the old keys working.
    fs::write(&path, b"{").unwrap();
    assert!(keys.reload_if_changed().is_err());
    verifier.verify(&ec.token(json!({})), now()).unwrap();
    fs::remove_file(&path).unwrap();
}

#[test]
fn reasons_are_distinct_snake_case() {
    let all = [
        TokenError::TooLarge { len: 0 },
        TokenError::Truncated(String::new()),
        TokenError::Segments(1),
        TokenError::Base64 {
            part: "header",
            detail: String::new(),
        },
        TokenError::HeaderNotObject(String::new()),
        TokenError::PayloadNotObject(String::new()),
        TokenError::TooDeep("payload"),
        TokenError::DuplicateHeader(String::new()),
        TokenError::DuplicateClaim(String::new()),
        TokenError::BadHeader {
            param: "kid",
            detail: String::new(),
        },
        TokenError::MissingAlg,
        TokenError::AlgNotAllowed {
            alg: String::new(),
            detail: String::new(),
        },
        TokenError::MissingKid,
        TokenError::UnknownKid(String::new()),
        TokenError::CritUnsupported(String::new()),
        TokenError::BadTyp(String::new()),
        TokenError::BadSignature(String::new()),
        TokenError::MissingClaim("iss"),
        TokenError::MissingClaim("aud"),
        TokenError::MissingClaim("sub"),
        TokenError::MissingClaim("exp"),
        TokenError::MissingClaim("iat"),
        TokenError::MissingClaim("jti"),
        TokenError::BadClaim {
            claim: "sub",
            detail: String::new(),
        },
        TokenError::ScopeInvalid(String::new()),
        TokenError::CnfInvalid(String::new()),
        TokenError::CnfUnsupported(String::new()),
        TokenError::IssuerMismatch(String::new()),
        TokenError::AudienceMismatch(String::new()),
        TokenError::Expired(0),
        TokenError::NotYetValid(0),
        TokenError::IssuedInFuture(0),
        TokenError::LifetimeTooLong {
            lifetime: 0,
            max: 0,
        },
        TokenError::JtiRevoked,
        TokenError::SubjectRevoked,
        TokenError::JtiReused,
        TokenError::JtiStoreFull,
    ];
    let mut seen = HashSet::new();
    for e in &all {
        let r = e.reason();
        assert!(
            r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{r}"
        );
        assert!(seen.insert(r), "duplicate reason {r}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn hostile_input_never_panics() {
    let env = env();
    let good = env.ed.token(json!({}));
    // Every prefix, and every single-byte change at a sample of positions.
    for end in 0..good.len() {
        let _ = env.verify(&good[..end]);
    }
    let bytes = good.as_bytes();
    for i in (0..bytes.len()).step_by(7) {
        for replacement in [b'.', b'A', b'_', b'=', b' '] {
            let mut b = bytes.to_vec();
            b[i] = replacement;
            if let Ok(s) = std::str::from_utf8(&b) {
                let r = env.verify(s);
                assert!(r.is_err() || s == good, "accepted a modified token: {s}");
            }
        }
    }
    for junk in [
        "..",
        "...",
        "a..",
        "é.é.é",
        "\0.\0.\0",
        "e30.e30.",
        "e30.e30.e30",
    ] {
        assert!(env.verify(junk).is_err());
    }
}
