//! The knock client against a tiny in-test responder on loopback (IPv4 and
//! IPv6): success, silence, replies with the wrong nonce or signature,
//! retries with fresh nonces, and the `portcullis knock` CLI entry point.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use portcullis_knock::{
    self as knock, Knock, KnockArgs, KnockClientError, KnockLimits, KnockOptions, PopKey, decode,
    pop_signing_input, reply,
};
use portcullis_trail::node_key::NodeKey;
use tokio::net::UdpSocket;

const TOKEN: &str = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.\
    eyJpc3MiOiJodHRwczovL2lkcCIsInN1YiI6ImFsaWNlIiwiYXVkIjoicG9ydGN1bGxpcyIsImV4cCI6MX0.\
    c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbg";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Reply to every valid knock.
    Answer,
    /// Never reply.
    Silent,
    /// Reply with a wrong nonce first, then (if `then_real`) the right one.
    WrongNonce { then_real: bool },
    /// Ignore the first n knocks, answer the rest.
    DropFirst(usize),
    /// Reply signed by a key other than the node's.
    ForeignSignature,
}

struct Responder {
    addr: SocketAddr,
    node: Arc<NodeKey>,
    seen: Arc<Mutex<Vec<Knock>>>,
    expires: SystemTime,
}

impl Responder {
    async fn start(ip: IpAddr, mode: Mode) -> Responder {
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let node = Arc::new(NodeKey::generate().unwrap());
        let foreign = NodeKey::generate().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let expires = SystemTime::now() + Duration::from_secs(600);
        let (n2, s2) = (node.clone(), seen.clone());
        tokio::spawn(async move {
            let limits = KnockLimits::default();
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((len, peer)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(k) = decode(&buf[..len], &limits) else {
                    continue;
                };
                let count = {
                    let mut s = s2.lock().unwrap();
                    s.push(k.clone());
                    s.len()
                };
                let answer = |key: &NodeKey, k: &Knock| {
                    reply(key, k, &k.service, expires, len).expect("reply fits")
                };
                match mode {
                    Mode::Silent => {}
                    Mode::Answer => {
                        sock.send_to(&answer(&n2, &k), peer).await.unwrap();
                    }
                    Mode::DropFirst(n) => {
                        if count > n {
                            sock.send_to(&answer(&n2, &k), peer).await.unwrap();
                        }
                    }
                    Mode::WrongNonce { then_real } => {
                        let mut other = k.clone();
                        other.nonce[0] ^= 0xff;
                        sock.send_to(&answer(&n2, &other), peer).await.unwrap();
                        // Junk is ignored too.
                        sock.send_to(b"not a reply", peer).await.unwrap();
                        if then_real {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            sock.send_to(&answer(&n2, &k), peer).await.unwrap();
                        }
                    }
                    Mode::ForeignSignature => {
                        sock.send_to(&answer(&foreign, &k), peer).await.unwrap();
                    }
                }
            }
        });
        Responder {
            addr,
            node,
            seen,
            expires,
        }
    }

    fn opts(&self) -> KnockOptions {
        let mut o = KnockOptions::new(self.addr, TOKEN, "llm");
        o.node_public_key = Some(self.node.public_key());
        o.timeout = Duration::from_millis(300);
        o.retries = 2;
        o
    }

    fn seen(&self) -> Vec<Knock> {
        self.seen.lock().unwrap().clone()
    }

