//! What `portcullis audit verify` checks: collector output and agent spool
//! segments, offline.
//!
//! Inputs are read in the order given; several nodes may be interleaved. A
//! file starting with the spool magic `PCSPOOL1` is a spool segment (each
//! frame is an event's canonical bytes); anything else is collector JSON
//! lines. A directory is a collector's output directory (its files in
//! write order, its record of node keys, the heads it acknowledged) or an
//! agent's spool directory (its segments in order).
//!
//! Completeness: for a collector directory, every node's chain must reach
//! the head the collector acknowledged (`acked.log`, `state.json`) with
//! that very event; anything short of it is a problem (records cut from
//! the end of a file, or deleted).
//!
//! Authenticity: a node's checkpoint signatures prove its trail only with a
//! key that does not come from the trail itself: `--keys`, or the
//! collector's record (`keys/` of its directory). A node checked only
//! against the key its own STARTED event publishes is reported as not
//! authenticated, a problem unless `--allow-unsigned`.
//!
//! The same event in two inputs (the collector's output and the agent's
//! spool, which keeps acknowledged events until its segment fills) is
//! corroboration; two different events with one (node, seq) are a fork.
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

use prost::Message as _;
use serde_json::Value;

use crate::store;
use portcullis_trail::{
    chain::{Head, event_hash},
    frame::read_segment_file,
    hex::hex,
    keys::{NodeKeys, Provenance},
    ocsf,
    verify::{ChainVerifier, Disposition, Finding, FindingKind, Severity, Trust},
};

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
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The signed head: the seq of the last verified checkpoint.
    pub last_checkpoint: Option<u64>,
    /// Events after the last verified checkpoint: not yet signed.
    pub unsigned: u64,
    pub declared_gaps: Vec<(u64, u64)>,
    /// The same event found again in another input.
    pub corroborated: u64,
    /// The head the collector acknowledged, when its directory was given.
    pub acknowledged: Option<u64>,
    /// Where the key the checkpoints were checked with came from: `--keys`,
    /// `collector (enrolled)`, ..., or `trail (not authenticated)`.
    pub key_source: String,
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
    /// Files and directories, in order.
    pub files: Vec<PathBuf>,
    pub trust: Trust,
    /// Keys the operator gave (`--keys`).
    pub pinned: HashMap<String, [u8; 32]>,
    /// A node checked only against the key in its own trail is a warning,
    /// not a problem.
    pub allow_unsigned: bool,
}

impl VerifyOptions {
    pub fn new(files: Vec<PathBuf>) -> VerifyOptions {
        VerifyOptions {
            files,
            trust: Trust::Tofu,
            pinned: HashMap::new(),
            allow_unsigned: false,
        }
    }
}

/// Where an event was first seen: the file's index in [`Run::files`] plus
/// one (0: nothing seen) and the line or frame.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Sighting {
    hash: [u8; 16],
    file: u32,
    line: u32,
}

/// Event hashes per (node, seq), dense per node (16 bytes of SHA-256 each:
/// a second event with the same prefix would take 2^128 work to forge).
#[derive(Default)]
struct SeqHashes {
    base: u64,
    seen: Vec<Sighting>,
}

impl SeqHashes {
    fn get(&self, seq: u64) -> Option<Sighting> {
        let i = seq.checked_sub(self.base)?;
        let s = *self.seen.get(usize::try_from(i).ok()?)?;
        (s.file != 0).then_some(s)
    }

    fn put(&mut self, seq: u64, s: Sighting) {
        if self.seen.is_empty() {
            self.base = seq;
        }
        if seq < self.base {
            // Rare (a chain anchored late, then an earlier input): shift.
            let shift = usize::try_from(self.base - seq).unwrap_or(usize::MAX);
            let mut v = vec![Sighting::default(); shift];
            v.append(&mut self.seen);
            self.seen = v;
            self.base = seq;
        }
        let Ok(i) = usize::try_from(seq - self.base) else {
            return;
        };
        if i >= self.seen.len() {
            self.seen.resize(i + 1, Sighting::default());
        }
        self.seen[i] = s;
    }
}

