//! Upkeep of knock admission while the agent runs: the revocations file,
//! the policy directory and the token keys are re-read every second, and
//! what changed is applied (admission decides, the enforcer cuts, the
//! trail records).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use anyhow::Context as _;
use portcullis_proto::v1::{self, event::Body};

use crate::{
    admission::{
        admitter::Admitter,
        jwk::JwksFile,
        revocations::{self, Change, Entry, RevocationFile},
        token::{TokenPolicy, Verifier},
    },
    audit::{auditor::Auditor, drops::DropAccumulator},
    config::{Config, TokensSection},
    daemon::knock_service::KnockService,
    enforce::{CutTarget, Enforcer},
    loader::KernelError,
    policy::{PolicySet, PolicyStore},
};

/// What applying a revocation change did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    pub subjects: usize,
    /// `id:` entries: one identity in one tenant.
    pub named: usize,
    pub jtis: usize,
    pub identities: usize,
    pub admissions: usize,
    pub flows: usize,
    /// One audit record per revoked jti, subject or identity.
    pub events: Vec<v1::Revocation>,
}

/// Applies a change of revocations (the file's, or the control API's):
/// admission refuses the tokens from now on, and what they already
/// admitted is cut in the kernel (flows removed, the identities' epochs
/// bumped). The kernel's names find identities admitted before this agent
/// started, or statically, too. `reason` goes into each record.
pub fn apply_revocations(
    admitter: &Admitter,
    enforcer: &Enforcer,
    change: &Change,
    reason: &str,
    now: SystemTime,
) -> Result<Revoked, KernelError> {
    let mut done = Revoked::default();
    for t in admitter.revoke(change, now) {
        let mut cut = enforcer.cut(CutTarget::Admissions(&t.admissions))?;
        if let Some(m) = &t.identities {
            let c = enforcer.cut(CutTarget::Identities(m))?;
            cut.admissions += c.admissions;
            cut.flows += c.flows;
            cut.identities = c.identities;
        }
        done.identities += cut.identities.len();
        done.admissions += cut.admissions;
        done.flows += cut.flows;
        match t.kind {
            "jti" => done.jtis += 1,
            "subject" => done.subjects += 1,
            _ => done.named += 1,
        }
        done.events.push(v1::Revocation {
            target_kind: t.kind.into(),
            target: t.target.clone(),
            reason: reason.into(),
            admissions_removed: u32::try_from(cut.admissions).unwrap_or(u32::MAX),
            identities: cut.identities,
        });
    }
    Ok(done)
}

/// Decides every live knock-granted admission again under the current
/// policy set and revokes, in the kernel, those it now denies.
pub fn reevaluate(
    admitter: &Admitter,
    enforcer: &Enforcer,
    now: SystemTime,
) -> Result<usize, KernelError> {
    let denied = admitter.reevaluate(now);
    for at in &denied {
        enforcer.revoke_admission(at)?;
        admitter.forget(at);
    }
    Ok(denied.len())
}

/// What knock admission needs from files: loaded and checked before the
/// kernel is touched, so a bad key set or policy stops the agent without
/// loading anything.
pub struct KnockParts {
    pub jwks: Arc<JwksFile>,
    pub jwks_path: PathBuf,
    pub verifier: Arc<Verifier>,
    pub policies: Arc<PolicyStore>,
}

impl KnockParts {
    pub fn load(cfg: &Config, tokens: &TokensSection) -> anyhow::Result<KnockParts> {
        let jwks = Arc::new(
            JwksFile::load(&tokens.jwks_file, tokens.allow_hs256)
                .with_context(|| format!("tokens.jwks_file {}", tokens.jwks_file.display()))?,
        );
        let verifier = Arc::new(Verifier::new(TokenPolicy::from(tokens), jwks.clone()));
        let policies = Arc::new(open_policies(cfg)?);
        Ok(KnockParts {
            jwks,
            jwks_path: tokens.jwks_file.clone(),
            verifier,
            policies,
        })
    }
}

/// The configured policy set, validated against the schema and the
/// configured services; without `[policy]`, the built-in scope-only set.
/// A bad set at start-up stops the agent: it never runs open.
fn open_policies(cfg: &Config) -> anyhow::Result<PolicyStore> {
    let Some(dir) = &cfg.policy_dir else {
        return Ok(PolicyStore::fixed(PolicySet::default_set()));
    };
    let store = PolicyStore::open(dir).with_context(|| format!("policy.dir {}", dir.display()))?;
    // Checked now and before every reload's swap: a policy naming a model
    // this node does not serve is a mistake, not a no-op.
    let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    store
        .set_services(&known)
        .with_context(|| format!("policy.dir {}", dir.display()))?;
    let set = store.current();
    tracing::info!(event = "policy_loaded", version = set.version(), policies = set.len(), dir = %dir.display(), "policy set loaded");
    Ok(store)
}