    /// The knocks seen once at least `n` have arrived (bounded wait), so a
    /// test can then assert there are exactly `n`.
    async fn await_seen(&self, n: usize) -> Vec<Knock> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let seen = self.seen();
            if seen.len() >= n || tokio::time::Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn loopbacks() -> [IpAddr; 2] {
    [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
}

fn ms(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[tokio::test]
async fn success_with_verified_reply() {
    for ip in loopbacks() {
        let r = Responder::start(ip, Mode::Answer).await;
        let out = knock::knock(&r.opts()).await.unwrap();
        assert_eq!(out.service, "llm");
        assert!(out.verified_reply);
        assert_eq!(ms(out.expires_at), ms(r.expires));
        let seen = r.seen();
        assert_eq!(seen.len(), 1, "{ip}");
        assert_eq!(seen[0].token, TOKEN);
        assert_eq!(seen[0].service, "llm");
    }
}

#[tokio::test]
async fn success_without_node_key_is_unverified() {
    let r = Responder::start(IpAddr::V4(Ipv4Addr::LOCALHOST), Mode::Answer).await;
    let mut o = r.opts();
    o.node_public_key = None;
    let out = knock::KnockClient::new(o).knock().await.unwrap();
    assert!(!out.verified_reply);
    assert_eq!(out.service, "llm");
}

#[tokio::test]
async fn flow_scope_and_proof_reach_the_server() {
    for ip in loopbacks() {
        let r = Responder::start(ip, Mode::Answer).await;
        let (key, _) = PopKey::generate_ed25519().unwrap();
        let mut o = r.opts();
        o.source_port = 41000;
        o.client_addr = Some("192.0.2.9".parse().unwrap());
        o.pop_key = Some(key.clone());
        knock::knock(&o).await.unwrap();
        let k = &r.seen()[0];
        assert_eq!(k.source_port, 41000);
        assert_eq!(k.client_addr, o.client_addr);
        assert_eq!(k.pop_key.as_deref(), Some(key.public_jwk_json().as_bytes()));
        // The proof covers the body exactly as sent.
        let jwk: serde_json::Value = serde_json::from_slice(k.pop_key.as_ref().unwrap()).unwrap();
        use base64::Engine as _;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwk["x"].as_str().unwrap())
            .unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, x)
            .verify(
                &pop_signing_input(&k.body),
                k.pop_signature.as_ref().unwrap(),
            )
            .unwrap();
    }
}

#[tokio::test]
async fn silence_times_out_after_all_retries_with_fresh_nonces() {
    for ip in loopbacks() {
        let r = Responder::start(ip, Mode::Silent).await;
        let mut o = r.opts();
        o.timeout = Duration::from_millis(200);
        o.retries = 2;
        let start = Instant::now();
        let err = knock::knock(&o).await.unwrap_err();
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(600), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(
            matches!(err, KnockClientError::Timeout { attempts: 3, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("no reply from {} within 0.6s", r.addr)),
            "{msg}"
        );
        assert!(msg.contains("the server stays silent on refusal"), "{msg}");
        assert!(msg.contains("the port is wrong"), "{msg}");
        // The last knock may still be on its way to the responder.
        let seen = r.await_seen(3).await;
        assert_eq!(seen.len(), 3);
        let mut nonces: Vec<_> = seen.iter().map(|k| k.nonce).collect();
        nonces.sort();
        nonces.dedup();
        assert_eq!(nonces.len(), 3, "each try has a new nonce");
        assert!(seen.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
    }
}

#[tokio::test]
async fn zero_retries_sends_one_knock() {
    let r = Responder::start(IpAddr::V4(Ipv4Addr::LOCALHOST), Mode::Silent).await;
    let mut o = r.opts();
    o.retries = 0;
    o.timeout = Duration::from_millis(100);
    let err = knock::knock(&o).await.unwrap_err();
    assert!(err.to_string().contains("within 0.1s (1 knock)"), "{err}");
    assert_eq!(r.await_seen(1).await.len(), 1);
}

#[tokio::test]
async fn retries_succeed_after_losses() {
    for ip in loopbacks() {
        let r = Responder::start(ip, Mode::DropFirst(2)).await;
        let mut o = r.opts();
        o.timeout = Duration::from_millis(150);
        o.retries = 2;
        let out = knock::knock(&o).await.unwrap();
        assert!(out.verified_reply);
        let seen = r.seen();
        assert_eq!(seen.len(), 3);
        assert_ne!(seen[0].nonce, seen[1].nonce);
        assert_ne!(seen[1].nonce, seen[2].nonce);
        assert_ne!(seen[0].nonce, seen[2].nonce);
    }
}

#[tokio::test]
async fn reply_with_wrong_nonce_is_ignored() {
    for ip in loopbacks() {
        // Wrong nonce (and junk), then the real reply: success, one knock.
        let r = Responder::start(ip, Mode::WrongNonce { then_real: true }).await;
        let mut o = r.opts();
        o.retries = 0;
        o.timeout = Duration::from_millis(1000);
        knock::knock(&o).await.unwrap();
        assert_eq!(r.seen().len(), 1);
        // Only wrong nonces: it times out, as if nothing came.
        let r = Responder::start(ip, Mode::WrongNonce { then_real: false }).await;
        let mut o = r.opts();
        o.retries = 1;
        o.timeout = Duration::from_millis(150);
        let err = knock::knock(&o).await.unwrap_err();
        assert!(matches!(err, KnockClientError::Timeout { .. }), "{err:?}");
        // Unverified clients still match nonces.
        o.node_public_key = None;
        let err = knock::knock(&o).await.unwrap_err();
        assert!(matches!(err, KnockClientError::Timeout { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn reply_signed_by_another_key_is_refused() {
    let r = Responder::start(IpAddr::V6(Ipv6Addr::LOCALHOST), Mode::ForeignSignature).await;
    let mut o = r.opts();
    o.retries = 0;
    o.timeout = Duration::from_millis(200);
    let err = knock::knock(&o).await.unwrap_err();
    assert!(
        matches!(err, KnockClientError::BadReplySignature { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("does not verify"), "{err}");
    // Without a node key the same reply is accepted, unverified.
    o.node_public_key = None;
    let out = knock::knock(&o).await.unwrap();
    assert!(!out.verified_reply);
}

#[tokio::test]
async fn closed_port_is_reported() {
    // Bind then drop a socket to find a port nothing listens on.
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let mut o = KnockOptions::new(SocketAddr::from(([127, 0, 0, 1], port)), TOKEN, "llm");
    o.timeout = Duration::from_millis(100);
    o.retries = 1;
    let err = knock::knock(&o).await.unwrap_err();
    // Loopback answers ICMP port unreachable.
    assert!(
        matches!(err, KnockClientError::Unreachable { .. }),
        "{err:?}"
    );
}

fn cli_args(dir: &std::path::Path, host: String, timeout_ms: u64) -> KnockArgs {
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    KnockArgs {
        token_file: Some(token_file),
        service: Some("llm".into()),
        host: Some(host),
        print_jkt: false,
        port: None,
        source_port: 0,
        client_addr: None,
        pop_key: None,
        node_key_pub: None,
        timeout_ms,
        retries: 0,
    }
}

#[test]
fn cli_entry_point() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = std::env::temp_dir().join(format!("portcullis-knock-udp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let r = rt.block_on(Responder::start(
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        Mode::Answer,
    ));
    let mut args = cli_args(&dir, format!("[::1]:{}", r.addr.port()), 1000);
    let pub_file = dir.join("node.pub");
    std::fs::write(&pub_file, r.node.public_jwk_json()).unwrap();
    args.node_key_pub = Some(pub_file);
    let (key, pkcs8) = PopKey::generate_p256().unwrap();
    let key_file = dir.join("pop.der");
    std::fs::write(&key_file, pkcs8).unwrap();
    args.pop_key = Some(key_file);
    args.source_port = 40123;
    knock::run_cli(args).unwrap();
    let seen = r.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].source_port, 40123);
    assert_eq!(
        seen[0].pop_key.as_deref(),
        Some(key.public_jwk_json().as_bytes())
    );

    let r = rt.block_on(Responder::start(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        Mode::Silent,
    ));
    let mut args = cli_args(&dir, "127.0.0.1".into(), 100);
    args.port = Some(r.addr.port());
    let err = knock::run_cli(args).unwrap_err();
    assert!(
        format!("{err:#}").contains(&format!("no reply from {}", r.addr)),
        "{err:#}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--print-jkt`: the thumbprint a client gives its identity provider for
/// `cnf.jkt`, checked against RFC 8037 Appendix A.3 (the Ed25519 key of
/// A.1, whose RFC 7638 thumbprint A.3 gives).
#[test]
fn print_jkt_gives_the_rfc_8037_thumbprint() {
    use base64::Engine as _;
    let dir = std::env::temp_dir().join(format!("portcullis-knock-jkt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let seed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
        .unwrap();
    // PKCS#8 v1 (RFC 8410 §7): the private key alone.
    let mut der = hex_bytes("302e020100300506032b657004220420");
    der.extend_from_slice(&seed);
    let key = dir.join("pop.der");
    std::fs::write(&key, &der).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis-knock"))
        .arg("--print-jkt")
        .arg("--pop-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
    // Without a key it says what is missing; with a token it refuses the mix.
    let bare = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis-knock"))
        .arg("--print-jkt")
        .output()
        .unwrap();
    assert!(!bare.status.success());
    assert!(String::from_utf8_lossy(&bare.stderr).contains("--pop-key"));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