fn short_hash(h: &[u8; 32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&h[..16]);
    out
}

struct Run {
    verifier: ChainVerifier,
    report: Report,
    /// Every event accepted, by (node, seq): corroboration or fork.
    hashes: HashMap<String, SeqHashes>,
    /// The files read so far, and whether each is a spool segment.
    files: Vec<(PathBuf, bool)>,
    corroborated: HashMap<String, u64>,
    /// Where each node's key came from, when not from its trail.
    key_source: HashMap<String, String>,
    /// Provenance per node from a collector's record (records of nodes
    /// trusted on first use say so).
    provenance: HashMap<String, Provenance>,
    /// Heads a collector acknowledged.
    acknowledged: HashMap<String, Head>,
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
        let here = Sighting {
            hash: short_hash(&event_hash(bytes)),
            file: u32::try_from(self.files.len()).unwrap_or(u32::MAX),
            line: u32::try_from(at.line).unwrap_or(u32::MAX),
        };
        // The same (node, seq) seen before. The same bytes in the
        // collector's output and in a spool corroborate each other; twice
        // in one kind of input is a duplicate (the collector never writes
        // an event twice, a spool never holds one twice); other bytes are a
        // fork.
        if let Ok(ev) = portcullis_proto::v1::Event::decode(bytes)
            && let Some(first) = self.hashes.get(&ev.node_id).and_then(|h| h.get(ev.seq))
        {
            let (first_file, first_spool) = self.files[first.file as usize - 1].clone();
            let first_at = Location {
                file: first_file,
                line: u64::from(first.line),
                unit: if first_spool { "frame" } else { "line" },
            };
            let spool_now = self.files.last().is_some_and(|f| f.1);
            if first.hash != here.hash {
                self.issue(
                    at,
                    Severity::Error,
                    "fork",
                    format!(
                        "node {} seq {}: other bytes (hash {}) than the event at {first_at}",
                        ev.node_id,
                        ev.seq,
                        hex(&event_hash(bytes))
                    ),
                );
            } else if first_spool == spool_now {
                self.issue(
                    at,
                    Severity::Error,
                    "duplicate",
                    format!(
                        "node {} seq {} again (same bytes as {first_at})",
                        ev.node_id, ev.seq
                    ),
                );
            } else {
                *self.corroborated.entry(ev.node_id).or_default() += 1;
            }
            return;
        }
        let v = self.verifier.accept(bytes);
        let findings = v.findings.clone();
        for f in &findings {
            self.finding(at, f);
        }
        if let (Disposition::New, Some(ev)) = (v.disposition, &v.event) {
            self.hashes
                .entry(ev.node_id.clone())
                .or_default()
                .put(ev.seq, here);
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

/// What one input on the command line stands for.
enum Input {
    File(PathBuf),
    /// A collector's output directory: its files, key record and
    /// acknowledged heads.
    Collector {
        files: Vec<PathBuf>,
        keys: HashMap<String, ([u8; 32], Provenance)>,
        heads: HashMap<String, Head>,
    },
    Spool(Vec<PathBuf>),
}

fn io_at(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn expand(path: &Path) -> std::io::Result<Input> {
    if !path.is_dir() {
        return Ok(Input::File(path.to_owned()));
    }
    let files = store::output_files(path).map_err(|e| io_at(path, e))?;
    if !files.is_empty() || path.join(store::STATE_FILE).exists() {
        let keys_dir = path.join("keys");
        let keys = if keys_dir.is_dir() {
            NodeKeys::open(Some(&keys_dir))
                .map_err(|e| io_at(&keys_dir, e))?
                .all()
                .clone()
        } else {
            HashMap::new()
        };
        let heads = store::acknowledged_heads(path).map_err(|e| io_at(path, e))?;
        return Ok(Input::Collector { files, keys, heads });
    }
    let mut segs: Vec<(u64, PathBuf)> = fs::read_dir(path)
        .map_err(|e| io_at(path, e))?
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?;
            let first = n.strip_prefix("seg-")?.strip_suffix(".pcs")?.parse().ok()?;
            Some((first, p))
        })
        .collect();
    if segs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{}: neither a collector output directory (events-*.jsonl, state.json) nor an agent spool (seg-*.pcs)",
                path.display()
            ),
        ));
    }
    segs.sort();
    Ok(Input::Spool(segs.into_iter().map(|(_, p)| p).collect()))
}