/// The knock side of a running agent: its service and the files it
/// re-reads.
pub struct Knocks {
    pub service: Arc<KnockService>,
    pub enforcer: Arc<Enforcer>,
    pub auditor: Auditor,
    pub jwks: Arc<JwksFile>,
    pub jwks_path: PathBuf,
    pub revocations: Option<RevocationFile>,
    /// One revocation change at a time (the file's reload, the control
    /// API's), so each is applied and audited exactly once.
    pub revoking: std::sync::Mutex<()>,
    /// Policy sets swapped in, and edits rejected, since start (metrics).
    pub policy_reloads: AtomicU64,
    pub policy_rejects: AtomicU64,
    /// One policy reload or control API write at a time.
    pub policy_edit: std::sync::Mutex<()>,
}

impl Knocks {
    fn admitter(&self) -> &Admitter {
        self.service.admitter()
    }

    /// Re-reads the revocations file and applies what changed.
    pub fn revocations(&self) {
        let Some(file) = &self.revocations else {
            return;
        };
        let _one_at_a_time = self.revoking.lock().unwrap_or_else(|p| p.into_inner());
        match file.reload() {
            Ok(Some(change)) => {
                let _ = self.apply_change(&change, "revocations file");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "revocations_reload_failed", error = %e, "keeping the previous revocations");
            }
        }
    }

    /// The control API's revocation of a token (`jti`) or an identity:
    /// recorded in `tokens.revocations_file` when there is one (so it
    /// outlives this agent; the file's next reload then has nothing new),
    /// applied and audited before returning.
    pub fn revoke_entry(&self, entry: Entry, reason: &str) -> anyhow::Result<Revoked> {
        let _one_at_a_time = self.revoking.lock().unwrap_or_else(|p| p.into_inner());
        let change = match &self.revocations {
            Some(file) => {
                revocations::append(file.path(), &entry)?;
                file.reload()?.unwrap_or_default()
            }
            None => {
                let mut change = Change::default();
                match entry {
                    Entry::Jti(j) => change.added.jtis.insert(j),
                    Entry::Subject(s) => change.added.subjects.insert(s),
                    Entry::Identity(n) => change.added.identities.insert(n),
                };
                change
            }
        };
        self.apply_change(&change, reason)
            .context("the revocation was recorded but not applied to the kernel")
    }

    /// Applies a change, audits one record per target and logs a summary.
    fn apply_change(&self, change: &Change, reason: &str) -> Result<Revoked, KernelError> {
        match apply_revocations(
            self.admitter(),
            &self.enforcer,
            change,
            reason,
            SystemTime::now(),
        ) {
            Ok(mut done) => {
                if done != Revoked::default()
                    || !change.removed.subjects.is_empty()
                    || !change.removed.identities.is_empty()
                {
                    for ev in done.events.drain(..) {
                        self.audit(Body::Revocation(ev));
                    }
                    tracing::info!(
                        event = "revocation",
                        reason,
                        jtis = done.jtis,
                        subjects = done.subjects,
                        named_identities = done.named,
                        identities = done.identities,
                        admissions = done.admissions,
                        flows = done.flows,
                        unrevoked_subjects = change.removed.subjects.len(),
                        "revocations applied"
                    );
                }
                Ok(done)
            }
            Err(e) => {
                tracing::error!(event = "revocation_failed", error = %e, "revocation not applied to the kernel");
                Err(e)
            }
        }
    }

    /// Records an event that must not be deferred; a failure is logged
    /// (the auditor counts it too).
    fn audit(&self, body: Body) {
        if let Err(e) = self.auditor.record(body) {
            tracing::error!(event = "audit_failed", error = %e, "event not recorded");
        }
    }

    /// Re-reads the policy directory; on a swap, decides every live
    /// admission again and revokes what the new set denies.
    fn policies(&self) {
        let _one_at_a_time = self.policy_edit.lock().unwrap_or_else(|p| p.into_inner());
        self.reload_policies();
    }

    /// The control API's `Policy` apply: `files` (validated by the caller)
    /// replace the directory's `*.cedar` files (and its schema, when one is
    /// given), then the hot reload's path swaps, audits and re-decides. No
    /// reload sees the directory half-written.
    pub fn apply_policy(
        &self,
        files: &[(String, String)],
        schema: Option<&str>,
    ) -> anyhow::Result<()> {
        let _one_at_a_time = self.policy_edit.lock().unwrap_or_else(|p| p.into_inner());
        let store = self.admitter().policies();
        let Some(dir) = store.dir() else {
            anyhow::bail!(
                "this node has no [policy] dir to write to (it runs the built-in policy)"
            );
        };
        let write = |name: &str, text: &str| -> anyhow::Result<()> {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, dir.join(name))
                .with_context(|| format!("writing {}", dir.join(name).display()))
        };
        for (name, text) in files {
            write(name, text)?;
        }
        let keep = |name: &str| files.iter().any(|(n, _)| n == name);
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let stale = (name.ends_with(".cedar") && !keep(name))
                || (schema.is_some() && name.ends_with(".cedarschema"));
            if stale {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        if let Some(text) = schema {
            write("schema.cedarschema", text)?;
        }
        self.reload_policies();
        match store.last_error() {
            Some(e) => Err(anyhow::anyhow!("the written set was refused: {e}")),
            None => Ok(()),
        }
    }

    fn reload_policies(&self) {
        let store = self.admitter().policies();
        let old_version = store.current().version().to_string();
        match store.reload_if_changed() {
            Ok(None) => {}
            Ok(Some(set)) => {
                self.policy_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    event = "policy_change",
                    version = set.version(),
                    policies = set.len(),
                    "policy set swapped"
                );
                self.audit(Body::PolicyChange(v1::PolicyChange {
                    old_version,
                    new_version: set.version().to_string(),
                    policies: u32::try_from(set.len()).unwrap_or(u32::MAX),
                    accepted: true,
                    error: String::new(),
                }));
                match reevaluate(self.admitter(), &self.enforcer, SystemTime::now()) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(
                            event = "revocation",
                            reason = "policy_change",
                            admissions = n,
                            version = set.version(),
                            "admissions the new policy denies were revoked"
                        );
                        self.audit(Body::Revocation(v1::Revocation {
                            target_kind: "policy".into(),
                            target: set.version().to_string(),
                            reason: "the new policy set denies them".into(),
                            admissions_removed: u32::try_from(n).unwrap_or(u32::MAX),
                            identities: Vec::new(),
                        }));
                    }
                    Err(e) => {
                        tracing::error!(event = "revocation_failed", error = %e, "policy revocation not applied to the kernel")
                    }
                }
            }
            Err(e) => {
                self.policy_rejects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = "policy_reload_failed",
                    error = %e,
                    "keeping the previous policy set"
                );
                // Audited once per failing edit: the store does not retry
                // an unchanged bad file.
                self.audit(Body::PolicyChange(v1::PolicyChange {
                    old_version: old_version.clone(),
                    new_version: String::new(),
                    policies: u32::try_from(store.current().len()).unwrap_or(u32::MAX),
                    accepted: false,
                    error: e.to_string(),
                }));
            }
        }
    }

    /// Every second: revocations, policies, token keys, expired state.
    pub fn upkeep(&self) {
        self.revocations();
        self.policies();
        match self.jwks.reload_if_changed() {
            Ok(true) => {
                tracing::info!(
                    event = "jwks_reloaded",
                    path = %self.jwks_path.display(),
                    keys = self.jwks.current().len(),
                    refused = self.jwks.current().skipped().len(),
                    "token keys reloaded"
                );
                audit_key_set(&self.auditor, &self.jwks, &self.jwks_path, None);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(
                    event = "jwks_reload_failed",
                    path = %self.jwks_path.display(),
                    error = %e,
                    "keeping the previous token keys"
                );
                audit_key_set(
                    &self.auditor,
                    &self.jwks,
                    &self.jwks_path,
                    Some(e.to_string()),
                );
            }
        }
        self.admitter().purge(SystemTime::now());
    }

    /// Logs refusals per reason since the last report and adds them to the
    /// interval's drop summary.
    pub fn report(
        &self,
        last: Vec<(&'static str, u64)>,
        drops: &mut DropAccumulator,
    ) -> Vec<(&'static str, u64)> {
        let now = self.service.counters().snapshot();
        for (reason, n) in &now {
            let before = last
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, n)| *n);
            drops.add_refusals(reason, n.saturating_sub(before));
            if *n > before {
                tracing::info!(
                    event = "knocks_refused",
                    reason,
                    count = n - before,
                    "knocks refused"
                );
            }
        }
        now
    }
}

