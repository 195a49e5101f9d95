//! `portcullis-bench control [--n N]`: the control API of a real agent in
//! network namespaces (the e2e harness). `Admit` over the Unix socket next
//! to a knock with the same token and a knock from a new identity each
//! time, timed from the request to the grant's answer (the grant durable
//! and in the kernel); and `Revoke`, timed from the call to its return, by
//! which the admission is gone from the kernel (checked after every call).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use portcullis_e2e::e2e::{
    SERVICE,
    control::client,
    knock::{KnockEnv, KnockSettings},
};
use portcullis_proto::v1;

use crate::support::{Row, parse_n};

const USAGE: &str = "usage: portcullis-bench control [--n N]
  --n N   calls per row (default 1000)";

pub fn main(args: impl Iterator<Item = String>) -> Result<()> {
    let n = parse_n(args, 1000, 10..=100_000, USAGE)?;
    let k = KnockEnv::start(
        "bctl",
        &KnockSettings {
            control: "calls_per_sec = 100000\ncalls_burst = 100000\n".into(),
            knock_per_source: (100_000, 100_000),
            knock_global: (100_000, 100_000),
            service_extra: "max_sources_per_identity = 1000000".into(),
            ..KnockSettings::default()
        },
    );
    let token = k.mint(&["model:llm:invoke"], Duration::from_secs(3600));
    let client_addr = k.env.topo.client_addr(false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // Knocks from the client namespace, each waiting for its signed reply.
    let sock = k.client_udp(false, None);
    let knocks = |tokens: &[&str], what: &str| -> Result<Row> {
        let mut lat = Vec::with_capacity(tokens.len());
        let started = Instant::now();
        for (i, t) in tokens.iter().enumerate() {
            let (d, nonce) = k.datagram(false, t, SERVICE, 0);
            let at = Instant::now();
            sock.send_to(&d, k.knock_addr(false))?;
            if k.await_reply(&sock, &nonce, Duration::from_secs(5))
                .is_none()
            {
                bail!("{what} {i}: no reply");
            }
            lat.push(at.elapsed());
        }
        Ok(Row::new(lat, started.elapsed()))
    };
    let knock = knocks(&vec![token.as_str(); n], "knock")?;

    // Knocks from identities the node has never seen (subjects new-0,
    // new-1, ...): each allocates an identity slot. At most 3000, as the
    // node has 4095 slots.
    let fresh: Vec<String> = (0..n.min(3000))
        .map(|i| {
            let mut c = k.claims(&["model:llm:invoke"], Duration::from_secs(3600));
            c.subject = format!("new-{i}");
            portcullis_e2e::devtoken::mint(&k.issuer.key_path, c).context("mint")
        })
        .collect::<Result<_>>()?;
    let fresh: Vec<&str> = fresh.iter().map(String::as_str).collect();
    let new_identity = knocks(&fresh, "new-identity knock")?;

    let (admit, revoke) = rt.block_on(async {
        let mut c = client(&k.env).await;
        let admit_req = |addr: IpAddr| v1::AdmitRequest {
            token: token.clone(),
            service: SERVICE.into(),
            client_address: addr.to_string(),
            source_port: 0,
        };
        let mut admit = Vec::with_capacity(n);
        let started = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            c.admit(admit_req(client_addr)).await.context("Admit")?;
            admit.push(t.elapsed());
        }
        let admit = Row::new(admit, started.elapsed());
        // Revoke: admit a source, then time its revocation.
        let mut revoke = Vec::with_capacity(n);
        let started = Instant::now();
        for i in 0..n {
            let src: IpAddr = format!("10.99.{}.{}", i / 250, i % 250 + 1).parse()?;
            c.admit(admit_req(src))
                .await
                .context("Admit before Revoke")?;
            let t = Instant::now();
            let r = c
                .revoke(v1::RevokeRequest {
                    target: Some(v1::revoke_request::Target::Source(src.to_string())),
                    reason: "bench".into(),
                })
                .await
                .context("Revoke")?
                .into_inner();
            revoke.push(t.elapsed());
            if r.admissions_removed != 1 || k.admission(src, SERVICE, 0).is_some() {
                bail!("revoke {i}: the admission of {src} is still in the kernel");
            }
        }
        anyhow::Ok((admit, Row::new(revoke, started.elapsed())))
    })?;

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("control API on a Unix socket, one caller, {n} calls per row");
    println!("| path | p50 ms | p99 ms | per second |");
    println!("|---|---|---|---|");
    for (name, r) in [
        ("knock (UDP, signed reply)", &knock),
        ("knock, a new identity each time", &new_identity),
        ("Admit RPC, same token", &admit),
        ("Revoke RPC (effective in the kernel on return)", &revoke),
    ] {
        println!(
            "| {name} | {:.3} | {:.3} | {:.0} |",
            ms(r.pct(0.5)),
            ms(r.pct(0.99)),
            r.per_sec()
        );
    }
    println!(
        "Admit / knock p50: {:.2}x; Revoke p99 target 10 ms: {}",
        admit.pct(0.5).as_secs_f64() / knock.pct(0.5).as_secs_f64(),
        if revoke.pct(0.99) < Duration::from_millis(10) {
            "met".to_string()
        } else {
            format!("missed by {:.3} ms", ms(revoke.pct(0.99)) - 10.0)
        }
    );
    Ok(())
}
