use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::UNIX_EPOCH;

use super::*;
use crate::client::*;

fn now_ms() -> i64 {
    time::unix_ms(SystemTime::now())
}

/// Shaped like a small real EdDSA access token (header, a few claims, a
/// 64-byte signature): about 200 bytes.
pub(super) const TOKEN: &str = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.\
    eyJpc3MiOiJodHRwczovL2lkcCIsInN1YiI6ImFsaWNlIiwiYXVkIjoicG9ydGN1bGxpcyIsImV4cCI6MX0.\
    c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbg";

fn body() -> v1::KnockBody {
    v1::KnockBody {
        version: 1,
        token: TOKEN.into(),
        service: "llm-chat_2".into(),
        timestamp_unix_ms: now_ms(),
        nonce: vec![7; 16],
        client_addr: vec![],
        source_port: 0,
    }
}

fn envelope(b: &v1::KnockBody) -> v1::Knock {
    v1::Knock {
        body: b.encode_to_vec(),
        pop_key: vec![],
        pop_signature: vec![],
    }
}

fn dgram(b: &v1::KnockBody) -> Vec<u8> {
    envelope(b).encode_to_vec()
}

fn lim() -> KnockLimits {
    KnockLimits::default()
}

fn refused(d: &[u8]) -> &'static str {
    decode(d, &lim()).unwrap_err().reason()
}

fn with(f: impl FnOnce(&mut v1::KnockBody)) -> Vec<u8> {
    let mut b = body();
    f(&mut b);
    dgram(&b)
}

#[test]
fn decodes_a_valid_knock() {
    let b = body();
    let d = dgram(&b);
    let k = decode(&d, &lim()).unwrap();
    assert_eq!(k.token, b.token);
    assert_eq!(k.service, "llm-chat_2");
    assert_eq!(k.nonce, [7; 16]);
    assert_eq!(k.client_addr, None);
    assert_eq!(k.source_port, 0);
    assert_eq!(k.pop_key, None);
    assert_eq!(k.pop_signature, None);
    assert_eq!(k.body, b.encode_to_vec());
    assert_eq!(time::unix_ms(k.timestamp), b.timestamp_unix_ms);
}

#[test]
fn size_limits_come_first() {
    assert_eq!(refused(&[]), "too_short");
    assert_eq!(refused(&[0xff; MIN_DATAGRAM - 1]), "too_short");
    // Garbage of acceptable size is a protobuf error, not a size error.
    assert_eq!(refused(&[0xff; MIN_DATAGRAM]), "bad_protobuf");
    let l = lim();
    assert_eq!(refused(&vec![0; l.max_datagram + 1]), "too_long");
    // A valid knock padded (unknown field 15) to exactly max_datagram passes.
    let mut d = dgram(&body());
    let pad = l.max_datagram - d.len() - 3; // tag (1) + length (2)
    d.push(15 << 3 | 2);
    prost::encoding::encode_varint(pad as u64, &mut d);
    d.resize(l.max_datagram, 0);
    assert_eq!(d.len(), l.max_datagram);
    decode(&d, &l).unwrap();
    d.push(0);
    assert_eq!(refused(&d), "too_long");
    // The limit is configurable.
    let small = KnockLimits {
        max_datagram: 64,
        ..lim()
    };
    assert_eq!(
        decode(&dgram(&body()), &small).unwrap_err().reason(),
        "too_long"
    );
}

#[test]
fn bad_protobuf() {
    // Outer envelope: invalid wire type 7.
    let mut d = vec![0x0f];
    d.resize(40, 0);
    assert_eq!(refused(&d), "bad_protobuf");
    // Outer fine, body garbage.
    let k = v1::Knock {
        body: vec![0xff; 40],
        ..Default::default()
    };
    assert_eq!(refused(&k.encode_to_vec()), "bad_protobuf");
    // Token not UTF-8.
    let mut b = body().encode_to_vec();
    let tok = b.windows(3).position(|w| w == b"eyJ").unwrap();
    b[tok] = 0xff;
    let k = v1::Knock {
        body: b,
        ..Default::default()
    };
    assert_eq!(refused(&k.encode_to_vec()), "bad_protobuf");
    // Body field with wrong wire type for `body` (varint instead of bytes).
    let mut d = vec![0x08];
    prost::encoding::encode_varint(1, &mut d);
    d.resize(40, 0);
    assert_eq!(refused(&d), "bad_protobuf");
}

