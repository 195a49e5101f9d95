//! SIGHUP and the config file: the sections that differ from the running
//! configuration are reported (logged), and which of them the running
//! agent applies. Policy, token keys and revocations are re-read by the
//! upkeep on the same signal; everything else in the file takes a restart
//! (the kernel's pinned state keeps enforcing across it).

use std::path::Path;

use crate::config::Config;

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
    out
}

/// Re-reads `path` and logs what differs from `running`: a file that does
/// not load is reported with its error (the running config stays).
pub fn report_config(running: &Config, path: &Path) {
    match Config::load(path) {
        Err(e) => {
            tracing::error!(event = "config_reload_failed", error = %e, "the config file does not load; the running config stays")
        }
        Ok(new) => {
            let changed = changed_sections(running, &new);
            if changed.is_empty() {
                tracing::info!(event = "config_reload", "config file unchanged");
            } else {
                tracing::warn!(
                    event = "config_reload",
                    changed = %changed.join(","),
                    "config sections changed; they take effect at the next restart (the kernel keeps enforcing across it)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
