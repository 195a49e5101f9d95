//! Where the drop record left off, so that no kernel drop is missing from
//! the audit trail across agent stops, crashes and restarts. Every
//! `DropSummary` carries the kernel's cumulative counters at its end
//! (`kernel_totals`) and the counter map they come from; that is the mark.
//! A restarted agent reports everything past the last mark, so the
//! summaries of a node add up exactly to its kernel counters.
//!
//! The mark is found in two places. The spool holds every summary until the
//! collector acknowledges it; `drop-marks.json` in the spool directory is
//! written after each summary is durable, so the mark survives the spool
//! being trimmed. After a crash between the two, the spool's later summary
//! wins (the file names the seq it came from): never counted twice, never
//! skipped.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use portcullis_common::DROP_COUNTERS;
use portcullis_proto::v1::{DropSummary, Event, event::Body};
use prost::Message;
use serde_json::{Value, json};

use super::{auditor::Auditor, drops::counter_name};

const FILE: &str = "drop-marks.json";
/// Events read from the spool per call while looking for the last summary.
const READ_CHUNK: usize = 4096;

/// The kernel counters as of one recorded summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropMark {
    /// Seq of the summary that recorded them.
    pub seq: u64,
    /// Which counter map (boot and map id): totals of another map are not
    /// comparable.
    pub instance: String,
    /// Cumulative counters, indexed by `Reason`.
    pub totals: Vec<u64>,
    /// When that summary's interval ended.
    pub at_unix_ns: i64,
}

impl DropMark {
    /// The mark a recorded summary (with seq `seq`) leaves.
    pub fn of(seq: u64, s: &DropSummary) -> Option<DropMark> {
        if s.counters_instance.is_empty() || s.kernel_totals.is_empty() {
            return None;
        }
        let mut totals = vec![0u64; DROP_COUNTERS as usize];
        for rc in &s.kernel_totals {
            if let Some(i) = counter_index(&rc.reason) {
                totals[i] = rc.packets;
            }
        }
        let end = s
            .interval_start_unix_ns
            .saturating_add(i64::try_from(s.interval_ns).unwrap_or(i64::MAX));
        Some(DropMark {
            seq,
            instance: s.counters_instance.clone(),
            totals,
            at_unix_ns: end,
        })
    }

    /// The counters to report from when the kernel's map is `instance`:
    /// the mark's own if it is the same map, zeros if the map is new (it
    /// counted from zero when it was created).
    pub fn baseline_for(mark: Option<&DropMark>, instance: &str) -> Vec<u64> {
        match mark {
            Some(m) if m.instance == instance => m.totals.clone(),
            _ => vec![0u64; DROP_COUNTERS as usize],
        }
    }
}

pub fn path(spool_dir: &Path) -> PathBuf {
    spool_dir.join(FILE)
}

/// Reads the mark file; `Ok(None)` when there is none yet.
pub fn load(spool_dir: &Path) -> io::Result<Option<DropMark>> {
    let p = path(spool_dir);
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", p.display()),
        )
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    let totals_json = v["totals"].as_object().ok_or_else(|| bad("no totals"))?;
    let mut totals = vec![0u64; DROP_COUNTERS as usize];
    for (i, slot) in totals.iter_mut().enumerate() {
        if let Some(n) =
            counter_name(i).and_then(|name| totals_json.get(&name).and_then(Value::as_u64))
        {
            *slot = n;
        }
    }
    Ok(Some(DropMark {
        seq: v["seq"].as_u64().ok_or_else(|| bad("no seq"))?,
        instance: v["instance"]
            .as_str()
            .ok_or_else(|| bad("no instance"))?
            .to_owned(),
        totals,
        at_unix_ns: v["at_unix_ns"].as_i64().unwrap_or(0),
    }))
}

/// The index of the counter named `name` (see [`counter_name`]).
fn counter_index(name: &str) -> Option<usize> {
    (0..DROP_COUNTERS as usize).find(|i| counter_name(*i).as_deref() == Some(name))
}