/// Verifies `opts.files` (files and directories).
pub fn verify_files(opts: &VerifyOptions) -> std::io::Result<Report> {
    let inputs: Vec<Input> = opts
        .files
        .iter()
        .map(|p| expand(p))
        .collect::<std::io::Result<_>>()?;
    // Keys that do not come from the trails: the operator's, then each
    // collector's record (the operator's win).
    let mut pinned = HashMap::new();
    let mut key_source = HashMap::new();
    let mut provenance = HashMap::new();
    let mut acknowledged: HashMap<String, Head> = HashMap::new();
    for input in &inputs {
        if let Input::Collector { keys, heads, .. } = input {
            for (node, (key, prov)) in keys {
                pinned.entry(node.clone()).or_insert(*key);
                key_source
                    .entry(node.clone())
                    .or_insert_with(|| format!("collector ({})", prov.as_str()));
                provenance.entry(node.clone()).or_insert(*prov);
            }
            for (node, h) in heads {
                let e = acknowledged.entry(node.clone()).or_insert(Head::EMPTY);
                if h.seq > e.seq {
                    *e = *h;
                }
            }
        }
    }
    for (node, key) in &opts.pinned {
        pinned.insert(node.clone(), *key);
        key_source.insert(node.clone(), "--keys".into());
    }
    let mut run = Run {
        verifier: ChainVerifier::new(opts.trust, pinned),
        report: Report::default(),
        hashes: HashMap::new(),
        files: Vec::new(),
        corroborated: HashMap::new(),
        key_source,
        provenance,
        acknowledged,
        gaps: Vec::new(),
    };
    let mut order: Vec<PathBuf> = Vec::new();
    for input in &inputs {
        let files: Vec<PathBuf> = match input {
            Input::File(f) => vec![f.clone()],
            Input::Collector { files, .. } | Input::Spool(files) => files.clone(),
        };
        for file in files {
            let bytes = fs::read(&file).map_err(|e| io_at(&file, e))?;
            let is_spool = bytes.starts_with(portcullis_trail::frame::MAGIC);
            run.files.push((file.clone(), is_spool));
            if is_spool {
                spool(&mut run, &file)?;
            } else {
                json_lines(&mut run, &file, &bytes);
            }
            order.push(file);
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
    completeness(&mut run);
    authenticity(&mut run, opts.allow_unsigned);
    // Input order: files in the order read, then line; what concerns no
    // file (completeness, authenticity) last.
    let order: HashMap<&PathBuf, usize> = order.iter().enumerate().map(|(i, f)| (f, i)).collect();
    let key = |i: &Issue| {
        (
            order.get(&i.at.file).copied().unwrap_or(usize::MAX),
            i.at.line,
        )
    };
    run.report.problems.sort_by_key(key);
    run.report.warnings.sort_by_key(key);
    let mut nodes: Vec<_> = run.verifier.nodes();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    for st in nodes {
        run.report.nodes.push(NodeSummary {
            node_id: st.node_id.clone(),
            events: st.events,
            first_seq: st.first_seq,
            last_seq: st.last_seq,
            checkpoints: st.checkpoints,
            last_checkpoint: st.last_checkpoint,
            unsigned: st.since_checkpoint,
            declared_gaps: st.declared_gaps.clone(),
            corroborated: run.corroborated.get(&st.node_id).copied().unwrap_or(0),
            acknowledged: run.acknowledged.get(&st.node_id).map(|h| h.seq),
            key_source: run
                .key_source
                .get(&st.node_id)
                .cloned()
                .unwrap_or_else(|| "trail (not authenticated)".into()),
        });
    }
    Ok(run.report)
}

/// Where no file is to blame (the input as a whole).
fn whole_input() -> Location {
    Location {
        file: PathBuf::new(),
        line: 0,
        unit: "input",
    }
}

/// Every node a collector acknowledged must be there up to that head, with
/// the very event it acknowledged.
fn completeness(run: &mut Run) {
    let mut acked: Vec<(String, Head)> = run
        .acknowledged
        .iter()
        .map(|(n, h)| (n.clone(), *h))
        .collect();
    acked.sort_by(|a, b| a.0.cmp(&b.0));
    for (node, head) in acked {
        if head.seq == 0 {
            continue;
        }
        let held = run.verifier.node(&node).map_or(0, |s| s.last_seq);
        match run.hashes.get(&node).and_then(|h| h.get(head.seq)) {
            Some(s) if s.hash == short_hash(&head.hash) => {}
            Some(_) => run.issue(
                &whole_input(),
                Severity::Error,
                "not_acknowledged",
                format!(
                    "node {node} seq {}: the event here is not the one the collector acknowledged (hash {})",
                    head.seq,
                    hex(&head.hash)
                ),
            ),
            None => run.issue(
                &whole_input(),
                Severity::Error,
                "missing",
                format!(
                    "node {node}: the collector acknowledged events through seq {} but the input holds {}: records cut from the end or deleted",
                    head.seq,
                    if held == 0 {
                        "none of them".to_owned()
                    } else {
                        format!("them only through seq {held}")
                    }
                ),
            ),
        }
    }
}

/// A node checked only against the key its own trail publishes proves
/// nothing about who wrote it.
fn authenticity(run: &mut Run, allow_unsigned: bool) {
    let mut nodes: Vec<String> = run
        .verifier
        .nodes()
        .iter()
        .map(|s| s.node_id.clone())
        .collect();
    nodes.sort();
    for node in nodes {
        match run.key_source.get(&node) {
            Some(src) if src == "collector (tofu)" => run.issue(
                &whole_input(),
                Severity::Warning,
                "tofu",
                format!("node {node}: the collector trusted its key on first use, without enrollment"),
            ),
            Some(_) => {}
            None => run.issue(
                &whole_input(),
                if allow_unsigned {
                    Severity::Warning
                } else {
                    Severity::Error
                },
                "unauthenticated",
                format!(
                    "node {node}: authenticity NOT checked: no key for it from --keys or a collector's record, so its checkpoints were checked only against the key its own trail publishes{}",
                    if allow_unsigned {
                        " (--allow-unsigned)"
                    } else {
                        "; give --keys FILE or the collector's output directory, or --allow-unsigned to accept that"
                    }
                ),
            ),
        }
    }
}

fn spool(run: &mut Run, file: &Path) -> std::io::Result<()> {
    let seg = read_segment_file(file)
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
            // The trust the record must show: the collector's record of the
            // node when given, else what the line says (unverifiable then,
            // like everything of an unauthenticated node).
            let node = p
                .and_then(|p| p.get("node_id"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let line_trust = p.and_then(|p| p.get("trust")).and_then(Value::as_str);
            let trust = match run.provenance.get(node) {
                Some(Provenance::Tofu) => Some(Provenance::Tofu.as_str()),
                Some(_) => None,
                None => line_trust,
            };
            match ocsf::event_record_trusted(&bytes, trust) {
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
                                hex(&event_hash(&bytes))
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
