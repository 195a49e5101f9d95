//! The knock service against real kernel maps (programs loaded, nothing
//! attached) and a real audit spool: a valid knock becomes an identity and
//! an admission; replays, wrong scopes and revoked tokens or subjects do
//! not; revocation cuts what was admitted. Runs as root (loads BPF).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use portcullis_agent::{
    accounting::{Accountant, SpendBook},
    admission::{
        jwk::JwksFile,
        revocations::{Change, Revocations},
        token::{TokenPolicy, Verifier},
    },
    config::{Config, identity_key},
    daemon::upkeep::apply_revocations,
    identity::IdentityName,
    loader::maps::addr_bytes,
    policy::{PolicySet, PolicyStore},
};
use portcullis_e2e::{
    devtoken::{self, KeygenOutput, MintClaims},
    pipeline::{Parts, Pipeline},
};
use portcullis_knock::{KnockOptions, build_knock};
use portcullis_testkit::TempDir;

const CONFIG: &str = r#"
[kernel]
interfaces = ["unused0"]
[tokens]
jwks_file = "/unused/jwks.json"
issuer = "https://dev"
audience = "pc"
[[services]]
name = "llm"
port = 8000
[[services]]
name = "trainer"
port = 8100
action = "retrain"
"#;

struct Fixture {
    p: Pipeline,
    key: std::path::PathBuf,
    _dir: TempDir,
}

fn fixture(tag: &str) -> Fixture {
    fixture_with(tag, CONFIG, default_policies(), None)
}

/// A development issuer in a new directory, and a verifier of its tokens.
fn issuer(tag: &str) -> (TempDir, KeygenOutput, Arc<Verifier>) {
    let dir = TempDir::new(tag).expect("temp dir");
    let out = devtoken::keygen(&dir.path().join("issuer")).expect("keygen");
    let jwks = Arc::new(JwksFile::load(&out.jwks_path, false).expect("jwks"));
    let verifier = Arc::new(Verifier::new(TokenPolicy::new("https://dev", "pc"), jwks));
    (dir, out, verifier)
}

fn fixture_with(
    tag: &str,
    config: &str,
    policies: Arc<PolicyStore>,
    spend: Option<Arc<SpendBook>>,
) -> Fixture {
    let (dir, out, verifier) = issuer(tag);
    let cfg = Config::from_toml_str(config).expect("config");
    let p = Pipeline::open(
        cfg,
        Parts {
            verifier,
            policies,
            spend,
        },
    )
    .expect("the knock pipeline (root?)");
    Fixture {
        p,
        key: out.key_path,
        _dir: dir,
    }
}

/// The built-in policy: what the token's scope grants.
fn default_policies() -> Arc<PolicyStore> {
    Arc::new(PolicyStore::fixed(PolicySet::default_set()))
}

fn token(f: &Fixture, subject: &str, scope: &str) -> String {
    mint_as(&f.key, subject, Some("acme"), scope)
}

/// A token of the development issuer `key` for `subject` in `tenant`.
fn mint_as(key: &std::path::Path, subject: &str, tenant: Option<&str>, scope: &str) -> String {
    devtoken::mint(
        key,
        MintClaims {
            issuer: "https://dev".into(),
            audience: "pc".into(),
            subject: subject.into(),
            tenant: tenant.map(Into::into),
            client_id: None,
            roles: vec![],
            scopes: vec![scope.into()],
            ttl: Duration::from_secs(300),
            cnf_jkt: None,
        },
    )
    .expect("mint")
}

fn datagram(token: &str, service: &str, nonce: u8) -> Vec<u8> {
    let opts = KnockOptions::new("127.0.0.1:62201".parse().unwrap(), token, service);
    build_knock(&opts, [nonce; 16], SystemTime::now()).expect("build knock")
}

fn peer(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::from([10, 9, 0, last]), 40000)
}

fn admitted(f: &Fixture, last: u8, service_id: u32) -> bool {
    f.p.enforcer.observe(|m| {
        m.admissions()
            .iter()
            .any(|(k, _)| k.addr == addr_bytes(peer(last).ip()) && k.service == service_id)
    })
}