#[test]
fn huge_length_prefixes_are_refused_without_allocation() {
    // Outer `body` field claiming 2^62 bytes.
    let mut d = vec![0x0a];
    prost::encoding::encode_varint(1 << 62, &mut d);
    d.resize(64, 0x41);
    assert_eq!(refused(&d), "bad_protobuf");
    // Outer fine; inside the body, `token` claims 4 GiB.
    let mut inner = vec![0x08, 0x01, 0x12];
    prost::encoding::encode_varint(u32::MAX as u64, &mut inner);
    inner.resize(48, b'a');
    let k = v1::Knock {
        body: inner,
        ..Default::default()
    };
    assert_eq!(refused(&k.encode_to_vec()), "bad_protobuf");
    // Varint longer than 10 bytes.
    let mut d = vec![0x0a];
    d.extend([0xff; 11]);
    d.resize(40, 0);
    assert_eq!(refused(&d), "bad_protobuf");
    // (knock/tests/alloc.rs measures the allocations.)
}

#[test]
fn version() {
    assert_eq!(refused(&with(|b| b.version = 0)), "bad_version");
    assert_eq!(refused(&with(|b| b.version = 2)), "bad_version");
    assert_eq!(refused(&with(|b| b.version = u32::MAX)), "bad_version");
}

#[test]
fn nonce() {
    for n in [0, 1, 15, 17, 32] {
        assert_eq!(refused(&with(|b| b.nonce = vec![1; n])), "bad_nonce", "{n}");
    }
}

