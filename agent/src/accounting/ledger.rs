//! The ledger file (`accounting.ledger`): month- and day-to-date spend per
//! identity and tenant, and what is needed so that a restart neither forgets
//! nor double counts: the last cumulative kernel counters seen per (slot,
//! service), the sub-micro-unit carries, and the usage not yet reported.
//!
//! JSON, rewritten whole and atomically (temporary file, fsync, rename,
//! fsync of the directory), so a crash leaves the old or the new ledger,
//! never a mix. A ledger that cannot be read is an error, never a silent
//! reset: it holds money.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use portcullis_common::IdentityStats;
use serde::{Deserialize, Serialize};

use super::price::Carry;
use crate::budget::{BudgetDraft, Meters};

mod budgets;
use budgets::FileBudgets;

/// Format version written in the file; others are refused.
pub const LEDGER_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "accounting ledger {path} is unreadable: {detail}; restore it from a backup, or move it aside to start accounting from zero (month- and day-to-date spend is then forgotten)"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("accounting ledger {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

impl LedgerError {
    fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        LedgerError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// Usage of one (identity, service), as kept in the ledger: the kernel's
/// counters, and what model servers reported (`ReportUsage`; always zero
/// in kernel rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    pub connections: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub dropped: u64,
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub tokens_in: u64,
    #[serde(default)]
    pub tokens_out: u64,
    #[serde(default)]
    pub gpu_ms: u64,
}

impl From<IdentityStats> for Counters {
    fn from(s: IdentityStats) -> Self {
        Counters {
            connections: s.connections,
            packets_in: s.packets_in,
            bytes_in: s.bytes_in,
            packets_out: s.packets_out,
            bytes_out: s.bytes_out,
            dropped: s.dropped,
            ..Counters::default()
        }
    }
}

impl Counters {
    fn fields(&self) -> [u64; 10] {
        [
            self.connections,
            self.packets_in,
            self.bytes_in,
            self.packets_out,
            self.bytes_out,
            self.dropped,
            self.requests,
            self.tokens_in,
            self.tokens_out,
            self.gpu_ms,
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 10] {
        [
            &mut self.connections,
            &mut self.packets_in,
            &mut self.bytes_in,
            &mut self.packets_out,
            &mut self.bytes_out,
            &mut self.dropped,
            &mut self.requests,
            &mut self.tokens_in,
            &mut self.tokens_out,
            &mut self.gpu_ms,
        ]
    }

    /// Whether any counter is below `earlier`'s: the counters restarted.
    pub fn went_down_from(&self, earlier: &Counters) -> bool {
        self.fields()
            .iter()
            .zip(earlier.fields())
            .any(|(now, then)| *now < then)
    }

    /// `self - earlier`, field by field (callers check `went_down_from`).
    pub fn since(&self, earlier: &Counters) -> Counters {
        let mut d = *self;
        for (v, e) in d.fields_mut().into_iter().zip(earlier.fields()) {
            *v = v.saturating_sub(e);
        }
        d
    }

    pub fn add(&mut self, o: &Counters) {
        for (v, x) in self.fields_mut().into_iter().zip(o.fields()) {
            *v = v.saturating_add(x);
        }
    }

    /// Whether there is any usage (drops alone cost nothing).
    pub fn has_traffic(&self) -> bool {
        let f = self.fields();
        f[..5].iter().chain(&f[6..]).any(|v| *v != 0)
    }
}

/// Spend to date of one identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityToDate {
    /// Empty: the identity has no tenant.
    pub tenant: String,
    pub month_micros: u64,
    pub day_micros: u64,
}

/// Spend to date of one tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToDate {
    pub month_micros: u64,
    pub day_micros: u64,
}

/// The last cumulative counters seen in one kernel row (slot, service) and
/// whose they were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    pub identity_key: u64,
    pub identity: String,
    pub counters: Counters,
}

/// Usage and cost of one (identity, service) not yet reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Line {
    pub tenant: String,
    pub service: String,
    pub counters: Counters,
    pub cost_micros: u64,
}

