//! Proof of possession for knocks (RFC 7800 `cnf`): the knock's body signed
//! by the key the token is bound to.

use crate::admission::{
    jwk::{Alg, Jwk},
    token::Confirmation,
};
use portcullis_knock::{Knock, KnockError, pop_signing_input};

/// Checks a knock's proof of possession against the verified token's
/// confirmation claim (`cnf`, RFC 7800). Rules:
///
/// - A proof is required when the token has `cnf` or the knock claims a
///   `client_addr`; a required proof that is absent is `pop_missing`.
/// - A claimed `client_addr` also needs the token to be bound to a key
///   (`cnf`): a proof by a key nothing binds to the token shows nothing, and
///   would let anyone holding a copy of the token admit any address
///   (`pop_unbound`).
/// - The proof key is `Knock.pop_key` (a JWK); when absent, the key in
///   `cnf.jwk`. It must be an EdDSA or ES256 key (`pop_key_invalid`) and be
///   the confirmed key: RFC 7638 thumbprint equal to `cnf.jkt`, or the same
///   key as `cnf.jwk` (`pop_key_mismatch`).
/// - The signature, in the key's own algorithm, must verify over
///   [`pop_signing_input`]`(body)` (`pop_invalid`).
/// - A proof sent without being required is still checked: a bad one is
///   refused.
pub fn verify_pop(knock: &Knock, cnf: Option<&Confirmation>) -> Result<(), KnockError> {
    if knock.client_addr.is_some() && cnf.is_none() {
        return Err(KnockError::PopUnbound);
    }
    let Some(signature) = knock.pop_signature.as_deref() else {
        // decode() refuses a key without a signature, so there is no proof.
        return match cnf {
            Some(_) => Err(KnockError::PopMissing),
            None => Ok(()),
        };
    };
    let sent;
    let key: &Jwk = match (knock.pop_key.as_deref(), cnf) {
        (Some(json), _) => {
            sent = Jwk::from_json(json).map_err(|_| KnockError::PopKeyInvalid)?;
            &sent
        }
        (None, Some(Confirmation::Jwk(jwk))) => jwk,
        // A signature with no key to check it against.
        (None, _) => return Err(KnockError::PopMissing),
    };
    if !matches!(key.alg, Alg::EdDSA | Alg::ES256) {
        return Err(KnockError::PopKeyInvalid);
    }
    let bound = match cnf {
        None => true,
        Some(Confirmation::Jkt(jkt)) => key.thumbprint() == *jkt,
        Some(Confirmation::Jwk(jwk)) => key.thumbprint() == jwk.thumbprint(),
    };
    if !bound {
        return Err(KnockError::PopKeyMismatch);
    }
    key.verify(key.alg, &pop_signing_input(&knock.body), signature)
        .map_err(|_| KnockError::PopInvalid)
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::SystemTime};

    use super::*;
    use portcullis_knock::{KnockLimits, KnockOptions, PopKey, build_knock, decode};

    /// Any token: the proof is checked against the `cnf` given, not the
    /// token's own (the verifier extracted that before).
    const TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2ln";
    use portcullis_proto::v1;
    use prost::Message as _;

    fn knock_with(key: Option<&PopKey>, client_addr: bool) -> Knock {
        let server: SocketAddr = "127.0.0.1:62201".parse().unwrap();
        let mut o = KnockOptions::new(server, TOKEN, "llm");
        o.pop_key = key.cloned();
        // build_knock refuses client_addr without a key; add it after.
        let d = build_knock(&o, [5; 16], SystemTime::now()).unwrap();
        let mut k = decode(&d, &KnockLimits::default()).unwrap();
        if client_addr {
            k.client_addr = Some("192.0.2.1".parse().unwrap());
        }
        k
    }

    fn jkt(key: &PopKey) -> Confirmation {
        Confirmation::Jkt(key.thumbprint())
    }

    fn cnf_jwk(key: &PopKey) -> Confirmation {
        Confirmation::Jwk(Jwk::from_json(key.public_jwk_json().as_bytes()).unwrap())
    }

    fn reason(r: Result<(), KnockError>) -> &'static str {
        match r {
            Ok(()) => "ok",
            Err(e) => e.reason(),
        }
    }

    #[test]
    fn thumbprints_agree_with_the_jwk_module() {
        for (key, _) in [
            PopKey::generate_ed25519().unwrap(),
            PopKey::generate_p256().unwrap(),
        ] {
            let jwk = Jwk::from_json(key.public_jwk_json().as_bytes()).unwrap();
            assert_eq!(jwk.thumbprint(), key.thumbprint());
            assert_eq!(jwk.alg.as_str(), key.alg());
        }
    }

    #[test]
    fn proofs_bound_by_jkt_or_jwk() {
        for (key, _) in [
            PopKey::generate_ed25519().unwrap(),
            PopKey::generate_p256().unwrap(),
        ] {
            let k = knock_with(Some(&key), false);
            assert_eq!(reason(verify_pop(&k, Some(&jkt(&key)))), "ok");
            assert_eq!(reason(verify_pop(&k, Some(&cnf_jwk(&key)))), "ok");
            // With a client address, too.
            let k = knock_with(Some(&key), true);
            assert_eq!(reason(verify_pop(&k, Some(&jkt(&key)))), "ok");
            // A voluntary proof without cnf is checked and passes.
            let k = knock_with(Some(&key), false);
            assert_eq!(reason(verify_pop(&k, None)), "ok");
        }
    }

    #[test]
    fn signature_without_key_uses_cnf_jwk() {
        let (key, _) = PopKey::generate_ed25519().unwrap();
        let mut k = knock_with(Some(&key), false);
        k.pop_key = None;
        assert_eq!(reason(verify_pop(&k, Some(&cnf_jwk(&key)))), "ok");
        // With only a thumbprint there is nothing to check it against.
        assert_eq!(reason(verify_pop(&k, Some(&jkt(&key)))), "pop_missing");
        assert_eq!(reason(verify_pop(&k, None)), "pop_missing");
    }

    #[test]
    fn missing_proofs() {
        let (key, _) = PopKey::generate_ed25519().unwrap();
        let k = knock_with(None, false);
        assert_eq!(reason(verify_pop(&k, None)), "ok");
        assert_eq!(reason(verify_pop(&k, Some(&jkt(&key)))), "pop_missing");
        assert_eq!(reason(verify_pop(&k, Some(&cnf_jwk(&key)))), "pop_missing");
        let k = knock_with(None, true);
        assert_eq!(reason(verify_pop(&k, Some(&jkt(&key)))), "pop_missing");
        // A claimed address with a token bound to no key: refused even with
        // a (self-made) proof.
        assert_eq!(reason(verify_pop(&k, None)), "pop_unbound");
        let k = knock_with(Some(&key), true);
        assert_eq!(reason(verify_pop(&k, None)), "pop_unbound");
    }

    #[test]
    fn wrong_keys_and_signatures() {
        let (key, _) = PopKey::generate_ed25519().unwrap();
        let (other, _) = PopKey::generate_p256().unwrap();
        let k = knock_with(Some(&key), false);
        // Someone else's key in the token.
        assert_eq!(
            reason(verify_pop(&k, Some(&jkt(&other)))),
            "pop_key_mismatch"
        );
        assert_eq!(
            reason(verify_pop(&k, Some(&cnf_jwk(&other)))),
            "pop_key_mismatch"
        );
        assert_eq!(
            reason(verify_pop(&k, Some(&Confirmation::Jkt("x".into())))),
            "pop_key_mismatch"
        );
        // Altered body: the signature no longer verifies.
        let mut bad = k.clone();
        let last = bad.body.len() - 1;
        bad.body[last] ^= 1;
        assert_eq!(reason(verify_pop(&bad, Some(&jkt(&key)))), "pop_invalid");
        // Altered or truncated signature.
        let mut bad = k.clone();
        bad.pop_signature.as_mut().unwrap()[0] ^= 1;
        assert_eq!(reason(verify_pop(&bad, Some(&jkt(&key)))), "pop_invalid");
        let mut bad = k.clone();
        bad.pop_signature.as_mut().unwrap().truncate(63);
        assert_eq!(reason(verify_pop(&bad, Some(&jkt(&key)))), "pop_invalid");
        // Signed without the domain prefix.
        let mut bad = k.clone();
        bad.pop_signature = Some(key.sign(&bad.body).unwrap());
        assert_eq!(reason(verify_pop(&bad, Some(&jkt(&key)))), "pop_invalid");
        // A key that is not a proof key: garbage, a private key, HMAC.
        for json in [
            &b"{"[..],
            b"not json",
            br#"{"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}"#,
            br#"{"kty":"OKP","crv":"X25519","x":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#,
        ] {
            let mut bad = k.clone();
            bad.pop_key = Some(json.to_vec());
            assert_eq!(
                reason(verify_pop(&bad, None)),
                "pop_key_invalid",
                "{}",
                String::from_utf8_lossy(json)
            );
        }
        // The HMAC key case also holds when the token names it.
        let oct = Jwk::from_json(
            br#"{"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}"#,
        );
        if let Ok(oct) = oct {
            let mut bad = k.clone();
            bad.pop_key = None;
            assert_eq!(
                reason(verify_pop(&bad, Some(&Confirmation::Jwk(oct)))),
                "pop_key_invalid"
            );
        }
    }

    #[test]
    fn proof_covers_the_body_exactly_as_sent() {
        // Re-encoding the envelope around the same body keeps the proof;
        // any other body (even an equivalent encoding) does not.
        let (key, _) = PopKey::generate_ed25519().unwrap();
        let k = knock_with(Some(&key), false);
        let mut body = v1::KnockBody::decode(k.body.as_slice()).unwrap();
        body.timestamp_unix_ms += 1;
        let mut bad = k.clone();
        bad.body = body.encode_to_vec();
        assert_eq!(reason(verify_pop(&bad, Some(&jkt(&key)))), "pop_invalid");
        // Unknown trailing field appended to the body.
        let mut bad = k.clone();
        bad.body.extend([0x78, 0x01]);
        assert_eq!(reason(verify_pop(&bad, Some(&jkt(&key)))), "pop_invalid");
    }
}