#[test]
fn client_addr() {
    let k = decode(&with(|b| b.client_addr = vec![192, 0, 2, 1]), &lim()).unwrap();
    assert_eq!(k.client_addr, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
    let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let k = decode(&with(|b| b.client_addr = v6.octets().to_vec()), &lim()).unwrap();
    assert_eq!(k.client_addr, Some(IpAddr::V6(v6)));
    let mapped: Ipv6Addr = "::ffff:192.0.2.1".parse().unwrap();
    let k = decode(&with(|b| b.client_addr = mapped.octets().to_vec()), &lim()).unwrap();
    assert_eq!(k.client_addr, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
    for bad in [
        vec![1],
        vec![1, 2, 3],
        vec![1, 2, 3, 4, 5],
        vec![1; 15],
        vec![1; 17],
        vec![0, 0, 0, 0],
        vec![255, 255, 255, 255],
        vec![224, 0, 0, 1],
        vec![0; 16],
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets().to_vec(),
    ] {
        assert_eq!(
            refused(&with(|b| b.client_addr = bad.clone())),
            "bad_client_addr",
            "{bad:?}"
        );
    }
    assert_eq!(client_addr_bytes(IpAddr::V6(v6)), v6.octets());
}

#[test]
fn source_port() {
    let k = decode(&with(|b| b.source_port = 65535), &lim()).unwrap();
    assert_eq!(k.source_port, 65535);
    assert_eq!(refused(&with(|b| b.source_port = 65536)), "bad_source_port");
    assert_eq!(
        refused(&with(|b| b.source_port = u32::MAX)),
        "bad_source_port"
    );
}

#[test]
fn service() {
    decode(&with(|b| b.service = "a".into()), &lim()).unwrap();
    decode(&with(|b| b.service = "z".repeat(64)), &lim()).unwrap();
    for bad in [
        "",
        &"z".repeat(65),
        "LLM",
        "llm chat",
        "llm.chat",
        "llm/chat",
        "é",
        "llm\0",
    ] {
        assert_eq!(
            refused(&with(|b| b.service = bad.into())),
            "bad_service",
            "{bad:?}"
        );
    }
}

#[test]
fn token_bounds() {
    assert_eq!(refused(&with(|b| b.token.clear())), "token_missing");
    let big = KnockLimits {
        max_datagram: 16 * 1024,
        ..lim()
    };
    let d = with(|b| b.token = "t".repeat(MAX_TOKEN));
    decode(&d, &big).unwrap();
    let d = with(|b| b.token = "t".repeat(MAX_TOKEN + 1));
    assert_eq!(decode(&d, &big).unwrap_err().reason(), "token_too_long");
}

#[test]
fn pop_bounds() {
    let d = |key: usize, sig: usize| {
        v1::Knock {
            body: body().encode_to_vec(),
            pop_key: vec![b'k'; key],
            pop_signature: vec![b's'; sig],
        }
        .encode_to_vec()
    };
    let k = decode(&d(MAX_POP_KEY, MAX_POP_SIGNATURE), &lim()).unwrap();
    assert_eq!(k.pop_key.unwrap().len(), MAX_POP_KEY);
    assert_eq!(k.pop_signature.unwrap().len(), MAX_POP_SIGNATURE);
    assert_eq!(refused(&d(MAX_POP_KEY + 1, 64)), "pop_key_too_long");
    assert_eq!(
        refused(&d(100, MAX_POP_SIGNATURE + 1)),
        "pop_signature_too_long"
    );
    // A key without a signature proves nothing.
    assert_eq!(refused(&d(100, 0)), "pop_missing");
    // A signature without a key may use the token's cnf.jwk.
    let k = decode(&d(0, 64), &lim()).unwrap();
    assert_eq!(k.pop_key, None);
    assert_eq!(k.pop_signature.unwrap().len(), 64);
}

#[test]
fn truncation_at_every_byte_is_refused() {
    // Without proof of possession: every strict prefix is refused.
    let d = dgram(&body());
    for n in 0..d.len() {
        let r = decode(&d[..n], &lim());
        assert!(r.is_err(), "prefix of {n} bytes accepted");
    }
    // With a proof: every strict prefix is refused, except the one that
    // ends exactly after `body` — a well-formed knock without a proof, which
    // proves nothing and is refused by the PoP check when a proof is due.
    let (key, _) = PopKey::generate_ed25519().unwrap();
    let mut opts = KnockOptions::new(
        "127.0.0.1:1".parse().unwrap(),
        body().token,
        "llm".to_string(),
    );
    opts.pop_key = Some(key);
    opts.client_addr = Some("192.0.2.7".parse().unwrap());
    let d = build_knock(&opts, [3; 16], SystemTime::now()).unwrap();
    let full = decode(&d, &lim()).unwrap();
    let body_end = v1::Knock {
        body: full.body.clone(),
        ..Default::default()
    }
    .encoded_len();
    for n in 0..d.len() {
        match decode(&d[..n], &lim()) {
            Err(_) => {}
            Ok(k) => {
                assert_eq!(n, body_end, "prefix of {n} bytes accepted");
                assert!(k.pop_key.is_none() && k.pop_signature.is_none());
                assert!(k.client_addr.is_some());
            }
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: mutate a valid knock byte by byte.
    let d = dgram(&body());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        let mut m = d.clone();
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % m.len();
            m[i] = (x >> 32) as u8;
        }
        let _ = decode(&m, &lim());
    }
}

#[test]
fn timestamps_convert() {
    for ms in [0, 1, -1, 1_700_000_000_123, i64::MAX / 1000, -86_400_000] {
        assert_eq!(time::unix_ms(time::from_unix_ms(ms)), ms);
    }
    let _ = time::from_unix_ms(i64::MIN);
    let _ = time::from_unix_ms(i64::MAX);
    // Far-past timestamps in a knock are refused as stale.
    let k = decode(&with(|b| b.timestamp_unix_ms = i64::MIN), &lim()).unwrap();
    assert_eq!(
        check_fresh(k.timestamp, SystemTime::now(), lim().window).unwrap_err(),
        KnockError::Stale
    );
    let k = decode(&with(|b| b.timestamp_unix_ms = i64::MAX), &lim()).unwrap();
    assert_eq!(
        check_fresh(k.timestamp, SystemTime::now(), lim().window).unwrap_err(),
        KnockError::FromFuture
    );
}

#[test]
fn freshness_both_ways() {
    let now = SystemTime::now();
    let w = Duration::from_secs(30);
    let ms = Duration::from_millis(1);
    check_fresh(now, now, w).unwrap();
    check_fresh(now - w, now, w).unwrap();
    check_fresh(now + w, now, w).unwrap();
    assert_eq!(check_fresh(now - w - ms, now, w), Err(KnockError::Stale));
    assert_eq!(
        check_fresh(now + w + ms, now, w),
        Err(KnockError::FromFuture)
    );
    assert_eq!(
        check_fresh(UNIX_EPOCH, now, w).unwrap_err().reason(),
        "stale"
    );
    assert_eq!(
        check_fresh(now + Duration::from_secs(3600), now, w)
            .unwrap_err()
            .reason(),
        "from_future"
    );
    // A zero window accepts only the exact instant.
    check_fresh(now, now, Duration::ZERO).unwrap();
    assert!(check_fresh(now + ms, now, Duration::ZERO).is_err());
}

#[test]
fn refusal_counters_are_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<KnockRefusals>();
}

#[test]
fn reasons_are_stable_and_distinct() {
    let all = [
        KnockError::TooShort { len: 0 },
        KnockError::TooLong { len: 0, max: 0 },
        KnockError::BadProtobuf(v1::Knock::decode(&[0x0f][..]).unwrap_err()),
        KnockError::BadVersion(2),
        KnockError::BadNonce(0),
        KnockError::BadClientAddr,
        KnockError::BadSourcePort(70000),
        KnockError::BadService,
        KnockError::TokenMissing,
        KnockError::TokenTooLong(0),
        KnockError::PopKeyTooLong(0),
        KnockError::PopSignatureTooLong(0),
        KnockError::Stale,
        KnockError::FromFuture,
        KnockError::ReplayedNonce,
        KnockError::NonceCacheFull,
        KnockError::PopMissing,
        KnockError::PopKeyInvalid,
        KnockError::PopKeyMismatch,
        KnockError::PopInvalid,
        KnockError::PopUnbound,
    ];
    assert_eq!(all.len(), KnockError::REASONS.len());
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.index(), i);
        let r = e.reason();
        assert!(
            r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{r}"
        );
        assert!(!e.to_string().is_empty());
    }
    let mut uniq: Vec<_> = KnockError::REASONS.to_vec();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), KnockError::REASONS.len());

    let counts = KnockRefusals::new();
    counts.record(&KnockError::Stale);
    counts.record(&KnockError::Stale);
    counts.record(&KnockError::ReplayedNonce);
    assert_eq!(counts.get("stale"), 2);
    assert_eq!(counts.get("replayed_nonce"), 1);
    assert_eq!(counts.get("too_long"), 0);
    assert_eq!(counts.get("nonsense"), 0);
    assert_eq!(counts.snapshot().len(), KnockError::REASONS.len());
}