/// Writes the mark file atomically (temp file, fsync, rename, fsync dir).
pub fn save(spool_dir: &Path, mark: &DropMark) -> io::Result<()> {
    let totals: serde_json::Map<String, Value> = mark
        .totals
        .iter()
        .enumerate()
        .filter_map(|(i, n)| counter_name(i).map(|name| (name, json!(n))))
        .collect();
    let doc = json!({
        "seq": mark.seq,
        "instance": mark.instance,
        "at_unix_ns": mark.at_unix_ns,
        "totals": totals,
    });
    let p = path(spool_dir);
    let tmp = spool_dir.join(format!("{FILE}.tmp"));
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(doc.to_string().as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &p)?;
    fs::File::open(spool_dir)?.sync_all()
}

/// The latest mark: the file's, or a later summary still in the spool.
pub fn recover(spool_dir: &Path, auditor: &Auditor) -> io::Result<Option<DropMark>> {
    // A damaged file is not a reason to lose the trail: the spool's
    // summaries, or else the map's whole count, stand in (this can count a
    // drop twice, never miss one).
    let mut best = load(spool_dir).unwrap_or_else(|e| {
        tracing::error!(event = "drop_marks_unreadable", error = %e, "reporting drops from the spool's last summary");
        None
    });
    let mut after = best.as_ref().map_or(0, |m| m.seq);
    loop {
        let chunk = auditor
            .read_after(after, READ_CHUNK)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let Some(last) = chunk.last() else { break };
        let last_seq = Event::decode(last.as_slice()).map_or(after + 1, |e| e.seq);
        for bytes in &chunk {
            if let Ok(ev) = Event::decode(bytes.as_slice())
                && let Some(Body::DropSummary(s)) = &ev.body
                && let Some(m) = DropMark::of(ev.seq, s)
            {
                best = Some(m);
            }
        }
        if last_seq <= after {
            break;
        }
        after = last_seq;
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_common::{Reason, SHADOW_COUNTERS};
    use portcullis_proto::v1::ReasonCount;

    fn summary(instance: &str, no_admission: u64) -> DropSummary {
        DropSummary {
            interval_start_unix_ns: 1_000,
            interval_ns: 500,
            kernel_totals: vec![
                ReasonCount {
                    reason: "passed".into(),
                    packets: 9,
                },
                ReasonCount {
                    reason: "no_admission".into(),
                    packets: no_admission,
                },
                ReasonCount {
                    reason: "shadow_no_admission".into(),
                    packets: 4,
                },
            ],
            counters_instance: instance.into(),
            ..DropSummary::default()
        }
    }

    #[test]
    fn a_mark_round_trips_through_the_file() {
        let dir = std::env::temp_dir().join(format!("pcl-marks-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), None);
        let m = DropMark::of(42, &summary("boot/7", 31)).unwrap();
        assert_eq!(m.at_unix_ns, 1_500);
        assert_eq!(m.totals[Reason::NoAdmission as usize], 31);
        let shadow = (SHADOW_COUNTERS + Reason::NoAdmission as u32) as usize;
        assert_eq!(m.totals[shadow], 4, "shadow counters are kept too");
        save(&dir, &m).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(m.clone()));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path(&dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::write(path(&dir), "{not json").unwrap();
        assert!(load(&dir).is_err(), "a damaged mark is an error, not zero");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn another_map_counts_from_zero() {
        let m = DropMark::of(1, &summary("boot/7", 31)).unwrap();
        assert_eq!(DropMark::baseline_for(Some(&m), "boot/7")[1], 31);
        assert_eq!(DropMark::baseline_for(Some(&m), "boot/8")[1], 0);
        assert_eq!(DropMark::baseline_for(None, "boot/7")[1], 0);
        assert!(DropMark::of(1, &summary("", 3)).is_none());
    }
}
