//! `portcullis audit verify FILE...`: checks collector output and agent
//! spool segments offline.
//!
//! Input files are read in the order given; several nodes may be
//! interleaved. A file starting with the spool magic `PCSPOOL1` is a spool
//! segment (each frame is an event's canonical bytes); anything else is
//! collector JSON lines.
//!
//! For each JSON line: it must parse; an event record (`portcullis.record
//! = "event"`) is recomputed from `portcullis.raw` with the collector's
//! mapping and compared with the line, so an edit anywhere in the line is
//! named by its JSON path; then the event goes through the chain verifier
//! (per node: seq order, links, checkpoint signatures, keys). Finding
//! records the collector wrote are reported as warnings (the chain problems
//! they describe show up in the chain itself when the event was written).
//!
//! Problems (exit non-zero): unparseable or truncated lines, records that
//! do not match their bytes, duplicates, replays, unexplained gaps
//! (deleted lines), reordering, broken links, bad signatures, key
//! mismatches. Warnings (exit 0): gaps an agent declared, events after the
//! last checkpoint (not yet signed), unverifiable checkpoints, collector
//! findings, informational notes (anchored chains, clock steps).

use std::{
    collections::HashMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::chain::hex;
use super::verify::{ChainVerifier, Disposition, Finding, FindingKind, Severity, Trust};
use crate::collector::ocsf;

/// The spool segment magic.
pub const SPOOL_MAGIC: &[u8; 8] = b"PCSPOOL1";

/// Where in the input something was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line (JSON lines) or frame (spool) number.
    pub line: u64,
    /// "line" or "frame".
    pub unit: &'static str,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unit == "line" {
            write!(f, "{}:{}", self.file.display(), self.line)
        } else {
            write!(f, "{} {} {}", self.file.display(), self.unit, self.line)
        }
    }
}

/// One problem or warning.
#[derive(Clone, Debug)]
pub struct Issue {
    pub at: Location,
    pub severity: Severity,
    /// A finding kind, or "format"/"edited"/"duplicate"/"truncated".
    pub kind: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.at, self.kind, self.message)
    }
}

/// Per-node summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSummary {
    pub node_id: String,
    pub events: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_checkpoint: Option<u64>,
    /// Events after the last verified checkpoint: not yet signed.
    pub unsigned: u64,
    pub declared_gaps: Vec<(u64, u64)>,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Problems (severity Error), in input order.
    pub problems: Vec<Issue>,
    /// Warnings and notes, in input order.
    pub warnings: Vec<Issue>,
    pub nodes: Vec<NodeSummary>,
    pub records: u64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Options for [`verify_files`].
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub files: Vec<PathBuf>,
    pub trust: Trust,
    pub pinned: HashMap<String, [u8; 32]>,
}

struct Run {
    verifier: ChainVerifier,
    report: Report,
    /// First location of each (node, seq) accepted.
    seen: HashMap<(String, u64), Location>,
    /// Unexplained gaps as seen: classified at the end.
    gaps: Vec<(Location, String, u64, u64, String)>,
}

impl Run {
    fn issue(&mut self, at: &Location, severity: Severity, kind: &str, message: String) {
        let i = Issue {
            at: at.clone(),
            severity,
            kind: kind.to_owned(),
            message,
        };
        if severity == Severity::Error {
            self.report.problems.push(i);
        } else {
            self.report.warnings.push(i);
        }
    }

    fn finding(&mut self, at: &Location, f: &Finding) {
        match f.kind {
            // Classified at the end (a later Gap event may declare it).
            FindingKind::Gap => {
                let (a, b) = parse_range(&f.message).unwrap_or((f.seq, f.seq));
                self.gaps
                    .push((at.clone(), f.node_id.clone(), a, b, f.message.clone()));
            }
            // Out-of-order input is a problem in a file, whatever the
            // verifier's general severity.
            FindingKind::Stale => self.issue(
                at,
                Severity::Error,
                "reorder",
                format!(
                    "node {} seq {} comes after later events (moved or duplicated line)",
                    f.node_id, f.seq
                ),
            ),
            _ => {
                let msg = format!("node {} seq {}: {}", f.node_id, f.seq, f.message);
                self.issue(at, f.kind.severity(), f.kind.as_str(), msg);
            }
        }
    }

