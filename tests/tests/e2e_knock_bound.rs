//! End to end: knocks bound to a key or to a claimed address, identities
//! as operators see and revoke them, and one identity knocking from many
//! spoofed sources. The real agent, the real `portcullis knock` CLI and the
//! kernel in network namespaces, IPv4.
//!
//! The tests of this file run one at a time (`e2e::serial`).

use portcullis_e2e::e2e;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use e2e::{
    OK_TIMEOUT, PROTECTED_PORT, SERVICE,
    knock::{KnockEnv, KnockSettings, SUBJECT, TENANT, random_nonce, strip_ansi},
    serial,
};
use portcullis_e2e::devtoken;
use portcullis_knock::{KnockOptions, PopKey, build_knock};
use portcullis_testkit::poll_until;

const INVOKE: &str = "model:llm:invoke";
const TOKEN_TTL: Duration = Duration::from_secs(300);

/// A proof-of-possession key written as PKCS#8 for `--pop-key`.
fn pop_key(k: &KnockEnv, name: &str) -> (PopKey, String) {
    let (key, der) = PopKey::generate_ed25519().expect("key");
    let path = k.env.state_dir().join(format!("{name}.p8"));
    std::fs::write(&path, der).expect("write key");
    (key, path.to_str().expect("utf-8").to_owned())
}

/// A token bound to `key` (`cnf.jkt`, RFC 7800 / RFC 9449 §6.1).
fn bound_token(k: &KnockEnv, key: &PopKey) -> String {
    let mut claims = k.claims(&[INVOKE], TOKEN_TTL);
    claims.cnf_jkt = Some(key.thumbprint());
    devtoken::mint(&k.issuer.key_path, claims).expect("mint")
}

