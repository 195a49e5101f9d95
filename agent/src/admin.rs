//! Break-glass administration on the pinned maps, usable whether or not the
//! agent runs: status, admit, revoke, detach. The root-only local path
//! beside the control API (`agent/src/control/`), for when no agent runs.

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

/// What `agent status` prints: read from the pinned maps, the node key
/// and the spool, whether or not an agent runs.
struct NodeStatus {
    drops: Vec<(&'static str, u64)>,
    /// What shadow-mode services would have dropped (passed instead).
    shadow_drops: Vec<(&'static str, u64)>,
    node_id: String,
    /// What an operator enrolls on the collector (hex), or why not.
    node_key: Result<String, String>,
    pins: String,
    tables: Vec<serde_json::Value>,
    identities: Vec<serde_json::Value>,
    admissions: Vec<serde_json::Value>,
    flows: u32,
    audit_spool_bytes: u64,
    audit_last_seq: u64,
}

pub fn status(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let st = node_status(cfg)?;
    if json {
        let drops = |v: &[(&str, u64)]| -> serde_json::Map<String, serde_json::Value> {
            v.iter()
                .map(|(k, n)| ((*k).to_string(), (*n).into()))
                .collect()
        };
        let doc = serde_json::json!({
            "drops": drops(&st.drops),
            "shadow_drops": drops(&st.shadow_drops),
            "node_id": st.node_id,
            "node_key": st.node_key.as_ref().ok(),
            "node_key_error": st.node_key.as_ref().err(),
            "pins": st.pins,
            "tables": st.tables,
            "identities": st.identities,
            "admissions": st.admissions,
            "flows": st.flows,
            "audit_spool_bytes": st.audit_spool_bytes,
            "audit_last_seq": st.audit_last_seq,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    for (r, n) in &st.drops {
        println!("{r} {n}");
    }
    for (r, n) in st.shadow_drops.iter().filter(|(_, n)| *n > 0) {
        println!("shadow_{r} {n}");
    }
    println!("node_id {}", st.node_id);
    match &st.node_key {
        Ok(k) => println!("node_key {k}"),
        Err(e) => println!("node_key unreadable ({e})"),
    }
    println!("pins {}", st.pins);
    for t in &st.tables {
        println!(
            "table {} {}/{} {}% raise={}",
            t["map"].as_str().unwrap_or_default(),
            t["entries"],
            t["capacity"],
            t["percent"],
            t["raise"].as_str().unwrap_or_default()
        );
    }
    println!("identities {}", st.identities.len());
    for i in &st.identities {
        println!(
            "  identity={} slot={} state={} flows={} max_flows={}",
            i["identity"].as_str().unwrap_or_default(),
            i["slot"],
            i["state"].as_str().unwrap_or_default(),
            i["flows"],
            i["max_flows"]
        );
    }
    println!("admissions {}", st.admissions.len());
    for a in &st.admissions {
        println!(
            "  source={} service={} source_port={} identity={} expires_in_secs={}",
            a["source"].as_str().unwrap_or_default(),
            a["service"].as_str().unwrap_or_default(),
            a["source_port"],
            a["identity"].as_str().unwrap_or_default(),
            a["expires_in_secs"]
        );
    }
    println!("flows {}", st.flows);
    println!("audit_spool_bytes {}", st.audit_spool_bytes);
    println!("audit_last_seq {}", st.audit_last_seq);
    Ok(())
}

fn node_status(cfg: &Config) -> anyhow::Result<NodeStatus> {
    use serde_json::json;
    let mut m = maps(cfg)?;
    let counts = m.reason_counts()?;
    let drops = Reason::ALL
        .iter()
        .map(|r| (r.name(), counts[*r as usize]))
        .collect();
    let shadow_drops = Reason::ALL
        .iter()
        .map(|r| {
            (
                r.name(),
                counts[(portcullis_common::SHADOW_COUNTERS + *r as u32) as usize],
            )
        })
        .collect();
    let node_key = portcullis_trail::node_key::NodeKey::load(&cfg.agent.node_key)
        .map(|k| portcullis_trail::hex::hex(&k.public_key()))
        .map_err(|e| e.to_string());
    let pins = bpffs::durability(&cfg.kernel.pin_dir)
        .map_or_else(|e| format!("unknown ({e})"), |d| d.describe());
    let flows = m.flow_count() as u32;
    let tables = m
        .occupancy(Some(flows))?
        .iter()
        .map(|t| {
            json!({"map": t.map, "entries": t.entries, "capacity": t.capacity,
                "percent": t.percent(), "raise": t.knob})
        })
        .collect();
    let live = m.live_identities()?;
    let flow_counts = m.flow_counts()?;
    let identities = live
        .iter()
        .map(|(slot, id, name)| {
            let state = match id.state {
                portcullis_common::IDENTITY_LIVE => "live",
                portcullis_common::IDENTITY_REVOKED => "revoked",
                _ => "free",
            };
            json!({"identity": name, "slot": slot, "state": state,
                "flows": flow_counts.get(*slot as usize).copied().unwrap_or(0),
                "max_flows": id.max_flows})
        })
        .collect();
    let name_of = |slot: u32| {
        live.iter()
            .find(|(s, _, _)| *s == slot)
            .map_or_else(|| format!("#{slot}"), |(_, _, n)| n.clone())
    };
    let service_of = |id: u32| {
        cfg.services
            .iter()
            .find(|s| s.id == id)
            .map_or_else(|| format!("#{id}"), |s| s.name.clone())
    };
    let now = crate::loader::clock::monotonic_ns();
    let admissions = m
        .admissions()
        .into_iter()
        .map(|(k, v)| {
            json!({"source": bytes_addr(k.addr).to_string(), "service": service_of(k.service),
                "source_port": k.src_port, "identity": name_of(v.identity),
                "expires_in_secs": v.expires_ns.saturating_sub(now) / 1_000_000_000})
        })
        .collect();
    let (audit_spool_bytes, audit_last_seq) = spool_state(&cfg.audit.spool_dir)?;
    Ok(NodeStatus {
        drops,
        shadow_drops,
        node_id: cfg.agent.node_id.clone(),
        node_key,
        pins,
        tables,
        identities,
        admissions,
        flows,
        audit_spool_bytes,
        audit_last_seq,
    })
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