fn service_id(name: &str) -> u32 {
    portcullis_agent::config::service_id(name)
}

#[tokio::test]
async fn valid_knock_admits_and_replies_replay_and_scope_are_refused() {
    let f = fixture("grant");
    let tok = token(&f, "alice", "model:llm:invoke");
    let d = datagram(&tok, "llm", 1);
    let g =
        f.p.service
            .handle(&d, peer(1), SystemTime::now())
            .await
            .expect("granted");
    assert_eq!((g.subject.as_str(), g.service.as_str()), ("alice", "llm"));
    let reply = f.p.service.reply(&g).expect("a reply");
    assert!(reply.len() <= d.len(), "never amplifies");
    assert!(admitted(&f, 1, service_id("llm")));
    // The identity is tenant-qualified in the kernel.
    let slot =
        f.p.enforcer
            .observe(|m| m.find_identity(IdentityName::new(Some("acme"), "alice").key()))
            .unwrap();
    assert_eq!(slot, Some(g.slot));

    let replay =
        f.p.service
            .handle(&d, peer(1), SystemTime::now())
            .await
            .unwrap_err();
    assert_eq!(replay.reason(), "replayed_nonce");
    let wrong =
        f.p.service
            .handle(&datagram(&tok, "trainer", 2), peer(2), SystemTime::now())
            .await
            .unwrap_err();
    assert_eq!(wrong.reason(), "scope");
    assert!(!admitted(&f, 2, service_id("trainer")));
    let unknown =
        f.p.service
            .handle(&datagram(&tok, "nosuch", 3), peer(3), SystemTime::now())
            .await
            .unwrap_err();
    assert_eq!(unknown.reason(), "unknown_service");
    let counts = f.p.service.counters().snapshot();
    for reason in ["replayed_nonce", "scope", "unknown_service"] {
        assert!(counts.contains(&(reason, 1)), "{reason}: {counts:?}");
    }
}

#[tokio::test]
async fn refused_knock_does_not_burn_its_nonce() {
    // A junk token with a fresh nonce must not occupy the nonce: only
    // verified knocks are remembered (else junk could fill the cache).
    let f = fixture("nonce");
    let bad =
        f.p.service
            .handle(
                &datagram("not.a.token", "llm", 7),
                peer(7),
                SystemTime::now(),
            )
            .await
            .unwrap_err();
    assert_eq!(bad.reason().split('_').next(), Some("token"), "{bad}");
    let tok = token(&f, "bob", "model:*:invoke");
    f.p.service
        .handle(&datagram(&tok, "llm", 7), peer(7), SystemTime::now())
        .await
        .expect("same nonce, valid token: granted");
}