/// A key-bound token admits only with a proof from its key: no proof and
/// another key's proof are refused (silently), the right key admits.
#[test]
fn a_key_bound_token_admits_only_with_its_key() {
    let _s = serial();
    let k = KnockEnv::start("popkey", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let (key, key_file) = pop_key(&k, "client");
    let (_, other_file) = pop_key(&k, "other");
    let token = bound_token(&k, &key);

    k.knock_refused(false, &token, SERVICE, "no proof");
    assert!(k.wait_refused("pop_missing", OK_TIMEOUT), "{}", k.log());
    let out = k.knock_cli(
        false,
        &token,
        SERVICE,
        Duration::from_millis(700),
        0,
        &["--pop-key", &other_file],
    );
    assert_eq!(out.status.code(), Some(1), "another key's proof is refused");
    assert!(
        k.wait_refused("pop_key_mismatch", OK_TIMEOUT),
        "{}",
        k.log()
    );
    assert!(k.admissions().is_empty());
    k.env
        .assert_dropped(false, PROTECTED_PORT, false, "refused proofs admit nothing");

    k.knock_ok(false, &token, SERVICE, &["--pop-key", &key_file]);
    k.env
        .assert_echo(false, PROTECTED_PORT, "the right key admits");
    let client = k.env.topo.client_addr(false);
    assert!(k.admission(client, SERVICE, 0).is_some());
}

/// A client behind NAT claims its address: that address, and no other, is
/// admitted, and only with a key-bound token and its proof.
#[test]
fn a_claimed_address_is_admitted_and_no_other() {
    let _s = serial();
    let k = KnockEnv::start("claimed", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let (key, key_file) = pop_key(&k, "client");
    let claimed = k.env.topo.client_alt_addr(false).to_string();

    // A bearer token cannot claim an address (anyone holding it could
    // admit anyone).
    let bearer = k.mint(&[INVOKE], TOKEN_TTL);
    let out = k.knock_cli(
        false,
        &bearer,
        SERVICE,
        Duration::from_millis(700),
        0,
        &["--client-addr", &claimed, "--pop-key", &key_file],
    );
    assert_eq!(out.status.code(), Some(1), "a bearer token claims nothing");
    assert!(k.wait_refused("pop_unbound", OK_TIMEOUT), "{}", k.log());
    assert!(k.admissions().is_empty());

    let token = bound_token(&k, &key);
    k.knock_ok(
        false,
        &token,
        SERVICE,
        &["--client-addr", &claimed, "--pop-key", &key_file],
    );
    let alt = k.env.topo.client_alt_addr(false);
    let main = k.env.topo.client_addr(false);
    assert!(
        k.admission(alt, SERVICE, 0).is_some(),
        "{:?}",
        k.admissions()
    );
    assert!(
        k.admission(main, SERVICE, 0).is_none(),
        "{:?}",
        k.admissions()
    );
    let mut s = k
        .env
        .connect_alt(false, PROTECTED_PORT, OK_TIMEOUT)
        .expect("the claimed address connects");
    portcullis_testkit::echo_roundtrip(&mut s, b"nat", OK_TIMEOUT).expect("echo");
    k.env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "the knock's own source was not claimed",
    );
}

/// `agent status` names identities as `tenant/subject`; `agent revoke
/// --identity alice` finds no bare `alice` and says which identities have
/// that subject; `--tenant acme --subject alice` revokes that identity's
/// tokens (and nobody else's).
#[test]
fn identities_are_named_and_revoked_as_shown() {
    let _s = serial();
    let k = KnockEnv::start("names", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    k.knock_ok(false, &token, SERVICE, &[]);
    let name = format!("{TENANT}/{SUBJECT}");
    let status = k.env.cli_ok("status", &[]);
    assert!(status.contains(&format!("identity={name} ")), "{status}");

    let out = k.env.cli("revoke", &["--identity", SUBJECT]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&name) && err.contains(&format!("--tenant {TENANT} --subject {SUBJECT}")),
        "says which identities match and how to revoke one: {err}"
    );
    k.env
        .assert_echo(false, PROTECTED_PORT, "nothing was revoked");

    let out = k
        .env
        .cli_ok("revoke", &["--tenant", TENANT, "--subject", SUBJECT]);
    assert!(out.contains(&name), "{out}");
    let revocations = std::fs::read_to_string(k.env.state_dir().join("revocations")).unwrap();
    assert!(revocations.contains(&format!("id:{name}")), "{revocations}");
    k.env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "revoked in the kernel at once",
    );
    // The agent refuses the identity's tokens from now on.
    assert!(
        k.wait_log("revocations applied", Duration::from_secs(3)),
        "{}",
        k.log()
    );
    k.knock_refused(false, &token, SERVICE, "a revoked identity's token");
    assert!(
        k.wait_refused("identity_revoked", OK_TIMEOUT),
        "{}",
        k.log()
    );
}

