//! Where the collector writes: JSON-lines files that rotate, or a stream
//! (stdout), and the per-node heads it has persisted.
//!
//! Directory layout (`--out DIR`):
//!
//! - `events-YYYY-MM-DD-NNNNNN.jsonl`: the records. NNNNNN counts files
//!   across days and the date never goes back (a clock stepping back keeps
//!   the last date), so names sort in write order. A file rotates when the
//!   next batch would take it past the size limit or the UTC day changed;
//!   a batch never spans two files.
//! - `state.json`: per-node heads (seq, hash) as of a position in the
//!   files, written atomically (temporary file, fsync, rename) at each
//!   rotation and at shutdown.
//! - `acked.log`: one line per node and write, `{"node","seq","hash"}`,
//!   appended and fsynced after the records and before the acks go out:
//!   the heads the collector acknowledged. Folded into `state.json` at each
//!   rotation. `audit verify DIR` checks every node's chain up to them, so
//!   records cut from the end of a file do not go unnoticed.
//! - `keys/NODE.pub`: the key the collector trusts for each node and how
//!   (pinned, enrolled, first use).
//!
//! The directory is 0700 and every file in it 0600 (records name
//! identities and addresses), like the agent's spool.
//!
//! Durability: a batch is written and fsynced before it is acknowledged.
//! On start the collector loads `state.json` and scans the records after
//! the position it names (at most the files written since the last
//! rotation), so it knows every persisted (node, seq) and never writes one
//! twice. A torn tail in the newest file (a crash mid-write; never
//! acknowledged) is cut back to the last complete record.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde_json::{Value, json};

use portcullis_trail::{
    chain::Head,
    hex::hex,
    keys::{parse_key, private_dir, private_file},
    time::{DAY_SECS, civil_from_days, days_from_civil, unix_secs},
};

/// Default size at which output files rotate.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;
pub const STATE_FILE: &str = "state.json";
pub const ACKED_FILE: &str = "acked.log";

/// What a store found when it opened.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Files whose records were scanned.
    pub files_scanned: usize,
    /// Records scanned.
    pub records_scanned: u64,
    /// The newest file's torn tail, cut: (file, bytes cut).
    pub torn: Option<(PathBuf, u64)>,
    /// Complete lines that were not valid JSON records (file, line), skipped.
    pub bad_lines: Vec<(PathBuf, u64)>,
    /// Nodes whose acknowledged head is beyond what the files hold
    /// (records lost or removed while the collector was down): node, the
    /// acknowledged seq, the seq the files end at.
    pub short: Vec<(String, u64, u64)>,
}

enum Sink {
    Dir(DirSink),
    Writer(Box<dyn Write + Send>),
}

struct DirSink {
    dir: PathBuf,
    rotate_bytes: u64,
    /// The file being written: (name, handle, size, day number, counter).
    current: Option<(String, File, u64, i64, u64)>,
    /// `acked.log`, appended after each write.
    acked: File,
}

/// The collector's output and the heads it has persisted.
pub struct Store {
    sink: Sink,
    heads: HashMap<String, Head>,
    /// For stream outputs with a state directory: written after each batch.
    state_dir: Option<PathBuf>,
}

fn today() -> i64 {
    unix_secs(SystemTime::now()).div_euclid(DAY_SECS)
}

fn file_name(day: i64, counter: u64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("events-{y:04}-{m:02}-{d:02}-{counter:06}.jsonl")
}

/// (day number, counter) of an output file name.
fn parse_name(name: &str) -> Option<(i64, u64)> {
    let rest = name.strip_prefix("events-")?.strip_suffix(".jsonl")?;
    let (date, counter) = rest.rsplit_once('-')?;
    let counter: u64 = counter.parse().ok()?;
    let mut it = date.splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    Some((days_from_civil(y, m, d), counter))
}

/// Output files in `dir`, in write order.
pub fn output_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some((_, c)) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_name)
        {
            v.push((c, path));
        }
    }
    v.sort();
    Ok(v.into_iter().map(|(_, p)| p).collect())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = private_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