#[tokio::test]
async fn revoking_a_subject_cuts_its_admissions_and_refuses_its_tokens() {
    let f = fixture("sub");
    let tok = token(&f, "carol", "model:llm:invoke");
    f.p.service
        .handle(&datagram(&tok, "llm", 1), peer(1), SystemTime::now())
        .await
        .expect("granted");
    assert!(admitted(&f, 1, service_id("llm")));
    let change = Change {
        added: Revocations {
            subjects: ["carol".to_string()].into(),
            ..Revocations::default()
        },
        ..Change::default()
    };
    let done = apply_revocations(
        &f.p.admitter,
        &f.p.enforcer,
        &change,
        "test",
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!((done.subjects, done.identities, done.admissions), (1, 1, 1));
    assert!(!admitted(&f, 1, service_id("llm")));
    let again =
        f.p.service
            .handle(&datagram(&tok, "llm", 2), peer(1), SystemTime::now())
            .await
            .unwrap_err();
    assert_eq!(again.reason(), "subject_revoked");
}

#[tokio::test]
async fn revoking_a_jti_cuts_that_tokens_admissions_only() {
    let f = fixture("jti");
    let t1 = token(&f, "dave", "model:llm:invoke");
    let t2 = token(&f, "erin", "model:llm:invoke");
    f.p.service
        .handle(&datagram(&t1, "llm", 1), peer(1), SystemTime::now())
        .await
        .expect("t1 granted");
    f.p.service
        .handle(&datagram(&t2, "llm", 2), peer(2), SystemTime::now())
        .await
        .expect("t2 granted");
    let jti = jti_of(&t1);
    let change = Change {
        added: Revocations {
            jtis: [jti].into(),
            ..Revocations::default()
        },
        ..Change::default()
    };
    let done = apply_revocations(
        &f.p.admitter,
        &f.p.enforcer,
        &change,
        "test",
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!((done.jtis, done.admissions), (1, 1));
    assert!(!admitted(&f, 1, service_id("llm")));
    assert!(
        admitted(&f, 2, service_id("llm")),
        "the other token is untouched"
    );
    let again =
        f.p.service
            .handle(&datagram(&t1, "llm", 3), peer(1), SystemTime::now())
            .await
            .unwrap_err();
    assert_eq!(again.reason(), "jti_revoked");
}

/// The `jti` claim of a compact JWT (test helper; no verification).
fn jti_of(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    v["jti"].as_str().expect("jti").to_string()
}

#[tokio::test]
async fn idle_identity_slots_are_reclaimed_after_revocation() {
    let f = fixture("reclaim");
    let tok = token(&f, "frank", "model:llm:invoke");
    let g =
        f.p.service
            .handle(&datagram(&tok, "llm", 1), peer(1), SystemTime::now())
            .await
            .expect("granted");
    let now = portcullis_agent::loader::clock::monotonic_ns();
    f.p.enforcer.observe(|maps| {
        assert_eq!(maps.reclaim_idle(now).unwrap(), 0, "still admitted");
        maps.revoke_identity(g.slot).unwrap();
        assert_eq!(
            maps.reclaim_idle(now).unwrap(),
            1,
            "nothing refers to it now"
        );
        assert_eq!(
            maps.identity(g.slot).unwrap().state,
            portcullis_common::IDENTITY_FREE
        );
    });
}

#[tokio::test]
async fn exhausted_identity_slots_are_a_clean_refusal() {
    let f = fixture("full");
    f.p.enforcer.observe(|maps| {
        for i in 1..portcullis_common::MAX_IDENTITIES {
            let ident = portcullis_common::Identity {
                key: identity_key(&format!("filler-{i}")),
                ..Default::default()
            };
            maps.upsert_identity(ident, &format!("filler-{i}"))
                .expect("a free slot");
        }
    });
    let tok = token(&f, "grace", "model:llm:invoke");
    let err =
        f.p.service
            .handle(&datagram(&tok, "llm", 1), peer(1), SystemTime::now())
            .await
            .unwrap_err();
    assert_eq!(err.reason(), "identity_slots_exhausted", "{err}");
    assert!(!admitted(&f, 1, service_id("llm")));
}

#[tokio::test]
async fn policy_decides_on_spend_and_forecast_from_the_accountant() {
    let ledger = std::env::temp_dir().join(format!("pcl-pipe-ledger-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&ledger);
    // llm costs 600 per connection; invoking is forbidden past 1000 spent.
    let config = CONFIG.replace(
        "port = 8000\n",
        "port = 8000\nprice = { per_connection_micros = 600 }\n",
    ) + &format!(
        "[accounting]\nledger = {:?}\n",
        ledger.display().to_string()
    );
    let cfg = Config::from_toml_str(&config).expect("config");
    let policies = PolicySet::from_sources(
        &[
            ("a.cedar".into(), portcullis_agent::policy::DEFAULT_POLICY.into()),
            (
                "spend.cedar".into(),
                "@id(\"ceiling\") forbid (principal, action, resource) when { context.spend_month > 1000 };"
                    .into(),
            ),
        ],
        None,
    )
    .expect("policies");
    let book = SpendBook::new();
    let mut acct = Accountant::open(&cfg, book.clone()).expect("ledger");
    let f = fixture_with(
        "spend",
        &config,
        Arc::new(PolicyStore::fixed(policies)),
        Some(book.clone()),
    );
    let tok = token(&f, "alice", "model:llm:invoke");
    let g =
        f.p.service
            .handle(&datagram(&tok, "llm", 1), peer(1), SystemTime::now())
            .await
            .expect("nothing spent yet");
    // Two connections of alice's (as the kernel would count them).
    let name = IdentityName::new(Some("acme"), "alice").display();
    let usage = portcullis_agent::loader::maps::Usage {
        slot: g.slot,
        identity_key: identity_key(&name),
        service: service_id("llm"),
        stats: portcullis_common::IdentityStats {
            connections: 2,
            ..Default::default()
        },
    };
    acct.tick(SystemTime::now(), "test/1", &[usage])
        .expect("tick");
    assert_eq!(book.spend(&name, Some("acme")).0, 1_200);
    let err =
        f.p.service
            .handle(&datagram(&tok, "llm", 2), peer(1), SystemTime::now())
            .await
            .expect_err("over the ceiling");
    assert_eq!(err.reason(), "policy", "{err}");
    // Others are unaffected; the accountant named alice from the admitter.
    let tok_b = token(&f, "bob", "model:llm:invoke");
    f.p.service
        .handle(&datagram(&tok_b, "llm", 3), peer(2), SystemTime::now())
        .await
        .expect("bob spent nothing");
    let report = acct.take_report(SystemTime::now()).expect("a report");
    assert_eq!(report.lines[0].identity, name);
    assert_eq!(report.lines[0].tenant, "acme");
    let _ = std::fs::remove_file(&ledger);
}

fn spoofed(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::from((0x0a40_0000u32 + i).to_be_bytes()), 40000)
}

/// One identity knocking from many (spoofed) sources with one valid token
/// takes at most `max_sources_per_identity` admissions to a service; the
/// rest are refused as `identity_quota`, other identities are unaffected,
/// and what the agent tracks per admission is freed by a revocation.
#[tokio::test]
async fn one_identity_cannot_fill_the_admissions_table() {
    let config = CONFIG.replace(
        "name = \"llm\"\nport = 8000\n",
        "name = \"llm\"\nport = 8000\nmax_sources_per_identity = 8\n",
    );
    let f = fixture_with("quota", &config, default_policies(), None);
    let tok = token(&f, "mallory", "model:llm:invoke");
    let now = SystemTime::now();
    let mut granted = 0;
    let mut refused = 0;
    for i in 0..200u32 {
        let mut nonce = [0u8; 16];
        nonce[..4].copy_from_slice(&i.to_be_bytes());
        let opts = KnockOptions::new("127.0.0.1:62201".parse().unwrap(), tok.clone(), "llm");
        let d = build_knock(&opts, nonce, now).unwrap();
        match f.p.service.handle(&d, spoofed(i), now).await {
            Ok(_) => granted += 1,
            Err(e) => {
                assert_eq!(e.reason(), "identity_quota", "{e}");
                assert!(e.to_string().contains("max_sources_per_identity"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((granted, refused), (8, 192));
    assert_eq!(f.p.enforcer.observe(|m| m.admissions().len()), 8);
    assert_eq!(f.p.admitter.tracked_admissions(), 8);
    // A re-knock from a source it holds extends, it does not count twice.
    let again = build_knock(
        &KnockOptions::new("127.0.0.1:62201".parse().unwrap(), tok.clone(), "llm"),
        [0xee; 16],
        now,
    )
    .unwrap();
    f.p.service
        .handle(&again, spoofed(3), now)
        .await
        .expect("re-knock");
    // Another identity, and the same identity for another service, are
    // unaffected.
    let other = token(&f, "alice", "model:llm:invoke");
    f.p.service
        .handle(&datagram(&other, "llm", 7), peer(7), now)
        .await
        .expect("alice is not mallory");
    let trainer = token(&f, "mallory", "model:trainer:retrain");
    f.p.service
        .handle(&datagram(&trainer, "trainer", 8), peer(8), now)
        .await
        .expect("another service has its own quota");
    // Revoking the subject frees its admissions, kernel and agent side.
    let change = Change {
        added: Revocations {
            subjects: ["mallory".to_string()].into(),
            ..Revocations::default()
        },
        ..Change::default()
    };
    let done = apply_revocations(&f.p.admitter, &f.p.enforcer, &change, "test", now).unwrap();
    assert_eq!(done.admissions, 9);
    assert_eq!(f.p.admitter.tracked_admissions(), 1, "alice's only");
    assert_eq!(f.p.enforcer.observe(|m| m.admissions().len()), 1);
}

/// A full kernel table is an explicit refusal naming the map and the knob,
/// not an opaque kernel error; and expired admissions are forgotten.
#[tokio::test]
async fn a_full_table_is_a_table_full_refusal() {
    let config = CONFIG.replace("[kernel]\n", "[kernel]\nmax_admissions = 16\n");
    // The same table sizes the agent's loader applies.
    let (_dir, out, verifier) = issuer("tablefull");
    let p = Pipeline::open(
        Config::from_toml_str(&config).expect("config"),
        Parts {
            verifier,
            policies: default_policies(),
            spend: None,
        },
    )
    .expect("the knock pipeline (root?)");
    let now = SystemTime::now();
    let mut reasons = Vec::new();
    for i in 0..20u8 {
        let tok = mint_as(
            &out.key_path,
            &format!("user{i}"),
            Some("acme"),
            "model:llm:invoke",
        );
        if let Err(e) = p
            .service
            .handle(&datagram(&tok, "llm", i), peer(i), now)
            .await
        {
            reasons.push((e.reason(), e.to_string()));
        }
    }
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    for (reason, text) in &reasons {
        assert_eq!(*reason, "table_full");
        assert!(
            text.contains("PCL_ADMIT") && text.contains("kernel.max_admissions"),
            "{text}"
        );
    }
    // Expired admissions leave the agent's tracking on the next upkeep.
    assert_eq!(p.admitter.tracked_admissions(), 16);
    p.admitter.purge(now + Duration::from_secs(4000));
    assert_eq!(p.admitter.tracked_admissions(), 0);
}

/// `id:` revocations and the kernel's names: a tenant-less subject that
/// looks like `tenant/subject` is another identity, and a subject
/// revocation reaches the tenant-qualified identities too.
#[tokio::test]
async fn identities_are_unambiguous_and_revocable_by_name() {
    let f = fixture("names");
    let now = SystemTime::now();
    let knock = async |subject: &str, tenant: &str, i: u8| {
        let tok = mint_as(&f.key, subject, Some(tenant), "model:llm:invoke");
        f.p.service
            .handle(&datagram(&tok, "llm", i), peer(i), now)
            .await
    };
    // Tenants and subjects that contain the separator.
    let a = knock("alice", "acme", 1).await.unwrap();
    let b = knock("alice", "acme/x", 2).await.unwrap();
    let c = knock("x/alice", "acme", 3).await.unwrap();
    assert_ne!(a.slot, b.slot);
    assert_ne!(b.slot, c.slot);
    let names: Vec<String> =
        f.p.enforcer
            .observe(|m| m.live_identities())
            .unwrap()
            .into_iter()
            .map(|(_, _, n)| n)
            .collect();
    assert!(names.contains(&"acme/alice".to_string()), "{names:?}");
    assert!(names.contains(&"acme%2Fx/alice".to_string()), "{names:?}");
    assert!(names.contains(&"acme/x%2Falice".to_string()), "{names:?}");
    // One identity by name: only acme/alice.
    let change = Change {
        added: Revocations {
            identities: [IdentityName::new(Some("acme"), "alice")].into(),
            ..Revocations::default()
        },
        ..Change::default()
    };
    let done = apply_revocations(&f.p.admitter, &f.p.enforcer, &change, "test", now).unwrap();
    assert_eq!((done.named, done.identities, done.admissions), (1, 1, 1));
    assert!(!admitted(&f, 1, service_id("llm")) && admitted(&f, 2, service_id("llm")));
    let e = knock("alice", "acme", 4).await.unwrap_err();
    assert_eq!(e.reason(), "identity_revoked");
    // The subject everywhere: acme%2Fx/alice too, not acme/x%2Falice.
    let change = Change {
        added: Revocations {
            subjects: ["alice".to_string()].into(),
            ..Revocations::default()
        },
        ..Change::default()
    };
    let done = apply_revocations(&f.p.admitter, &f.p.enforcer, &change, "test", now).unwrap();
    assert_eq!(done.admissions, 1);
    assert!(!admitted(&f, 2, service_id("llm")) && admitted(&f, 3, service_id("llm")));
}