/// The agent's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Knock datagrams for `token` from `count` spoofed IPv4 sources
/// (10.66.0.0/16), sent as raw packets from the client namespace.
fn spoofed_knocks(k: &KnockEnv, token: &str, first: u32, count: u32) {
    let server = k.knock_addr(false);
    let IpAddr::V4(dst) = server.ip() else {
        panic!("IPv4 server")
    };
    let datagrams: Vec<(Ipv4Addr, Vec<u8>)> = (first..first + count)
        .map(|i| {
            let src = Ipv4Addr::from(0x0a42_0000u32 + i);
            let opts = KnockOptions::new(server, token, SERVICE);
            let d =
                build_knock(&opts, random_nonce(), std::time::SystemTime::now()).expect("knock");
            (src, d)
        })
        .collect();
    k.env
        .topo
        .client
        .run(move || {
            // SAFETY: a raw socket of our own; IPPROTO_RAW implies
            // IP_HDRINCL (raw(7)); the kernel fills the checksum and length.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            for (n, (src, payload)) in datagrams.iter().enumerate() {
                let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
                p.extend_from_slice(&src.octets());
                p.extend_from_slice(&dst.octets());
                p.extend_from_slice(&40000u16.to_be_bytes());
                p.extend_from_slice(&e2e::KNOCK_PORT.to_be_bytes());
                p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
                p.extend_from_slice(&[0, 0]);
                p.extend_from_slice(payload);
                // SAFETY: valid buffer and address.
                let sent = unsafe {
                    libc::sendto(
                        fd,
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                assert_eq!(
                    sent,
                    p.len() as isize,
                    "{}",
                    std::io::Error::last_os_error()
                );
                if n % 100 == 99 {
                    // Pacing, not synchronisation: about 2000 knocks a
                    // second, under the node-wide pre-auth limit.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fd) };
        })
        .expect("client namespace");
}

/// Refusals of `reason` the agent has reported so far (its periodic
/// `knocks_refused` log lines).
fn refused(k: &KnockEnv, reason: &str) -> u64 {
    let field = format!("reason=\"{reason}\"");
    strip_ansi(&k.log())
        .lines()
        .filter(|l| l.contains("knocks_refused") && l.contains(&field))
        .filter_map(|l| l.split("count=").nth(1))
        .filter_map(|c| c.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One valid token knocking from thousands of spoofed sources takes at most
/// its quota of admissions (`max_sources_per_identity`, 64 by default); the
/// rest are refused as `identity_quota`, another identity is admitted as
/// usual, and the agent's memory stays bounded and comes back after a
/// revocation.
#[test]
fn one_identity_from_spoofed_sources_is_capped_and_memory_stays_bounded() {
    let _s = serial();
    const FLOOD: u32 = 5000;
    const MIB: u64 = 1 << 20;
    let settings = KnockSettings {
        // Per source: one knock each. Node-wide: not the limit under test.
        knock_global: (1_000_000, 100_000),
        ..KnockSettings::default()
    };
    let k = KnockEnv::start("spoofed", &settings);
    // Spoofed sources have no route back from the server: let them in.
    for key in [
        "net/ipv4/conf/all/rp_filter".to_owned(),
        format!("net/ipv4/conf/{}/rp_filter", k.env.topo.server_if),
    ] {
        k.env.topo.server.set_sysctl(&key, "0").expect("rp_filter");
    }
    let pid = k
        .env
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .expect("agent pid");
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    // Warm-up: the quota fills and the agent's allocations settle.
    spoofed_knocks(&k, &token, 0, 500);
    poll_until(Duration::from_secs(10), || {
        (refused(&k, "identity_quota") >= 400).then_some(())
    })
    .unwrap_or_else(|| panic!("warm-up refusals; log:\n{}", k.log()));
    let baseline = rss(pid);

    spoofed_knocks(&k, &token, 500, FLOOD);
    poll_until(Duration::from_secs(20), || {
        (refused(&k, "identity_quota") >= 436 + u64::from(FLOOD) * 95 / 100).then_some(())
    })
    .unwrap_or_else(|| panic!("flood refusals: {}", refused(&k, "identity_quota")));
    let ours: Vec<_> = k
        .admissions()
        .into_iter()
        .filter(|a| matches!(a.source, IpAddr::V4(v) if v.octets()[..2] == [10, 66]))
        .collect();
    assert_eq!(ours.len(), 64, "the identity's quota");
    let after_flood = rss(pid);

    // Another identity is unaffected.
    let mut claims = k.claims(&[INVOKE], TOKEN_TTL);
    claims.subject = "bob".into();
    let bob = devtoken::mint(&k.issuer.key_path, claims).expect("mint");
    k.knock_ok(false, &bob, SERVICE, &[]);

    k.env.cli_ok("revoke", &["--subject", SUBJECT]);
    poll_until(Duration::from_secs(5), || {
        k.admissions()
            .iter()
            .all(|a| !matches!(a.source, IpAddr::V4(v) if v.octets()[..2] == [10, 66]))
            .then_some(())
    })
    .expect("revoked in the kernel");
    assert!(
        k.wait_log("revocations applied", Duration::from_secs(3)),
        "{}",
        k.log()
    );
    let after_revoke = rss(pid);
    eprintln!(
        "agent RSS: {} KiB before, {} KiB after {FLOOD} spoofed knocks, {} KiB after the revocation",
        baseline / 1024,
        after_flood / 1024,
        after_revoke / 1024
    );
    assert!(
        after_flood < baseline + 3 * MIB,
        "RSS grew {} KiB over {FLOOD} spoofed knocks",
        (after_flood - baseline) / 1024
    );
    assert!(
        after_revoke < baseline + 3 * MIB,
        "RSS {} KiB over the baseline after the revocation",
        after_revoke.saturating_sub(baseline) / 1024
    );
}