/// Usage since the last report that the audit trail accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Wall clock (Unix ns) the interval started at.
    pub start_unix_ns: i64,
    /// (identity, service id) → line.
    pub lines: BTreeMap<(String, u32), Line>,
}

impl Pending {
    /// Adds `later` to this (earlier) interval.
    pub fn absorb(&mut self, later: Pending) {
        for (k, l) in later.lines {
            let e = self.lines.entry(k).or_insert_with(|| Line {
                tenant: l.tenant.clone(),
                service: l.service.clone(),
                ..Line::default()
            });
            e.counters.add(&l.counters);
            e.cost_micros = e.cost_micros.saturating_add(l.cost_micros);
        }
    }
}

/// Everything the accountant keeps across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Names the kernel counter instance the baselines belong to
    /// (`Maps::usage_instance`); empty: none yet.
    pub counters: String,
    /// Latest wall clock (Unix seconds) accounted. Time never runs
    /// backwards in the ledger, so a clock step back cannot re-open a
    /// closed period.
    pub clock_secs: i64,
    /// Current UTC periods ("2026-11", "2026-11-24"); empty: none yet.
    pub month: String,
    pub day: String,
    pub identities: BTreeMap<String, IdentityToDate>,
    pub tenants: BTreeMap<String, ToDate>,
    /// Spend to date per service (by name).
    pub services: BTreeMap<String, ToDate>,
    /// (slot, service id) → last counters seen.
    pub baselines: BTreeMap<(u32, u32), Baseline>,
    /// (identity, service id) → fractions of a micro-unit not yet charged.
    pub carries: BTreeMap<(String, u32), Carry>,
    pub pending: Pending,
    /// Budget meters and approvals (`agent/src/budget/meter.rs`).
    pub budgets: Meters,
    /// Budgets set through the control API.
    pub defined: Vec<BudgetDraft>,
}

