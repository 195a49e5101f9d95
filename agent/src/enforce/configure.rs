//! Config → kernel: what validated configuration means in the maps (node
//! knobs, services, identity limits, static admissions). Idempotent, so a
//! restarted agent can run it on adopted state. Only the [`Enforcer`]
//! (`agent/src/enforce/mod.rs`) writes with it.
//!
//! [`Enforcer`]: super::Enforcer

use std::{collections::BTreeSet, net::IpAddr};

use portcullis_common::Identity;

use crate::{
    config::{Config, KernelSection, Limits, XdpMode, identity_key},
    loader::{self, AttachMode, KernelError, Maps, Origin, ServiceEntry, clock},
};

/// The loader's options from `[kernel]`.
pub fn kernel_options(k: &KernelSection) -> loader::Options {
    loader::Options {
        pin_dir: k.pin_dir.clone(),
        bpffs: k.bpffs.clone(),
        interfaces: k.interfaces.clone(),
        mode: match k.xdp_mode {
            XdpMode::Auto => AttachMode::Auto,
            XdpMode::Native => AttachMode::Native,
            XdpMode::Generic => AttachMode::Generic,
        },
        egress: k.egress,
        max_flows: k.max_flows,
        max_admissions: k.max_admissions,
        max_knock_sources: k.max_knock_sources,
        ephemeral_pins: k.ephemeral_pins,
    }
}

/// The kernel's view of the configured services; `shadow` says which are
/// in shadow mode now (the config's modes, or as switched since).
pub(crate) fn service_entries(cfg: &Config, shadow: &BTreeSet<u32>) -> Vec<ServiceEntry> {
    cfg.services
        .iter()
        .map(|s| ServiceEntry {
            id: s.id,
            proto: s.protocol.number(),
            port: s.port,
            addr: s.address,
            shadow: shadow.contains(&s.id),
        })
        .collect()
}

pub(crate) fn identity_value(name: &str, limits: &Limits) -> Identity {
    limits.kernel_identity(identity_key(name))
}

/// Writes (or refreshes) an identity with its configured limits. `name` is
/// an identity name as [`crate::identity::IdentityName::display`] makes it.
pub(crate) fn upsert_identity(
    maps: &mut Maps,
    cfg: &Config,
    name: &str,
) -> Result<(u32, u32), KernelError> {
    maps.upsert_identity(identity_value(name, &cfg.identity_limits(name)), name)
}

/// Services, node knobs and identity limits always; static admissions only
/// on a fresh load (an adopted kernel keeps the admissions it has, with
/// their original expiries).
pub(crate) fn configure(
    maps: &mut Maps,
    cfg: &Config,
    shadow: &BTreeSet<u32>,
    origin: Origin,
) -> Result<usize, KernelError> {
    maps.set_kernel_config(cfg.knock.kernel_config(cfg.kernel.events_per_sec))?;
    maps.sync_services(&service_entries(cfg, shadow), cfg.knock.port)?;
    for name in cfg.identities.keys() {
        // Refresh limits only for identities the kernel already knows:
        // declaring limits does not admit anyone.
        if maps.find_identity(identity_key(name))?.is_some() {
            upsert_identity(maps, cfg, name)?;
        }
    }
    if origin != Origin::Fresh {
        return Ok(0);
    }
    let mut installed = 0;
    for a in &cfg.admissions {
        let Some(svc) = cfg.service(&a.service) else {
            continue; // validation guarantees it exists
        };
        admit(
            maps,
            cfg,
            &a.identity,
            a.source,
            svc.id,
            a.source_port,
            a.ttl,
        )?;
        installed += 1;
    }
    Ok(installed)
}

pub(crate) fn admit(
    maps: &mut Maps,
    cfg: &Config,
    identity: &str,
    source: IpAddr,
    service: u32,
    source_port: u16,
    ttl: std::time::Duration,
) -> Result<(), KernelError> {
    let (slot, _) = upsert_identity(maps, cfg, identity)?;
    maps.admit(slot, source, service, source_port, clock::expiry_after(ttl))
}