/// Audits the token keys in force and the ones the file holds but the
/// product refused (or that the file was rejected and the old set stays).
pub fn audit_key_set(
    auditor: &Auditor,
    jwks: &JwksFile,
    path: &std::path::Path,
    error: Option<String>,
) {
    let set = jwks.current();
    let refused: Vec<v1::RefusedKey> = set
        .skipped()
        .iter()
        .map(|k| v1::RefusedKey {
            kid: k.kid.clone().unwrap_or_default(),
            index: u32::try_from(k.index).unwrap_or(u32::MAX),
            reason: k.reason.to_string(),
        })
        .collect();
    for k in set.skipped() {
        let kid = k.kid.as_deref().unwrap_or("");
        if k.reason.is_unsupported() {
            tracing::info!(event = "jwk_skipped", path = %path.display(), kid, index = k.index, reason = %k.reason, "token key not for this product; skipped");
        } else {
            tracing::warn!(event = "jwk_refused", path = %path.display(), kid, index = k.index, reason = %k.reason, "token key refused; the other keys are used");
        }
    }
    let ev = v1::KeySetChange {
        path: path.display().to_string(),
        keys: u32::try_from(set.len()).unwrap_or(u32::MAX),
        refused: if error.is_some() { Vec::new() } else { refused },
        accepted: error.is_none(),
        error: error.unwrap_or_default(),
    };
    if let Err(e) = auditor.record(Body::KeySetChange(ev)) {
        tracing::error!(event = "audit_failed", error = %e, "key set change not audited");
    }
}
