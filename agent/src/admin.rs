//! Break-glass administration on the pinned maps, usable whether or not the
//! agent runs: status, admit, revoke, detach. (The gRPC control API comes
//! later; these stay as the root-only local path.)

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, bail};
use portcullis_common::Reason;

use crate::{
    admission::revocations::{self, Entry},
    apply,
    audit::spool,
    config::{Config, identity_key},
    kernel::{Kernel, maps::bytes_addr},
};

fn maps(cfg: &Config) -> anyhow::Result<crate::kernel::Maps> {
    Kernel::open_pinned_maps(&cfg.kernel.pin_dir).with_context(|| {
        format!(
            "no pinned portcullis state under {} (is the agent loaded with this config?)",
            cfg.kernel.pin_dir.display()
        )
    })
}

fn service_id(cfg: &Config, name: &str) -> anyhow::Result<u32> {
    match cfg.service(name) {
        Some(s) => Ok(s.id),
        None => bail!(
            "--service {name}: no such service in the config; known: {}",
            cfg.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn status(cfg: &Config) -> anyhow::Result<()> {
    let m = maps(cfg)?;
    let counts = m.reason_counts()?;
    for r in Reason::ALL {
        println!("{} {}", r.name(), counts[r as usize]);
    }
    let admissions = m.admissions();
    println!("admissions {}", admissions.len());
    let now = crate::kernel::clock::monotonic_ns();
    for (k, v) in admissions {
        let left = v.expires_ns.saturating_sub(now) / 1_000_000_000;
        println!(
            "  source={} service={} source_port={} identity_slot={} expires_in_secs={}",
            bytes_addr(k.addr),
            k.service,
            k.src_port,
            v.identity,
            left
        );
    }
    println!("flows {}", m.flow_count());
    let (bytes, last) = spool_state(&cfg.audit.spool_dir)?;
    println!("audit_spool_bytes {bytes}");
    println!("audit_last_seq {last}");
    Ok(())
}

/// Bytes held in the audit spool (events not yet acknowledged by a
/// collector, plus the active segment) and the last sequence number
/// written; read from the files, so it works while the agent is down.
fn spool_state(dir: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(anyhow::anyhow!("audit.spool_dir {}: {e}", dir.display())),
    };
    let mut segments: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pcs"))
        .collect();
    segments.sort();
    let bytes = segments
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let last = match segments.last() {
        Some(p) => spool::read_segment_file(p)
            .with_context(|| format!("reading {}", p.display()))?
            .frames
            .last()
            .and_then(|f| spool::peek_seq(f))
            .unwrap_or(0),
        None => 0,
    };
    Ok((bytes, last))
}

pub fn admit(
    cfg: &Config,
    identity: &str,
    source: IpAddr,
    service: &str,
    ttl: Duration,
    source_port: u16,
) -> anyhow::Result<()> {
    let id = service_id(cfg, service)?;
    let mut m = maps(cfg)?;
    apply::admit(&mut m, cfg, identity, source, id, source_port, ttl)?;
    println!(
        "admitted {identity} from {source} to {service} for {}s",
        ttl.as_secs()
    );
    Ok(())
}

pub fn revoke_identity(cfg: &Config, identity: &str) -> anyhow::Result<()> {
    let mut m = maps(cfg)?;
    let Some(slot) = m.find_identity(identity_key(identity))? else {
        bail!(
            "--identity {identity}: the kernel holds no such identity (never admitted, or already reclaimed)"
        );
    };
    let n = m.revoke_identity(slot)?;
    println!("revoked identity {identity} (slot {slot}); removed {n} admissions");
    Ok(())
}

pub fn revoke_source(cfg: &Config, source: IpAddr, service: &str) -> anyhow::Result<()> {
    let id = service_id(cfg, service)?;
    let mut m = maps(cfg)?;
    let n = m.revoke_source(source, id)?;
    println!("revoked {source} for {service}; removed {n} admissions");
    Ok(())
}

/// Records a token or subject revocation in `tokens.revocations_file`,
/// which the running agent applies within a second (and every agent start
/// re-applies). A subject's kernel identity is also revoked at once, so it
/// works while the agent is down.
pub fn revoke_token(cfg: &Config, entry: Entry) -> anyhow::Result<()> {
    let Some(path) = cfg
        .tokens
        .as_ref()
        .and_then(|t| t.revocations_file.as_ref())
    else {
        bail!(
            "revoking by jti or subject needs tokens.revocations_file in the config (the running agent reads revocations from it)"
        );
    };
    revocations::append(path, &entry)?;
    println!(
        "recorded {entry:?} in {}; the running agent applies it within a second",
        path.display()
    );
    if let Entry::Subject(subject) = &entry
        && let Ok(mut m) = Kernel::open_pinned_maps(&cfg.kernel.pin_dir)
        && let Some(slot) = m.find_identity(identity_key(subject))?
    {
        let n = m.revoke_identity(slot)?;
        println!("revoked kernel identity {subject} (slot {slot}); removed {n} admissions");
    }
    Ok(())
}

pub fn detach(cfg: &Config) -> anyhow::Result<()> {
    let n = Kernel::detach(&cfg.kernel.pin_dir)?;
    println!(
        "detached: removed {n} pins under {}; protected ports are no longer enforced",
        cfg.kernel.pin_dir.display()
    );
    Ok(())
}