// The file form: JSON objects need string keys, so compound keys become
// fields of list entries.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    counters: String,
    clock_secs: i64,
    month: String,
    day: String,
    identities: BTreeMap<String, IdentityToDate>,
    tenants: BTreeMap<String, ToDate>,
    #[serde(default)]
    services: BTreeMap<String, ToDate>,
    baselines: Vec<FileBaseline>,
    carries: Vec<FileCarry>,
    pending: FilePending,
    #[serde(default)]
    budgets: FileBudgets,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBaseline {
    slot: u32,
    service: u32,
    identity_key: u64,
    identity: String,
    counters: Counters,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCarry {
    identity: String,
    service: u32,
    in_frac: u64,
    out_frac: u64,
    #[serde(default)]
    tok_in_frac: u64,
    #[serde(default)]
    tok_out_frac: u64,
    #[serde(default)]
    gpu_frac: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePending {
    start_unix_ns: i64,
    lines: Vec<FileLine>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLine {
    identity: String,
    tenant: String,
    service: String,
    service_id: u32,
    counters: Counters,
    cost_micros: u64,
}

impl State {
    fn to_file(&self) -> File {
        File {
            version: LEDGER_VERSION,
            counters: self.counters.clone(),
            clock_secs: self.clock_secs,
            month: self.month.clone(),
            day: self.day.clone(),
            identities: self.identities.clone(),
            tenants: self.tenants.clone(),
            services: self.services.clone(),
            baselines: self
                .baselines
                .iter()
                .map(|(&(slot, service), b)| FileBaseline {
                    slot,
                    service,
                    identity_key: b.identity_key,
                    identity: b.identity.clone(),
                    counters: b.counters,
                })
                .collect(),
            carries: self
                .carries
                .iter()
                .map(|((identity, service), c)| FileCarry {
                    identity: identity.clone(),
                    service: *service,
                    in_frac: c.in_frac,
                    out_frac: c.out_frac,
                    tok_in_frac: c.tok_in_frac,
                    tok_out_frac: c.tok_out_frac,
                    gpu_frac: c.gpu_frac,
                })
                .collect(),
            pending: FilePending {
                start_unix_ns: self.pending.start_unix_ns,
                lines: self
                    .pending
                    .lines
                    .iter()
                    .map(|((identity, service_id), l)| FileLine {
                        identity: identity.clone(),
                        tenant: l.tenant.clone(),
                        service: l.service.clone(),
                        service_id: *service_id,
                        counters: l.counters,
                        cost_micros: l.cost_micros,
                    })
                    .collect(),
            },
            budgets: FileBudgets::of(&self.budgets, &self.defined),
        }
    }

    fn from_file(f: File) -> Result<State, String> {
        if f.version != LEDGER_VERSION {
            return Err(format!(
                "format version {} (this agent reads version {LEDGER_VERSION})",
                f.version
            ));
        }
        let mut baselines = BTreeMap::new();
        for b in f.baselines {
            let v = Baseline {
                identity_key: b.identity_key,
                identity: b.identity,
                counters: b.counters,
            };
            if baselines.insert((b.slot, b.service), v).is_some() {
                return Err(format!(
                    "baseline for slot {} service {} appears twice",
                    b.slot, b.service
                ));
            }
        }
        let mut carries = BTreeMap::new();
        for c in f.carries {
            if c.in_frac >> super::price::MIB_SHIFT != 0
                || c.out_frac >> super::price::MIB_SHIFT != 0
                || c.tok_in_frac >= super::price::PER_MTOK
                || c.tok_out_frac >= super::price::PER_MTOK
                || c.gpu_frac >= super::price::MS_PER_HOUR
            {
                return Err(format!(
                    "carry of {} for service {} is not a fraction",
                    c.identity, c.service
                ));
            }
            carries.insert(
                (c.identity, c.service),
                Carry {
                    in_frac: c.in_frac,
                    out_frac: c.out_frac,
                    tok_in_frac: c.tok_in_frac,
                    tok_out_frac: c.tok_out_frac,
                    gpu_frac: c.gpu_frac,
                },
            );
        }
        let mut lines = BTreeMap::new();
        for l in f.pending.lines {
            lines.insert(
                (l.identity, l.service_id),
                Line {
                    tenant: l.tenant,
                    service: l.service,
                    counters: l.counters,
                    cost_micros: l.cost_micros,
                },
            );
        }
        let (budgets, defined) = f.budgets.into_parts()?;
        Ok(State {
            budgets,
            defined,
            counters: f.counters,
            clock_secs: f.clock_secs,
            month: f.month,
            day: f.day,
            identities: f.identities,
            tenants: f.tenants,
            services: f.services,
            baselines,
            carries,
            pending: Pending {
                start_unix_ns: f.pending.start_unix_ns,
                lines,
            },
        })
    }
}

/// Reads the ledger; `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> Result<Option<State>, LedgerError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LedgerError::io(path, "read", e)),
    };
    let corrupt = |detail: String| LedgerError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let file: File = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    State::from_file(file).map(Some).map_err(corrupt)
}

/// Replaces the ledger atomically: a crash leaves the old or the new one.
pub fn save(path: &Path, state: &State) -> Result<(), LedgerError> {
    let mut text = serde_json::to_vec_pretty(&state.to_file())
        .map_err(|e| LedgerError::io(path, "encode", io::Error::other(e)))?;
    text.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        // 0600: spend names identities and tenants.
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt as _;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
        }
        .map_err(|e| LedgerError::io(&tmp, "create", e))?;
        f.write_all(&text)
            .map_err(|e| LedgerError::io(&tmp, "write", e))?;
        f.sync_all()
            .map_err(|e| LedgerError::io(&tmp, "fsync", e))?;
    }
    fs::rename(&tmp, path).map_err(|e| LedgerError::io(path, "rename into place", e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LedgerError::io(dir, "fsync directory", e))
}

/// Makes sure the ledger's directory exists (at startup, so a bad path
/// fails before the first interval).
pub fn prepare_dir(path: &Path) -> Result<(), LedgerError> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => {
            fs::create_dir_all(d).map_err(|e| LedgerError::io(d, "create directory", e))
        }
        _ => Ok(()),
    }
}