fn node() -> NodeKey {
    NodeKey::generate().unwrap()
}

#[test]
fn reply_is_signed_and_echoes_the_nonce() {
    let node = node();
    let d = dgram(&body());
    let k = decode(&d, &lim()).unwrap();
    let expires = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
    let r = reply(&node, &k, "llm-chat_2", expires, d.len()).unwrap();
    assert!(r.len() <= d.len());

    let info = decode_reply(&r, Some(&node.public_key())).unwrap();
    assert_eq!(info.nonce, k.nonce);
    assert_eq!(info.expires_at, expires);
    assert_eq!(info.service, "llm-chat_2");
    assert!(info.verified);
    // Unverified decode works without a key.
    assert!(!decode_reply(&r, None).unwrap().verified);
    // Another node's key does not verify it.
    let other = NodeKey::generate().unwrap();
    assert_eq!(
        decode_reply(&r, Some(&other.public_key())),
        Err(crate::client::KnockReplyError::BadSignature)
    );
    // The signature is over the domain-separated body.
    let parsed = v1::KnockReply::decode(r.as_slice()).unwrap();
    assert!(NodeKey::verify_with(
        &node.public_key(),
        &[REPLY_CONTEXT, parsed.body.as_slice()].concat(),
        &parsed.signature
    ));
    assert!(!NodeKey::verify_with(
        &node.public_key(),
        &parsed.body,
        &parsed.signature
    ));
    // Tampering with the body breaks it.
    let mut body = v1::KnockReplyBody::decode(parsed.body.as_slice()).unwrap();
    body.expires_unix_ms += 1;
    let forged = v1::KnockReply {
        body: body.encode_to_vec(),
        signature: parsed.signature,
    }
    .encode_to_vec();
    assert_eq!(
        decode_reply(&forged, Some(&node.public_key())),
        Err(crate::client::KnockReplyError::BadSignature)
    );
    assert_eq!(
        decode_reply(b"junk", None),
        Err(crate::client::KnockReplyError::Malformed)
    );
}