    /// Checks one event's canonical bytes.
    fn event(&mut self, at: &Location, bytes: &[u8]) {
        let v = self.verifier.accept(bytes);
        let findings = v.findings.clone();
        for f in &findings {
            self.finding(at, f);
        }
        let Some(ev) = &v.event else { return };
        let key = (ev.node_id.clone(), ev.seq);
        match v.disposition {
            Disposition::New => {
                self.seen.insert(key, at.clone());
            }
            Disposition::Duplicate => {
                let first = self
                    .seen
                    .get(&key)
                    .map_or_else(|| "an earlier record".to_owned(), |l| l.to_string());
                if findings.is_empty() {
                    self.issue(
                        at,
                        Severity::Error,
                        "duplicate",
                        format!(
                            "node {} seq {} again (same bytes as {first})",
                            ev.node_id, ev.seq
                        ),
                    );
                }
            }
            Disposition::Rejected => {}
        }
    }
}

/// "seqs A..=B missing" → (A, B).
fn parse_range(msg: &str) -> Option<(u64, u64)> {
    let rest = msg.strip_prefix("seqs ")?;
    let (range, _) = rest.split_once(' ')?;
    let (a, b) = range.split_once("..=")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Verifies `opts.files`.
pub fn verify_files(opts: &VerifyOptions) -> std::io::Result<Report> {
    let mut run = Run {
        verifier: ChainVerifier::new(opts.trust, opts.pinned.clone()),
        report: Report::default(),
        seen: HashMap::new(),
        gaps: Vec::new(),
    };
    for file in &opts.files {
        let bytes = fs::read(file)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
        if bytes.starts_with(SPOOL_MAGIC) {
            spool(&mut run, file)?;
        } else {
            json_lines(&mut run, file, &bytes);
        }
    }
    // Gaps: declared (now or later) → warning; otherwise a problem.
    let gaps = std::mem::take(&mut run.gaps);
    for (at, node, a, b, msg) in gaps {
        let declared = run
            .verifier
            .node(&node)
            .is_some_and(|s| s.declared_gaps.iter().any(|&(x, y)| x <= a && b <= y));
        if declared {
            run.issue(
                &at,
                Severity::Warning,
                "declared_gap",
                format!("node {node}: {msg}; declared dropped by the agent"),
            );
        } else {
            run.issue(
                &at,
                Severity::Error,
                "gap",
                format!("node {node}: {msg} (deleted or missing records)"),
            );
        }
    }
    let by_pos = |i: &Issue| (i.at.file.clone(), i.at.line);
    // Input order: files in the order given, then line.
    let order: HashMap<&PathBuf, usize> =
        opts.files.iter().enumerate().map(|(i, f)| (f, i)).collect();
    let key = |i: &Issue| (order.get(&i.at.file).copied().unwrap_or(0), by_pos(i).1);
    run.report.problems.sort_by_key(key);
    run.report.warnings.sort_by_key(key);
    for st in run.verifier.nodes() {
        run.report.nodes.push(NodeSummary {
            node_id: st.node_id.clone(),
            events: st.events,
            first_seq: st.first_seq,
            last_seq: st.last_seq,
            last_checkpoint: st.last_checkpoint,
            unsigned: st.since_checkpoint,
            declared_gaps: st.declared_gaps.clone(),
        });
    }
    Ok(run.report)
}

fn spool(run: &mut Run, file: &Path) -> std::io::Result<()> {
    let seg = super::spool::read_segment_file(file)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
    for (i, payload) in seg.frames.iter().enumerate() {
        let at = Location {
            file: file.to_owned(),
            line: i as u64 + 1,
            unit: "frame",
        };
        run.report.records += 1;
        run.event(&at, payload);
    }
    if let Some(bad) = seg.bad {
        let at = Location {
            file: file.to_owned(),
            line: seg.frames.len() as u64 + 1,
            unit: "frame",
        };
        run.issue(
            &at,
            Severity::Error,
            "truncated",
            format!(
                "segment stops decoding at byte {} of {}: {}",
                bad.offset, seg.len, bad.reason
            ),
        );
    }
    Ok(())
}

fn json_lines(run: &mut Run, file: &Path, bytes: &[u8]) {
    let mut pos = 0usize;
    let mut n = 0u64;
    while pos < bytes.len() {
        n += 1;
        let at = Location {
            file: file.to_owned(),
            line: n,
            unit: "line",
        };
        let (line, complete) = match bytes[pos..].iter().position(|&b| b == b'\n') {
            Some(nl) => (&bytes[pos..pos + nl], true),
            None => (&bytes[pos..], false),
        };
        pos += line.len() + 1;
        if !complete {
            run.issue(
                &at,
                Severity::Error,
                "truncated",
                format!(
                    "the last line has no newline ({} bytes): truncated file",
                    line.len()
                ),
            );
            if serde_json::from_slice::<Value>(line).is_err() {
                return;
            }
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            run.issue(&at, Severity::Error, "format", "empty line".into());
            continue;
        }
        let v: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                run.issue(
                    &at,
                    Severity::Error,
                    "format",
                    format!("not a JSON record: {e}"),
                );
                continue;
            }
        };
        run.report.records += 1;
        record(run, &at, &v);
    }
}

