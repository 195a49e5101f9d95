//! SIGHUP, or a change of the config file's bytes (a Kubernetes ConfigMap
//! update, an edit): the sections that differ from the running
//! configuration are reported (logged), and the ones the running agent can
//! take are applied: `[[services]]` (through the one path of
//! `agent/src/daemon/services.rs`, so services added or removed through
//! the control API since are replaced by the file's), `[findings]`,
//! `[[budgets]]` and `[cost_control]`.
//! Policy, token keys and revocations are re-read by the upkeep on the
//! same signal; everything else in the file takes a restart (the kernel's
//! pinned state keeps enforcing across it).

use std::path::{Path, PathBuf};

use super::{node::Node, services};
use crate::config::Config;

/// Sections a SIGHUP applies without a restart.
pub const LIVE_SECTIONS: [&str; 4] = ["services", "findings", "budgets", "cost_control"];

/// The top-level sections of `new` that differ from `old`.
pub fn changed_sections(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut differ = |name, changed: bool| {
        if changed {
            out.push(name);
        }
    };
    differ("agent", old.agent != new.agent);
    differ("kernel", old.kernel != new.kernel);
    differ("knock", old.knock != new.knock);
    differ("limits", old.limits != new.limits);
    differ("identities", old.identities != new.identities);
    differ("services", old.services != new.services);
    differ("admissions", old.admissions != new.admissions);
    differ("tokens", old.tokens != new.tokens);
    differ("policy", old.policy_dir != new.policy_dir);
    differ("audit", old.audit != new.audit);
    differ("accounting", old.accounting != new.accounting);
    differ("control", old.control != new.control);
    differ("metrics", old.metrics != new.metrics);
    differ("findings", old.findings != new.findings);
    differ("budgets", old.budgets != new.budgets);
    differ("cost_control", old.cost_control != new.cost_control);
    out
}

/// Notices when the config file's bytes change, so a file updated in place
/// (a ConfigMap's atomic symlink swap, an editor's rewrite) is applied
/// within the second without a signal. Compares content, not mtimes: a
/// ConfigMap swap keeps old timestamps.
pub struct ConfigWatch {
    path: PathBuf,
    seen: Option<ring::digest::Digest>,
}

impl ConfigWatch {
    /// Starts from the file as it is now (the config the agent started with).
    pub fn new(path: &Path) -> ConfigWatch {
        ConfigWatch {
            path: path.to_path_buf(),
            seen: digest(path),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once each time the bytes differ from the last seen. A file
    /// that cannot be read is no change: the running config stays, and the
    /// next readable content is compared with the last one applied.
    pub fn changed(&mut self) -> bool {
        let Some(now) = digest(&self.path) else {
            return false;
        };
        let differs = self.seen.is_none_or(|s| s.as_ref() != now.as_ref());
        self.seen = Some(now);
        differs
    }
}

fn digest(path: &Path) -> Option<ring::digest::Digest> {
    let bytes = std::fs::read(path).ok()?;
    Some(ring::digest::digest(&ring::digest::SHA256, &bytes))
}

/// Re-reads `path`, applies the live sections that changed and logs the
/// rest: a file that does not load, or services that do not apply, are
/// reported with the error and the running configuration stays. `why`
/// (`SIGHUP`, `config file changed`) goes into the audit record.
pub fn reload_config(node: &Node, path: &Path, why: &str) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(event = "config_reload_failed", error = %e, "the config file does not load; the running config stays");
            return;
        }
    };
    let running = node.cfg();
    let changed = changed_sections(&running, &new);
    if changed.is_empty() {
        tracing::info!(event = "config_reload", "config file unchanged");
        return;
    }
    let (live, restart): (Vec<&str>, Vec<&str>) =
        changed.iter().partition(|s| LIVE_SECTIONS.contains(s));
    if !live.is_empty() {
        let applied = services::edit(node, why, |cfg| {
            let mut next = cfg.clone();
            next.services = new.services.clone();
            next.findings = new.findings;
            // Taken by the accountant with the prices (budgets whose
            // meters exist keep their spend).
            next.budgets = new.budgets.clone();
            next.cost_control = new.cost_control;
            next.admissions
                .retain(|a| new.services.iter().any(|s| s.name == a.service));
            Ok(next)
        });
        match applied {
            Ok(c) => tracing::warn!(
                event = "config_reload",
                applied = %live.join(","),
                added = ?c.added,
                removed = ?c.removed.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                changed = ?c.changed,
                "config sections applied"
            ),
            Err(e) => {
                tracing::error!(event = "config_reload_failed", sections = %live.join(","), error = %e, "config sections not applied; the running ones stay")
            }
        }
    }
    if !restart.is_empty() {
        tracing::warn!(
            event = "config_reload",
            changed = %restart.join(","),
            "config sections changed; they take effect at the next restart (the kernel keeps enforcing across it)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_bytes_is_noticed_once_and_an_unreadable_file_is_none() {
        let dir = std::env::temp_dir().join(format!("pcl-cw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, "a").unwrap();
        let mut w = ConfigWatch::new(&path);
        assert!(!w.changed(), "the starting content is not a change");
        std::fs::write(&path, "b").unwrap();
        assert!(w.changed());
        assert!(!w.changed(), "reported once");
        // A ConfigMap update: a new file renamed over the old name.
        std::fs::write(dir.join("new"), "c").unwrap();
        std::fs::rename(dir.join("new"), &path).unwrap();
        assert!(w.changed());
        std::fs::remove_file(&path).unwrap();
        assert!(!w.changed(), "a missing file keeps the running config");
        std::fs::write(&path, "c").unwrap();
        assert!(!w.changed(), "the same content as last applied");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_changed_sections_are_named() {
        let base = "[kernel]\ninterfaces = [\"eth9\"]\n[[services]]\nname = \"llm\"\nport = 8000\n";
        let a = Config::from_toml_str(&format!("[agent]\nnode_id = \"n\"\n{base}")).unwrap();
        let b = Config::from_toml_str(&format!(
            "[agent]\nnode_id = \"n\"\n[findings]\nflood_per_sec = 5\n[limits]\nconn_per_sec = 3\n{base}"
        ))
        .unwrap();
        assert_eq!(changed_sections(&a, &a), Vec::<&str>::new());
        assert_eq!(changed_sections(&a, &b), vec!["limits", "findings"]);
    }
}