#[test]
fn reply_never_larger_than_request() {
    let node = node();
    let k = decode(&dgram(&body()), &lim()).unwrap();
    let expires = SystemTime::now() + Duration::from_secs(3600);
    let mut smallest_ok = None;
    for service_len in [1usize, 10, 64] {
        let svc = "s".repeat(service_len);
        for request_len in 0..400 {
            match reply(&node, &k, &svc, expires, request_len) {
                Some(r) => {
                    assert!(r.len() <= request_len);
                    smallest_ok.get_or_insert(request_len);
                }
                None => {
                    // Refused only when the real reply would not fit.
                    let real = reply(&node, &k, &svc, expires, usize::MAX).unwrap();
                    assert!(real.len() > request_len, "{service_len} {request_len}");
                }
            }
        }
    }
    // A knock with even a small real token is larger than the reply.
    let smallest_ok = smallest_ok.unwrap();
    assert!(smallest_ok < dgram(&body()).len(), "{smallest_ok}");
}

#[test]
fn client_builds_verifiable_knocks() {
    let server: SocketAddr = "127.0.0.1:62201".parse().unwrap();
    for (key, _) in [
        PopKey::generate_ed25519().unwrap(),
        PopKey::generate_p256().unwrap(),
    ] {
        let mut opts = KnockOptions::new(server, "a.b.c", "llm");
        opts.source_port = 40000;
        opts.client_addr = Some("2001:db8::7".parse().unwrap());
        opts.pop_key = Some(key.clone());
        let d = build_knock(&opts, [9; 16], SystemTime::now()).unwrap();
        let k = decode(&d, &lim()).unwrap();
        assert_eq!(k.source_port, 40000);
        assert_eq!(k.client_addr, opts.client_addr);
        assert_eq!(k.pop_key.as_deref(), Some(key.public_jwk_json().as_bytes()));
        let jwk: serde_json::Value = serde_json::from_slice(k.pop_key.as_ref().unwrap()).unwrap();
        let b64 = |s: &serde_json::Value| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s.as_str().unwrap())
                .unwrap()
        };
        let sig = k.pop_signature.as_ref().unwrap();
        let input = pop_signing_input(&k.body);
        assert!(input.starts_with(b"portcullis-knock-v1\0"));
        let ok = match key.alg() {
            "EdDSA" => {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, b64(&jwk["x"]))
                    .verify(&input, sig)
                    .is_ok()
            }
            _ => {
                let pk = [vec![4u8], b64(&jwk["x"]), b64(&jwk["y"])].concat();
                ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_FIXED,
                    pk,
                )
                .verify(&input, sig)
                .is_ok()
            }
        };
        assert!(ok, "{}", key.alg());
        assert_eq!(key.thumbprint().len(), 43);
    }
}

#[test]
fn client_refuses_knocks_every_agent_would_drop() {
    let server: SocketAddr = "127.0.0.1:62201".parse().unwrap();
    let bad = |f: &dyn Fn(&mut KnockOptions)| {
        let mut o = KnockOptions::new(server, "a.b.c", "llm");
        f(&mut o);
        build_knock(&o, [1; 16], SystemTime::now()).unwrap_err()
    };
    let e = bad(&|o| o.service = "LLM".into());
    assert!(matches!(
        e,
        KnockClientError::InvalidKnock(KnockError::BadService)
    ));
    assert!(matches!(
        bad(&|o| o.token = String::new()),
        KnockClientError::InvalidKnock(KnockError::TokenMissing)
    ));
    assert!(matches!(
        bad(&|o| o.client_addr = Some("192.0.2.1".parse().unwrap())),
        KnockClientError::InvalidKnock(KnockError::PopMissing)
    ));
    assert!(matches!(
        bad(&|o| o.token = "t".repeat(70_000)),
        KnockClientError::TooLarge(_)
    ));
    let _ = Ipv4Addr::LOCALHOST;
}
