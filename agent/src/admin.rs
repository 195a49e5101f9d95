//! Break-glass administration on the pinned maps, usable whether or not the
//! agent runs: status, admit, revoke, detach. (The gRPC control API comes
//! later; these stay as the root-only local path.)

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, bail};
use portcullis_common::Reason;

use crate::{
    admission::{
        admitter::IdentityMatch,
        revocations::{self, Entry},
    },
    config::Config,
    enforce::{CutTarget, Enforcer},
    identity::IdentityName,
    loader::{Kernel, Maps, bpffs, maps::bytes_addr},
};

/// The pinned maps need root (CAP_BPF and CAP_SYS_ADMIN, and the bpf
/// filesystem is root's): say so rather than "no pinned state".
pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("permission denied (run as root): {what} reads and writes the kernel's pinned maps");
    }
    Ok(())
}

/// Writes go through the enforcer, as the agent's do.
fn enforcer(cfg: &Config) -> anyhow::Result<Enforcer> {
    Ok(Enforcer::new(maps(cfg)?, std::sync::Arc::new(cfg.clone())))
}

fn maps(cfg: &Config) -> anyhow::Result<Maps> {
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
    let mut m = maps(cfg)?;
    let counts = m.reason_counts()?;
    for r in Reason::ALL {
        println!("{} {}", r.name(), counts[r as usize]);
    }
    // What shadow-mode services would have dropped (passed instead).
    for r in Reason::ALL {
        let n = counts[(portcullis_common::SHADOW_COUNTERS + r as u32) as usize];
        if n > 0 {
            println!("shadow_{} {n}", r.name());
        }
    }
    // What an operator enrolls on the collector.
    println!("node_id {}", cfg.agent.node_id);
    match portcullis_trail::node_key::NodeKey::load(&cfg.agent.node_key) {
        Ok(k) => println!("node_key {}", portcullis_trail::hex::hex(&k.public_key())),
        Err(e) => println!("node_key unreadable ({e})"),
    }
    let durability = bpffs::durability(&cfg.kernel.pin_dir)
        .map_or_else(|e| format!("unknown ({e})"), |d| d.describe());
    println!("pins {durability}");
    let flows = m.flow_count() as u32;
    for t in m.occupancy(Some(flows))? {
        println!(
            "table {} {}/{} {}% raise={}",
            t.map,
            t.entries,
            t.capacity,
            t.percent(),
            t.knob
        );
    }
    let identities = m.live_identities()?;
    let flow_counts = m.flow_counts()?;
    println!("identities {}", identities.len());
    for (slot, id, name) in &identities {
        println!(
            "  identity={} slot={} state={} flows={} max_flows={}",
            name,
            slot,
            match id.state {
                portcullis_common::IDENTITY_LIVE => "live",
                portcullis_common::IDENTITY_REVOKED => "revoked",
                _ => "free",
            },
            flow_counts.get(*slot as usize).copied().unwrap_or(0),
            id.max_flows
        );
    }
    let name_of = |slot: u32| {
        identities
            .iter()
            .find(|(s, _, _)| *s == slot)
            .map_or_else(|| format!("#{slot}"), |(_, _, n)| n.clone())
    };
    let service_of = |id: u32| {
        cfg.services
            .iter()
            .find(|s| s.id == id)
            .map_or_else(|| format!("#{id}"), |s| s.name.clone())
    };
    let admissions = m.admissions();
    println!("admissions {}", admissions.len());
    let now = crate::loader::clock::monotonic_ns();
    for (k, v) in admissions {
        let left = v.expires_ns.saturating_sub(now) / 1_000_000_000;
        println!(
            "  source={} service={} source_port={} identity={} expires_in_secs={}",
            bytes_addr(k.addr),
            service_of(k.service),
            k.src_port,
            name_of(v.identity),
            left
        );
    }
    println!("flows {flows}");
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
        Some(p) => portcullis_trail::frame::read_segment_file(p)
            .with_context(|| format!("reading {}", p.display()))?
            .frames
            .last()
            .and_then(|f| portcullis_trail::frame::peek_seq(f))
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
    enforcer(cfg)?.admit_named(identity, source, id, source_port, ttl)?;
    println!(
        "admitted {identity} from {source} to {service} for {}s",
        ttl.as_secs()
    );
    Ok(())
}

/// Revokes one kernel identity, named as `agent status` shows it
/// (`alice`, `acme/alice`). A name that matches no identity but is the
/// subject of tenant-qualified ones says which.
pub fn revoke_identity(cfg: &Config, identity: &str) -> anyhow::Result<()> {
    let Some(name) = IdentityName::parse(identity) else {
        bail!(
            "--identity {identity:?}: not an identity name; use the name `agent status` shows (`alice`, or `acme/alice` for subject alice of tenant acme; a `/` or `%` inside a part is written %2F, %25)"
        );
    };
    let e = enforcer(cfg)?;
    if let Some((slot, n)) = e.revoke_identity(&name)? {
        println!("revoked identity {name} (slot {slot}); removed {n} admissions");
        return Ok(());
    }
    let similar: Vec<String> = e
        .observe(|m| m.live_identities())?
        .into_iter()
        .map(|(_, _, n)| n)
        .filter(|n| IdentityName::parse(n).is_some_and(|p| p.subject == identity))
        .collect();
    match similar.first() {
        None => bail!(
            "--identity {identity}: the kernel holds no such identity (never admitted, or already reclaimed); `agent status` lists the identities it holds"
        ),
        Some(first) => {
            let example = IdentityName::parse(first).expect("listed names parse");
            bail!(
                "--identity {identity}: no identity has exactly this name, but {} of subject {identity:?} in a tenant do: {}; revoke one with --identity {first}, or every token of one with --tenant {} --subject {}",
                similar.len(),
                similar.join(", "),
                example.tenant.as_deref().unwrap_or(""),
                example.subject
            )
        }
    }
}

pub fn revoke_source(cfg: &Config, source: IpAddr, service: &str) -> anyhow::Result<()> {
    let id = service_id(cfg, service)?;
    let n = enforcer(cfg)?.revoke_source(source, id)?;
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
    if let Ok(e) = enforcer(cfg) {
        let m = match &entry {
            // A subject in every tenant, and the bare one.
            Entry::Subject(subject) => Some(IdentityMatch::Subject(subject.clone())),
            Entry::Identity(id) => Some(IdentityMatch::Identity(id.clone())),
            Entry::Jti(_) => None,
        };
        if let Some(m) = m {
            let cut = e.cut(CutTarget::Identities(&m))?;
            for name in &cut.identities {
                println!("revoked kernel identity {name}");
            }
            if !cut.identities.is_empty() {
                println!(
                    "removed {} admissions and {} flows",
                    cut.admissions, cut.flows
                );
            }
        }
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