fn record(run: &mut Run, at: &Location, v: &Value) {
    let p = v.get("portcullis");
    let kind = p.and_then(|p| p.get("record")).and_then(Value::as_str);
    match kind {
        Some("finding") => {
            let f = p.and_then(|p| p.get("finding"));
            let text = f
                .and_then(|f| f.get("kind"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            let node = f
                .and_then(|f| f.get("node_id"))
                .and_then(Value::as_str)
                .unwrap_or("?");
            let msg = f
                .and_then(|f| f.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("");
            run.issue(
                at,
                Severity::Warning,
                "collector_finding",
                format!("the collector recorded {text} for node {node}: {msg}"),
            );
        }
        Some("event") => {
            let mapping = p.and_then(|p| p.get("mapping")).and_then(Value::as_u64);
            if mapping != Some(ocsf::MAPPING_VERSION) {
                run.issue(
                    at,
                    Severity::Error,
                    "format",
                    format!(
                        "portcullis.mapping is {mapping:?}; this verifier knows mapping {}",
                        ocsf::MAPPING_VERSION
                    ),
                );
                return;
            }
            let Some(raw) = p.and_then(|p| p.get("raw")).and_then(Value::as_str) else {
                run.issue(
                    at,
                    Severity::Error,
                    "edited",
                    "$.portcullis.raw is missing".into(),
                );
                return;
            };
            let bytes = match ocsf::decode_raw(raw) {
                Ok(b) => b,
                Err(e) => {
                    run.issue(
                        at,
                        Severity::Error,
                        "edited",
                        format!("$.portcullis.raw is not base64: {e}"),
                    );
                    return;
                }
            };
            match ocsf::event_record(&bytes) {
                Err(e) => {
                    run.issue(
                        at,
                        Severity::Error,
                        "edited",
                        format!("$.portcullis.raw is not an event: {e}"),
                    );
                    return;
                }
                Ok(expected) => {
                    if let Some((path, found, want)) = ocsf::first_difference(v, &expected) {
                        run.issue(
                            at,
                            Severity::Error,
                            "edited",
                            format!(
                                "{path} is {} but the event's bytes give {} (hash {})",
                                short(&found),
                                short(&want),
                                hex(&crate::audit::chain::event_hash(&bytes))
                            ),
                        );
                    }
                }
            }
            run.event(at, &bytes);
        }
        _ => run.issue(
            at,
            Severity::Error,
            "format",
            "not a portcullis record (no portcullis.record)".into(),
        ),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let mut cut = 77;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &s[..cut])
    } else {
        s
    }
}

/// Prints the report as `portcullis audit verify` does; true when clean.
pub fn print_report(r: &Report, out: &mut impl std::io::Write) -> std::io::Result<bool> {
    if let Some(first) = r.problems.first() {
        writeln!(out, "FIRST PROBLEM: {first}")?;
    }
    for p in r.problems.iter().skip(1) {
        writeln!(out, "problem: {p}")?;
    }
    for w in &r.warnings {
        let label = if w.severity == Severity::Info {
            "note"
        } else {
            "warning"
        };
        writeln!(out, "{label}: {w}")?;
    }
    for n in &r.nodes {
        let cp = n
            .last_checkpoint
            .map_or_else(|| "none".to_owned(), |s| format!("seq {s}"));
        writeln!(
            out,
            "node {}: {} events, seqs {}..={}, last checkpoint {cp}, {} events after it (not yet signed){}",
            n.node_id,
            n.events,
            n.first_seq,
            n.last_seq,
            n.unsigned,
            if n.declared_gaps.is_empty() {
                String::new()
            } else {
                format!(", declared gaps {:?}", n.declared_gaps)
            }
        )?;
        if n.unsigned > 0 {
            writeln!(
                out,
                "warning: node {}: the last {} events are not covered by a checkpoint signature yet",
                n.node_id, n.unsigned
            )?;
        }
    }
    let clean = r.is_clean();
    writeln!(
        out,
        "{}: {} records, {} nodes, {} problems, {} warnings",
        if clean { "OK" } else { "FAILED" },
        r.records,
        r.nodes.len(),
        r.problems.len(),
        r.warnings.len()
    )?;
    Ok(clean)
}

/// `portcullis audit verify`: prints the report; Ok(true) when clean.
pub fn run_cli(opts: &VerifyOptions) -> anyhow::Result<bool> {
    let report = verify_files(opts)?;
    let stdout = std::io::stdout();
    Ok(print_report(&report, &mut stdout.lock())?)
}

/// `portcullis audit` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum AuditAction {
    /// Verify collector JSON-lines files and agent spool segments: chains,
    /// signatures, and that every record matches its event's bytes. Exits
    /// non-zero on any problem.
    Verify {
        /// Files in order (collector output and/or spool segments).
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// Pinned node keys: lines `NODE_ID KEY` (hex or base64).
        #[arg(long, value_name = "FILE")]
        keys: Option<PathBuf>,
        /// Check checkpoints only with --keys (otherwise a node's key is
        /// learned from its first STARTED event).
        #[arg(long)]
        pinned_only: bool,
    },
}

/// Runs an `audit` subcommand; an error when verification found problems.
pub fn run_action(action: AuditAction) -> anyhow::Result<()> {
    match action {
        AuditAction::Verify {
            files,
            keys,
            pinned_only,
        } => {
            let pinned = match &keys {
                Some(p) => crate::collector::keys::load_keys_file(p)?,
                None => HashMap::new(),
            };
            let opts = VerifyOptions {
                files,
                trust: if pinned_only {
                    Trust::Pinned
                } else {
                    Trust::Tofu
                },
                pinned,
            };
            let report = verify_files(&opts)?;
            let clean = print_report(&report, &mut std::io::stdout().lock())?;
            if clean {
                Ok(())
            } else {
                anyhow::bail!(
                    "audit verify: {} problems; the first: {}",
                    report.problems.len(),
                    report.problems[0]
                )
            }
        }
    }
}