fn open_private_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// The heads the collector acknowledged, as its output directory records
/// them: `state.json`'s, then every later line of `acked.log` (a torn last
/// line, from a crash before the ack, is ignored).
pub fn acknowledged_heads(dir: &Path) -> io::Result<HashMap<String, Head>> {
    let mut heads = match fs::read(dir.join(STATE_FILE)) {
        Ok(b) => serde_json::from_slice::<Value>(&b)
            .ok()
            .and_then(|v| v.get("nodes").and_then(parse_heads))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "state.json: no valid `nodes`")
            })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
        Err(e) => return Err(e),
    };
    let text = match fs::read(dir.join(ACKED_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    for line in text.split(|&b| b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let (Some(node), Some(seq), Some(hash)) = (
            v.get("node").and_then(Value::as_str),
            v.get("seq").and_then(Value::as_u64),
            v.get("hash")
                .and_then(Value::as_str)
                .and_then(|h| parse_key(h).ok()),
        ) else {
            continue;
        };
        let e = heads.entry(node.to_owned()).or_insert(Head::EMPTY);
        if seq > e.seq {
            *e = Head { seq, hash };
        }
    }
    Ok(heads)
}

fn heads_json(heads: &HashMap<String, Head>) -> Value {
    let mut nodes: Vec<_> = heads.iter().collect();
    nodes.sort_by(|a, b| a.0.cmp(b.0));
    let mut m = serde_json::Map::new();
    for (n, h) in nodes {
        m.insert(n.clone(), json!({"seq": h.seq, "hash": hex(&h.hash)}));
    }
    Value::Object(m)
}

fn parse_heads(v: &Value) -> Option<HashMap<String, Head>> {
    let mut out = HashMap::new();
    for (n, h) in v.as_object()? {
        let seq = h.get("seq")?.as_u64()?;
        let hash = parse_key(h.get("hash")?.as_str()?).ok()?;
        out.insert(n.clone(), Head { seq, hash });
    }
    Some(out)
}

/// The (node, seq, hash) of an event record line, if it is one.
pub fn record_head(v: &Value) -> Option<(String, Head)> {
    let p = v.get("portcullis")?;
    if p.get("record")?.as_str()? != "event" {
        return None;
    }
    let node = p.get("node_id")?.as_str()?.to_owned();
    let seq = p.get("seq")?.as_u64()?;
    let hash = parse_key(p.get("hash")?.as_str()?).ok()?;
    Some((node, Head { seq, hash }))
}

impl Store {
    /// A store writing to a stream (stdout). With `state_dir`, the heads
    /// are saved there after every batch and loaded at open.
    pub fn writer(w: Box<dyn Write + Send>, state_dir: Option<&Path>) -> io::Result<Store> {
        let mut heads = HashMap::new();
        if let Some(dir) = state_dir {
            private_dir(dir)?;
            match fs::read(dir.join(STATE_FILE)) {
                Ok(b) => {
                    let v: Value = serde_json::from_slice(&b)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    heads = v.get("nodes").and_then(parse_heads).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "state.json: no valid `nodes`")
                    })?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Store {
            sink: Sink::Writer(w),
            heads,
            state_dir: state_dir.map(Path::to_owned),
        })
    }

    /// Opens (creating) an output directory, recovering the persisted heads
    /// and cutting a torn tail.
    pub fn open_dir(dir: &Path, rotate_bytes: u64) -> io::Result<(Store, Recovery)> {
        private_dir(dir)?;
        let acked_before = acknowledged_heads(dir)?;
        let files = output_files(dir)?;
        // Files of an older collector may be world-readable: not any more.
        {
            use std::os::unix::fs::PermissionsExt as _;
            for p in files.iter().chain([&dir.join(STATE_FILE)]) {
                if p.exists() {
                    fs::set_permissions(p, fs::Permissions::from_mode(0o600))?;
                }
            }
        }
        let mut rec = Recovery::default();
        let mut heads = HashMap::new();
        // Where to start scanning: the state's position when it is valid.
        let mut start = (0usize, 0u64);
        if let Ok(b) = fs::read(dir.join(STATE_FILE))
            && let Ok(v) = serde_json::from_slice::<Value>(&b)
            && let Some(h) = v.get("nodes").and_then(parse_heads)
            && let Some(file) = v.get("file").and_then(Value::as_str)
            && let Some(offset) = v.get("offset").and_then(Value::as_u64)
            && let Some(i) = files
                .iter()
                .position(|p| p.file_name().and_then(|n| n.to_str()) == Some(file))
            && fs::metadata(&files[i])?.len() >= offset
        {
            heads = h;
            start = (i, offset);
        }
        let last = files.len().saturating_sub(1);
        for (i, path) in files.iter().enumerate().skip(start.0) {
            let offset = if i == start.0 { start.1 } else { 0 };
            let mut f = OpenOptions::new().read(true).write(i == last).open(path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            rec.files_scanned += 1;
            let mut pos = 0usize;
            let mut line_no = 0u64;
            let mut cut: Option<usize> = None;
            while pos < buf.len() {
                let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') else {
                    // No newline: a torn tail (only possible in the newest file).
                    cut = Some(pos);
                    break;
                };
                line_no += 1;
                let line = &buf[pos..pos + nl];
                match serde_json::from_slice::<Value>(line) {
                    Ok(v) => {
                        rec.records_scanned += 1;
                        if let Some((node, h)) = record_head(&v) {
                            let e = heads.entry(node).or_insert(Head::EMPTY);
                            if h.seq > e.seq {
                                *e = h;
                            }
                        }
                    }
                    Err(_) if i == last => {
                        // Garbage in the newest file after a crash: cut here.
                        cut = Some(pos);
                        break;
                    }
                    Err(_) => rec.bad_lines.push((path.clone(), line_no)),
                }
                pos += nl + 1;
            }
            if let Some(at) = cut {
                if i != last {
                    rec.bad_lines.push((path.clone(), line_no + 1));
                } else {
                    let keep = offset + at as u64;
                    f.set_len(keep)?;
                    f.sync_all()?;
                    rec.torn = Some((path.clone(), buf.len() as u64 - at as u64));
                }
            }
        }
        for (node, acked) in &acked_before {
            let held = heads.get(node).map_or(0, |h: &Head| h.seq);
            if acked.seq > held {
                rec.short.push((node.clone(), acked.seq, held));
            }
        }
        let mut sink = DirSink {
            dir: dir.to_owned(),
            rotate_bytes: rotate_bytes.max(1),
            current: None,
            acked: open_private_append(&dir.join(ACKED_FILE))?,
        };
        if let Some(path) = files.last() {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let (day, counter) = parse_name(&name).unwrap_or((today(), 0));
            let f = OpenOptions::new().append(true).open(path)?;
            let size = f.metadata()?.len();
            sink.current = Some((name, f, size, day, counter));
        }
        Ok((
            Store {
                sink: Sink::Dir(sink),
                heads,
                state_dir: None,
            },
            rec,
        ))
    }

    /// The persisted head of every node.
    pub fn heads(&self) -> &HashMap<String, Head> {
        &self.heads
    }

    pub fn head(&self, node: &str) -> Head {
        self.heads.get(node).copied().unwrap_or(Head::EMPTY)
    }

    /// Writes `data` (whole JSON lines), makes it durable (fsync, or flush
    /// for a stream), then records the new heads.
    pub fn append(&mut self, data: &[u8], heads: &[(String, Head)]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.sink {
            Sink::Writer(w) => {
                w.write_all(data)?;
                w.flush()?;
            }
            Sink::Dir(d) => {
                let day = today();
                let rotate = match &d.current {
                    None => true,
                    Some((_, _, size, fday, _)) => {
                        *size > 0
                            && (size.saturating_add(data.len() as u64) > d.rotate_bytes
                                || day > *fday)
                    }
                };
                if rotate {
                    let (new_day, counter) = match &d.current {
                        None => (day, 1),
                        Some((_, _, _, fday, c)) => (day.max(*fday), c + 1),
                    };
                    let name = file_name(new_day, counter);
                    let path = d.dir.join(&name);
                    let f = {
                        use std::os::unix::fs::OpenOptionsExt as _;
                        OpenOptions::new()
                            .append(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&path)?
                    };
                    sync_dir(&d.dir)?;
                    d.current = Some((name.clone(), f, 0, new_day, counter));
                    // Everything before the new file is durable: record the
                    // heads as of its start so a restart scans from here;
                    // they include every acknowledged head, so acked.log
                    // starts over.
                    let state =
                        json!({"file": name, "offset": 0, "nodes": heads_json(&self.heads)});
                    write_atomic(&d.dir.join(STATE_FILE), state.to_string().as_bytes())?;
                    d.acked.set_len(0)?;
                }
                let (_, f, size, _, _) = d.current.as_mut().expect("opened above");
                let before = *size;
                if let Err(e) = f.write_all(data).and_then(|()| f.sync_data()) {
                    // Cut back what may have been written: nothing of a
                    // failed batch stays.
                    let _ = f.set_len(before);
                    return Err(e);
                }
                // The heads about to be acknowledged, durable before the
                // acks: the witness `audit verify` checks the files against.
                // If they cannot be recorded, the batch is not written
                // either (its resend must not find it already there).
                let mut log = Vec::with_capacity(heads.len() * 120);
                for (node, h) in heads {
                    log.extend_from_slice(
                        json!({"node": node, "seq": h.seq, "hash": hex(&h.hash)})
                            .to_string()
                            .as_bytes(),
                    );
                    log.push(b'\n');
                }
                if !log.is_empty() {
                    let log_len = d.acked.metadata()?.len();
                    if let Err(e) = d.acked.write_all(&log).and_then(|()| d.acked.sync_data()) {
                        let _ = d.acked.set_len(log_len);
                        let _ = f.set_len(before).and_then(|()| f.sync_data());
                        return Err(e);
                    }
                }
                *size += data.len() as u64;
            }
        }
        for (node, h) in heads {
            let e = self.heads.entry(node.clone()).or_insert(Head::EMPTY);
            if h.seq > e.seq {
                *e = *h;
            }
        }
        if let Some(dir) = &self.state_dir {
            let state = json!({"nodes": heads_json(&self.heads)});
            write_atomic(&dir.join(STATE_FILE), state.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Records the heads at the current end of output (clean shutdown), so
    /// the next start scans nothing.
    pub fn save_state(&mut self) -> io::Result<()> {
        match &self.sink {
            Sink::Dir(d) => {
                if let Some((name, _, size, _, _)) = &d.current {
                    let state =
                        json!({"file": name, "offset": size, "nodes": heads_json(&self.heads)});
                    write_atomic(&d.dir.join(STATE_FILE), state.to_string().as_bytes())?;
                }
                Ok(())
            }
            Sink::Writer(w) => {
                let _ = w;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_781), (2026, 11, 24));
        for day in [-1000, 0, 59, 60, 20_000, 20_781, 40_000] {
            let name = file_name(day, 7);
            assert_eq!(parse_name(&name), Some((day, 7)), "{name}");
        }
        assert_eq!(file_name(20_781, 1), "events-2026-11-24-000001.jsonl");
    }
}
