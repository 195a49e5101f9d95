//! The local audit spool: every sealed event is appended here, and fsynced,
//! before anything else (the exporter, the kernel) acts on it. The segment
//! file format is `trail/src/frame.rs`.
//!
//! Segments follow each other without overlap; a hole between two segments
//! means events were lost (a segment moved aside as corrupt) and is
//! announced by a `Gap` event later in the chain. Events before the first
//! segment were acknowledged by the collector (trimmed) or dropped with a
//! `Gap` event (`on_full = "drop_oldest"`).
//!
//! Writes only ever append to the last segment (the active one). A batch is
//! written with one `pwrite` per segment touched and made durable with one
//! `fdatasync`; a new segment is created with its header and first frames,
//! fsynced, and then the directory is fsynced. After a crash, the only damage
//! an append can leave is a torn tail on the last segment: recovery cuts it
//! off at the last whole frame. Damage anywhere else is corruption: the file
//! is renamed to `*.corrupt` (never deleted) and reported.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use portcullis_trail::chain::{self, Head, Sealed};
use portcullis_trail::frame::{
    BadTail, FRAME_HEADER_LEN, FrameError, HEADER_LEN, MAGIC, MAX_FRAME, frame_at,
    parse_segment_name, peek_seq, push_frame, scan, segment_name,
};

/// One in this many frames of a segment has its offset kept in memory, so a
/// read seeks to within this many frames of where it starts.
const INDEX_STRIDE: u64 = 64;
/// Bytes read per `pread` when streaming frames out.
const READ_CHUNK: usize = 256 << 10;

/// Spool errors. Every I/O error names the file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool {}: {op}: no space left on device", path.display())]
    DiskFull { path: PathBuf, op: &'static str },
    #[error("audit spool {}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("audit spool {}: in use by another process", path.display())]
    InUse { path: PathBuf },
    #[error("audit spool: event seq {got} does not follow {expected}")]
    Sequence { expected: u64, got: u64 },
    #[error("audit spool: event of {len} bytes is larger than a frame may be ({MAX_FRAME})")]
    TooLarge { len: usize },
    #[error("audit spool {}: at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: FrameError,
    },
}

impl SpoolError {
    fn io(path: &Path, op: &'static str, source: io::Error) -> SpoolError {
        let enospc = matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) || source.kind() == io::ErrorKind::StorageFull;
        if enospc {
            SpoolError::DiskFull {
                path: path.to_path_buf(),
                op,
            }
        } else {
            SpoolError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        }
    }

    /// True for ENOSPC/EDQUOT: freeing space (trimming) may cure it.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::DiskFull { .. })
    }
}

/// A segment file the spool holds.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// From the file name: the seq of its first frame.
    first_seq: u64,
    /// Seq of its last frame; `first_seq - 1` while it has none.
    last_seq: u64,
    /// File length in bytes (header and whole frames).
    len: u64,
    /// `(seq, offset)` of every `INDEX_STRIDE`-th frame, starting with the
    /// first.
    index: Vec<(u64, u64)>,
}

impl Segment {
    fn has_frames(&self) -> bool {
        self.last_seq >= self.first_seq
    }

    /// Records a frame for `seq` at `offset` (`seq` follows `last_seq`).
    fn note_frame(&mut self, seq: u64, offset: u64, frame_len: u64) {
        if (seq - self.first_seq).is_multiple_of(INDEX_STRIDE) {
            self.index.push((seq, offset));
        }
        self.last_seq = seq;
        self.len = offset + frame_len;
    }
}

/// A torn tail cut from the last segment at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    /// Where the file was cut (it is now this long; 0: the file was removed).
    pub offset: u64,
    pub bytes_cut: u64,
    pub reason: FrameError,
}

/// A segment that could not be used and was renamed aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptSegment {
    /// Where the file is now (`….pcs.corrupt`).
    pub moved_to: PathBuf,
    /// Seq from its file name.
    pub first_seq: u64,
    /// Last seq of the valid frames before the damage (`first_seq - 1` if
    /// none).
    pub last_valid_seq: u64,
    pub bad: BadTail,
}

/// What `Spool::open` found and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the chain continues: the next event is `head.seq + 1` with
    /// `prev_hash = head.hash`. `head.hash` is the hash of the last event
    /// the spool holds; `head.seq` is at least its seq, higher when events
    /// after it were lost (see `lost`).
    pub head: Head,
    /// Seq of the last event held, 0 for none.
    pub last_held_seq: u64,
    /// Events and segments held after recovery.
    pub events: u64,
    pub segments: usize,
    pub torn: Option<TornTail>,
    pub corrupt: Vec<CorruptSegment>,
    /// Inclusive seq ranges written once and no longer held (moved aside as
    /// corrupt or missing between segments). They deserve `Gap` events.
    pub lost: Vec<(u64, u64)>,
}

impl Recovery {
    pub fn torn_bytes(&self) -> u64 {
        self.torn.as_ref().map_or(0, |t| t.bytes_cut)
    }
}

/// The spool. One writer; `read_after` may be called between writes.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    dir_handle: File,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// Write handle of the last segment.
    active: Option<File>,
    /// Seq the next appended event must carry.
    next_seq: u64,
    used: u64,
    /// Frame bytes being assembled for one write (reused).
    buf: Vec<u8>,
    /// A failed append could not cut the active segment back: do it before
    /// the next write.
    dirty_tail: bool,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering from a
    /// crash: see the module doc.
    pub fn open(
        dir: impl AsRef<Path>,
        segment_bytes: u64,
    ) -> Result<(Spool, Recovery), SpoolError> {
        let dir = dir.as_ref().to_path_buf();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SpoolError::io(&dir, "create directory", e))?;
        let dir_handle = File::open(&dir).map_err(|e| SpoolError::io(&dir, "open directory", e))?;
        // One writer per spool: a second agent on the same directory would
        // fork the chain.
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(dir_handle.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                SpoolError::InUse { path: dir }
            } else {
                SpoolError::io(&dir, "lock directory", e)
            });
        }

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| SpoolError::io(&dir, "list directory", e))? {
            let entry = entry.map_err(|e| SpoolError::io(&dir, "list directory", e))?;
            let name = entry.file_name();
            if let Some(first) = name.to_str().and_then(parse_segment_name) {
                names.push((first, entry.path()));
            }
        }
        names.sort();

        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut torn = None;
        let mut corrupt = Vec::new();
        let mut last_hash = chain::GENESIS;
        // Highest seq known to have been written, held or not.
        let mut max_seen = 0u64;
        let n = names.len();
        for (i, (first_seq, path)) in names.into_iter().enumerate() {
            let is_last = i + 1 == n;
            let data = fs::read(&path).map_err(|e| SpoolError::io(&path, "read", e))?;
            let prev_last = segments.back().map(|s: &Segment| s.last_seq);
            let mut seg = Segment {
                path: path.clone(),
                first_seq,
                last_seq: first_seq - 1,
                len: HEADER_LEN,
                index: Vec::new(),
            };
            let mut last_payload: Option<&[u8]> = None;
            let mut bad = scan(&data, |off, payload| {
                let expected = seg.last_seq + 1;
                match peek_seq(payload) {
                    None => Err(FrameError::Undecodable),
                    Some(got) if got != expected => {
                        Err(FrameError::SeqOutOfOrder { expected, got })
                    }
                    Some(seq) => {
                        seg.note_frame(seq, off, FRAME_HEADER_LEN + payload.len() as u64);
                        Ok(())
                    }
                }
            });
            if seg.has_frames() {
                let off = last_frame_offset(&data, &seg);
                last_payload = frame_at(&data, off as usize).ok();
            }
            // A segment overlapping the ones before it conflicts with them.
            if bad.is_none()
                && let Some(prev_last) = prev_last
                && first_seq <= prev_last
            {
                bad = Some(BadTail {
                    offset: HEADER_LEN,
                    reason: FrameError::SeqOutOfOrder {
                        expected: prev_last + 1,
                        got: first_seq,
                    },
                });
            }
            let overlaps = prev_last.is_some_and(|p| first_seq <= p);
            match bad {
                None => {}
                Some(b) if is_last && !overlaps && b.reason != FrameError::BadMagic => {
                    // A crash mid-append: cut the tail at the last whole frame.
                    let keep = if seg.has_frames() {
                        b.offset.max(HEADER_LEN)
                    } else {
                        0
                    };
                    let cut = data.len() as u64 - keep;
                    if keep == 0 {
                        fs::remove_file(&path)
                            .map_err(|e| SpoolError::io(&path, "remove torn segment", e))?;
                        dir_handle
                            .sync_all()
                            .map_err(|e| SpoolError::io(&dir, "fsync directory", e))?;
                    } else {
                        let f = OpenOptions::new()
                            .write(true)
                            .open(&path)
                            .map_err(|e| SpoolError::io(&path, "open", e))?;
                        f.set_len(keep)
                            .map_err(|e| SpoolError::io(&path, "truncate torn tail", e))?;
                        f.sync_all()
                            .map_err(|e| SpoolError::io(&path, "fsync", e))?;
                    }
                    tracing::warn!(path = %path.display(), offset = keep, bytes_cut = cut, reason = %b.reason,
                        "audit spool: cut a torn tail left by a crash");
                    torn = Some(TornTail {
                        path: path.clone(),
                        offset: keep,
                        bytes_cut: cut,
                        reason: b.reason,
                    });
                    if keep == 0 {
                        continue;
                    }
                }
                Some(b) => {
                    let moved_to = path.with_extension("pcs.corrupt");
                    fs::rename(&path, &moved_to)
                        .map_err(|e| SpoolError::io(&path, "move corrupt segment aside", e))?;
                    dir_handle
                        .sync_all()
                        .map_err(|e| SpoolError::io(&dir, "fsync directory", e))?;
                    tracing::error!(path = %path.display(), moved_to = %moved_to.display(), offset = b.offset,
                        reason = %b.reason, "audit spool: corrupt segment moved aside");
                    max_seen = max_seen.max(seg.last_seq).max(first_seq);
                    corrupt.push(CorruptSegment {
                        moved_to,
                        first_seq,
                        last_valid_seq: seg.last_seq,
                        bad: b,
                    });
                    continue;
                }
            }
            if !seg.has_frames() {
                // A header and nothing else: no data to keep. Segments are
                // created on demand.
                fs::remove_file(&path)
                    .map_err(|e| SpoolError::io(&path, "remove empty segment", e))?;
                continue;
            }
            if let Some(p) = last_payload {
                last_hash = chain::event_hash(p);
            }
            max_seen = max_seen.max(seg.last_seq);
            segments.push_back(seg);
        }

        // What was written once and is not held any more.
        let mut lost = Vec::new();
        let first_held = segments.front().map(|s| s.first_seq);
        if let Some(first_held) = first_held {
            // Corrupt segments before the first one held.
            if let Some(c) = corrupt.iter().map(|c| c.first_seq).min()
                && c < first_held
            {
                lost.push((c, first_held - 1));
            }
        }
        for (a, b) in segments.iter().zip(segments.iter().skip(1)) {
            if b.first_seq > a.last_seq + 1 {
                lost.push((a.last_seq + 1, b.first_seq - 1));
            }
        }
        let last_held = segments.back().map_or(0, |s| s.last_seq);
        if first_held.is_none()
            && let Some(c) = corrupt.iter().map(|c| c.first_seq).min()
        {
            lost.push((c, max_seen));
        } else if max_seen > last_held {
            lost.push((last_held + 1, max_seen));
        }
        let head = Head {
            seq: max_seen.max(last_held),
            hash: last_hash,
        };

        let used = segments.iter().map(|s| s.len).sum();
        let active = match segments.back() {
            Some(s) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(&s.path)
                    .map_err(|e| SpoolError::io(&s.path, "open", e))?,
            ),
            None => None,
        };
        let events = segments.iter().map(|s| s.last_seq + 1 - s.first_seq).sum();
        let recovery = Recovery {
            head,
            last_held_seq: last_held,
            events,
            segments: segments.len(),
            torn,
            corrupt,
            lost,
        };
        Ok((
            Spool {
                dir,
                dir_handle,
                segment_bytes,
                segments,
                active,
                next_seq: head.seq + 1,
                used,
                buf: Vec::new(),
                dirty_tail: false,
            },
            recovery,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Total bytes of the segment files.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Seq the next appended event must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seq of the oldest event held, `None` when empty.
    pub fn first_seq(&self) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.has_frames())
            .map(|s| s.first_seq)
    }

    /// Seq of the newest event held, `None` when empty.
    pub fn last_seq(&self) -> Option<u64> {
        self.segments
            .iter()
            .rev()
            .find(|s| s.has_frames())
            .map(|s| s.last_seq)
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Paths of the segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.segments.iter().map(|s| s.path.clone()).collect()
    }

    /// Appends `events` (consecutive seqs starting at `next_seq()`) and makes
    /// them durable with one fdatasync (plus one per segment started and a
    /// directory fsync). On error nothing of the batch stays: the files are
    /// cut back to where they were, so the batch can be retried as is.
    pub fn append_batch(&mut self, events: &[Sealed]) -> Result<(), SpoolError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let mut expected = self.next_seq;
        for e in events {
            if e.seq != expected {
                return Err(SpoolError::Sequence {
                    expected,
                    got: e.seq,
                });
            }
            if e.bytes.is_empty() || e.bytes.len() > MAX_FRAME as usize {
                return Err(SpoolError::TooLarge { len: e.bytes.len() });
            }
            expected += 1;
        }
        debug_assert_eq!(first.seq, self.next_seq);

        // Where to roll back to.
        let saved_segments = self.segments.len();
        let saved_last = self
            .segments
            .back()
            .map(|s| (s.last_seq, s.len, s.index.len()));
        match self.write_frames(events) {
            Ok(()) => {
                self.next_seq = expected;
                self.used = self.segments.iter().map(|s| s.len).sum();
                Ok(())
            }
            Err(e) => {
                self.roll_back(saved_segments, saved_last);
                Err(e)
            }
        }
    }

    fn write_frames(&mut self, events: &[Sealed]) -> Result<(), SpoolError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let res = self.write_frames_with(events, &mut buf);
        if buf.capacity() <= 4 << 20 {
            self.buf = buf;
        }
        res
    }

    fn write_frames_with(
        &mut self,
        events: &[Sealed],
        buf: &mut Vec<u8>,
    ) -> Result<(), SpoolError> {
        if self.dirty_tail && !self.segments.is_empty() {
            self.ensure_active()?;
            let seg = self.segments.back().expect("a segment");
            let f = self.active.as_ref().expect("active segment open");
            f.set_len(seg.len)
                .map_err(|e| SpoolError::io(&seg.path, "cut back a failed append", e))?;
            self.dirty_tail = false;
        }
        // Offset in the active file where `buf` goes.
        let mut write_at = self.segments.back().map_or(0, |s| s.len);
        let mut created = false;
        for e in events {
            let frame_len = FRAME_HEADER_LEN + e.bytes.len() as u64;
            let need_new = match self.segments.back() {
                None => true,
                Some(s) => {
                    (s.has_frames() && s.len + frame_len > self.segment_bytes)
                        || s.last_seq + 1 != e.seq
                }
            };
            if need_new {
                if !buf.is_empty() {
                    self.flush(buf, write_at)?;
                }
                self.start_segment(e.seq, buf)?;
                created = true;
                write_at = 0;
            }
            let seg = self.segments.back_mut().expect("a segment");
            let off = seg.len;
            push_frame(buf, &e.bytes);
            seg.note_frame(e.seq, off, frame_len);
        }
        self.flush(buf, write_at)?;
        if created {
            self.dir_handle
                .sync_all()
                .map_err(|e| SpoolError::io(&self.dir, "fsync directory", e))?;
        }
        Ok(())
    }

    /// Writes `buf` at `at` in the active segment and fdatasyncs it.
    fn flush(&mut self, buf: &mut Vec<u8>, at: u64) -> Result<(), SpoolError> {
        self.ensure_active()?;
        let seg = self.segments.back().expect("a segment");
        let f = self.active.as_ref().expect("active segment open");
        f.write_all_at(buf, at)
            .map_err(|e| SpoolError::io(&seg.path, "write", e))?;
        f.sync_data()
            .map_err(|e| SpoolError::io(&seg.path, "fdatasync", e))?;
        buf.clear();
        Ok(())
    }

    /// Reopens the write handle of the last segment if a failed append lost
    /// it.
    fn ensure_active(&mut self) -> Result<(), SpoolError> {
        if self.active.is_none() {
            let seg = self.segments.back().expect("a segment");
            let f = OpenOptions::new()
                .write(true)
                .open(&seg.path)
                .map_err(|e| SpoolError::io(&seg.path, "open", e))?;
            self.active = Some(f);
        }
        Ok(())
    }

    /// Creates `seg-{first_seq}.pcs` as the new active segment; its header
    /// goes into `buf`, written with its first frames.
    fn start_segment(&mut self, first_seq: u64, buf: &mut Vec<u8>) -> Result<(), SpoolError> {
        let path = self.dir.join(segment_name(first_seq));
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| SpoolError::io(&path, "create segment", e))?;
        buf.extend_from_slice(MAGIC);
        self.segments.push_back(Segment {
            path,
            first_seq,
            last_seq: first_seq - 1,
            len: HEADER_LEN,
            index: Vec::new(),
        });
        self.active = Some(f);
        Ok(())
    }

    /// Undoes a failed append: removes segments it created and cuts the
    /// previous active segment back to its old length.
    fn roll_back(&mut self, saved_segments: usize, saved_last: Option<(u64, u64, usize)>) {
        while self.segments.len() > saved_segments {
            let s = self.segments.pop_back().expect("len checked");
            if let Err(e) = fs::remove_file(&s.path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::error!(path = %s.path.display(), error = %e, "audit spool: cannot remove a segment of a failed append");
            }
        }
        self.active = None;
        if let (Some(seg), Some((last_seq, len, index_len))) =
            (self.segments.back_mut(), saved_last)
        {
            seg.last_seq = last_seq;
            seg.len = len;
            seg.index.truncate(index_len);
            match OpenOptions::new().write(true).open(&seg.path) {
                Ok(f) => {
                    if let Err(e) = f.set_len(len) {
                        tracing::error!(path = %seg.path.display(), error = %e, "audit spool: cannot cut back a failed append");
                        self.dirty_tail = true;
                    }
                    self.active = Some(f);
                }
                Err(e) => {
                    tracing::error!(path = %seg.path.display(), error = %e, "audit spool: cannot reopen the active segment");
                    self.dirty_tail = true;
                }
            }
        }
        self.used = self.segments.iter().map(|s| s.len).sum();
    }

    /// Deletes whole segments whose events are all ≤ `acked_seq`, never the
    /// active (last) one. Returns the bytes freed.
    pub fn trim_through(&mut self, acked_seq: u64) -> Result<u64, SpoolError> {
        let mut freed = 0;
        while self.segments.len() > 1 && self.segments[0].last_seq <= acked_seq {
            freed += self.remove_front()?.len;
        }
        Ok(freed)
    }

    /// Deletes the oldest segment even if not acknowledged (never the active
    /// one); returns the seq range it held.
    pub fn drop_oldest(&mut self) -> Result<Option<(u64, u64)>, SpoolError> {
        if self.segments.len() <= 1 {
            return Ok(None);
        }
        let s = self.remove_front()?;
        Ok(Some((s.first_seq, s.last_seq)))
    }

    fn remove_front(&mut self) -> Result<Segment, SpoolError> {
        let s = &self.segments[0];
        if let Err(e) = fs::remove_file(&s.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(SpoolError::io(&s.path, "remove segment", e));
        }
        let s = self.segments.pop_front().expect("non-empty");
        self.used -= s.len;
        Ok(s)
    }

    /// Canonical bytes of the held events with seq > `seq`, in order (from
    /// the oldest held when `seq` is below it), at most `max_events`.
    pub fn read_after(&self, seq: u64, max_events: usize) -> Result<Vec<Vec<u8>>, SpoolError> {
        let mut out = Vec::new();
        let mut want = seq.saturating_add(1);
        let start = self.segments.partition_point(|s| s.last_seq < want);
        for seg in self.segments.iter().skip(start) {
            if out.len() >= max_events {
                break;
            }
            if !seg.has_frames() {
                continue;
            }
            want = want.max(seg.first_seq);
            let i = seg.index.partition_point(|&(s, _)| s <= want);
            let (mut cur_seq, mut off) = seg.index[i.saturating_sub(1)];
            let f = File::open(&seg.path).map_err(|e| SpoolError::io(&seg.path, "open", e))?;
            let mut chunk: Vec<u8> = Vec::new();
            let mut chunk_at = off;
            while off < seg.len && out.len() < max_events {
                // Make sure the frame at `off` is wholly in `chunk`.
                let mut rel = (off - chunk_at) as usize;
                let avail = chunk.len() - rel;
                let need = if avail >= FRAME_HEADER_LEN as usize {
                    let len = u32::from_le_bytes(chunk[rel..rel + 4].try_into().expect("4 bytes"));
                    FRAME_HEADER_LEN as usize + len as usize
                } else {
                    FRAME_HEADER_LEN as usize
                };
                if avail < need {
                    let n = (seg.len - off).min(READ_CHUNK.max(need) as u64) as usize;
                    chunk.resize(n, 0);
                    f.read_exact_at(&mut chunk, off)
                        .map_err(|e| SpoolError::io(&seg.path, "read", e))?;
                    chunk_at = off;
                    rel = 0;
                }
                let payload = frame_at(&chunk, rel).map_err(|reason| SpoolError::Corrupt {
                    path: seg.path.clone(),
                    offset: off,
                    reason,
                })?;
                if cur_seq >= want {
                    out.push(payload.to_vec());
                }
                off += FRAME_HEADER_LEN + payload.len() as u64;
                cur_seq += 1;
            }
            want = seg.last_seq + 1;
        }
        Ok(out)
    }
}

/// Offset of the last frame of `seg` in its file's `data`.
fn last_frame_offset(data: &[u8], seg: &Segment) -> u64 {
    let (mut seq, mut off) = *seg.index.last().expect("a frame");
    while seq < seg.last_seq {
        let len = u32::from_le_bytes(data[off as usize..off as usize + 4].try_into().expect("4"));
        off += FRAME_HEADER_LEN + u64::from(len);
        seq += 1;
    }
    off
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use portcullis_proto::v1::{Gap, event::Body};

    use super::*;
    use portcullis_testkit::{TempDir, TmpfsMount};
    use portcullis_trail::chain::Sealer;
    use portcullis_trail::frame::{frame_crc, read_segment_file};

    fn body(i: u64, pad: usize) -> Body {
        Body::Gap(Gap {
            first_seq: i,
            last_seq: i,
            reason: "x".repeat(pad),
        })
    }

    fn seal(sealer: &mut Sealer, n: usize, pad: usize) -> Vec<Sealed> {
        (0..n)
            .map(|i| sealer.seal(body(i as u64, pad), SystemTime::now(), 1))
            .collect()
    }

    fn seqs(events: &[Vec<u8>]) -> Vec<u64> {
        events.iter().map(|e| peek_seq(e).expect("seq")).collect()
    }

    fn file_sizes(spool: &Spool) -> u64 {
        spool
            .segment_paths()
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum()
    }

    /// A spool with `n` events of about `pad` bytes in segments of
    /// `segment_bytes`; returns the sealer (to continue the chain) and the
    /// sealed events.
    fn filled(
        dir: &Path,
        segment_bytes: u64,
        n: usize,
        pad: usize,
    ) -> (Spool, Sealer, Vec<Sealed>) {
        let (mut spool, rec) = Spool::open(dir, segment_bytes).unwrap();
        assert_eq!(rec.head, Head::EMPTY);
        let mut sealer = Sealer::resume("n1", Head::EMPTY);
        let events = seal(&mut sealer, n, pad);
        for batch in events.chunks(7) {
            spool.append_batch(batch).unwrap();
        }
        (spool, sealer, events)
    }

    fn frame_len(e: &Sealed) -> u64 {
        FRAME_HEADER_LEN + e.bytes.len() as u64
    }

    #[test]
    fn frames_round_trip_through_files_and_read_after() {
        let tmp = TempDir::new("spool-rt").unwrap();
        let dir = tmp.path().join("spool");
        let (spool, sealer, events) = filled(&dir, 1 << 20, 20, 10);
        let mode = fs::metadata(&dir).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o700);
        let got = spool.read_after(0, 100).unwrap();
        let want: Vec<Vec<u8>> = events.iter().map(|e| e.bytes.clone()).collect();
        assert_eq!(got, want);
        assert_eq!(spool.next_seq(), 21);
        assert_eq!(sealer.head().seq, 20);
        let paths = spool.segment_paths();
        assert_eq!(paths.len(), 1);
        assert!(paths[0].ends_with("seg-00000000000000000001.pcs"));
        let read = read_segment_file(&paths[0]).unwrap();
        assert_eq!(read.bad, None);
        assert_eq!(read.frames, want);
        let raw = fs::read(&paths[0]).unwrap();
        assert_eq!(&raw[..8], b"PCSPOOL1");
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, events[0].bytes.len());
        assert_eq!(
            u32::from_le_bytes(raw[12..16].try_into().unwrap()),
            frame_crc(&events[0].bytes)
        );
        assert_eq!(used(&spool), raw.len() as u64);
    }

    fn used(spool: &Spool) -> u64 {
        let u = spool.used_bytes();
        assert_eq!(u, file_sizes(spool), "used_bytes matches the files");
        u
    }

    #[test]
    fn appends_must_continue_the_sequence() {
        let tmp = TempDir::new("spool-seq").unwrap();
        let (mut spool, _, events) = filled(tmp.path(), 1 << 20, 3, 10);
        let err = spool.append_batch(&events[1..2]).unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::Sequence {
                    expected: 4,
                    got: 2
                }
            ),
            "{err}"
        );
        // A second writer on the same directory is refused.
        assert!(matches!(
            Spool::open(tmp.path(), 1 << 20).unwrap_err(),
            SpoolError::InUse { .. }
        ));
    }

    #[test]
    fn segments_roll_over_at_segment_bytes() {
        let tmp = TempDir::new("spool-roll").unwrap();
        let (spool, _, events) = filled(tmp.path(), 4096, 100, 150);
        let paths = spool.segment_paths();
        assert!(paths.len() >= 4, "{} segments", paths.len());
        let mut names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        let listed = names.clone();
        names.sort();
        assert_eq!(names, listed, "lexical order is seq order");
        let mut next = 1u64;
        for p in &paths {
            let size = fs::metadata(p).unwrap().len();
            assert!(size <= 4096, "{} is {size} bytes", p.display());
            let read = read_segment_file(p).unwrap();
            assert_eq!(read.bad, None);
            let s = seqs(&read.frames);
            assert_eq!(
                p.file_name().unwrap().to_str().unwrap(),
                format!("seg-{:020}.pcs", s[0])
            );
            assert_eq!(s, (next..next + s.len() as u64).collect::<Vec<_>>());
            next += s.len() as u64;
            // Full segments could not take the next frame.
            if p != paths.last().unwrap() {
                assert!(size + frame_len(&events[next as usize - 1]) > 4096);
            }
        }
        assert_eq!(next, 101);
        used(&spool);
    }

    #[test]
    fn reopen_resumes_the_head_exactly() {
        let tmp = TempDir::new("spool-reopen").unwrap();
        let (spool, mut sealer, events) = filled(tmp.path(), 4096, 60, 100);
        drop(spool);
        let (mut spool, rec) = Spool::open(tmp.path(), 4096).unwrap();
        assert_eq!(rec.head, sealer.head());
        assert_eq!(rec.last_held_seq, 60);
        assert_eq!(rec.events, 60);
        assert_eq!(
            (rec.torn.clone(), rec.corrupt.len(), rec.lost.len()),
            (None, 0, 0)
        );
        // The chain continues where it stopped.
        let more = seal(&mut Sealer::resume("n1", rec.head), 5, 100);
        assert_eq!(more[0].seq, 61);
        assert_eq!(more[0].seq, seal(&mut sealer, 1, 100)[0].seq);
        spool.append_batch(&more).unwrap();
        let all = spool.read_after(0, 1000).unwrap();
        assert_eq!(seqs(&all), (1..=65).collect::<Vec<_>>());
        assert_eq!(all[59], events[59].bytes);
        // Every event links to the one before it.
        for w in all.windows(2) {
            use prost::Message as _;
            let ev = portcullis_proto::v1::Event::decode(w[1].as_slice()).unwrap();
            assert_eq!(ev.prev_hash, chain::event_hash(&w[0]).to_vec());
        }
    }

    /// Reopens after `damage` to the last segment; returns the recovery, the
    /// events still held and the original events.
    fn torn(
        tmp: &TempDir,
        damage: impl FnOnce(&Path, &[Sealed]),
    ) -> (Recovery, Vec<Vec<u8>>, Vec<Sealed>) {
        let (spool, _, events) = filled(tmp.path(), 4096, 40, 100);
        let last = spool.segment_paths().pop().unwrap();
        drop(spool);
        damage(&last, &events);
        let (spool, rec) = Spool::open(tmp.path(), 4096).unwrap();
        let held = spool.read_after(0, 1000).unwrap();
        used(&spool);
        (rec, held, events)
    }

    #[test]
    fn torn_tail_cut_mid_frame_is_truncated() {
        let tmp = TempDir::new("spool-torn-cut").unwrap();
        let (rec, held, events) = torn(&tmp, |p, _| {
            let f = OpenOptions::new().write(true).open(p).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len - 5).unwrap();
        });
        let t = rec.torn.clone().expect("torn tail reported");
        assert_eq!(t.bytes_cut, frame_len(&events[39]) - 5);
        assert!(
            matches!(t.reason, FrameError::TruncatedPayload { .. }),
            "{}",
            t.reason
        );
        assert_eq!(
            rec.head,
            Head {
                seq: 39,
                hash: events[38].hash
            }
        );
        assert_eq!(
            held,
            events[..39]
                .iter()
                .map(|e| e.bytes.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(fs::metadata(&t.path).unwrap().len(), t.offset);
        assert!(rec.lost.is_empty() && rec.corrupt.is_empty());
    }

    #[test]
    fn torn_tail_of_garbage_is_truncated() {
        let tmp = TempDir::new("spool-torn-junk").unwrap();
        let (rec, held, events) = torn(&tmp, |p, _| {
            use std::io::Write as _;
            let mut f = OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(&[0xA5; 13]).unwrap();
        });
        let t = rec.torn.clone().expect("torn tail reported");
        assert_eq!(t.bytes_cut, 13);
        assert_eq!(
            rec.head,
            Head {
                seq: 40,
                hash: events[39].hash
            }
        );
        assert_eq!(held.len(), 40);
    }

    #[test]
    fn torn_tail_with_a_bad_crc_is_truncated() {
        let tmp = TempDir::new("spool-torn-crc").unwrap();
        let (rec, held, events) = torn(&tmp, |p, events| {
            let mut raw = fs::read(p).unwrap();
            let at = raw.len() - frame_len(&events[39]) as usize + 4; // the CRC
            raw[at] ^= 0xFF;
            fs::write(p, raw).unwrap();
        });
        let t = rec.torn.clone().expect("torn tail reported");
        assert_eq!(t.bytes_cut, frame_len(&events[39]));
        assert!(
            matches!(t.reason, FrameError::CrcMismatch { .. }),
            "{}",
            t.reason
        );
        assert_eq!(
            rec.head,
            Head {
                seq: 39,
                hash: events[38].hash
            }
        );
        assert_eq!(seqs(&held), (1..=39).collect::<Vec<_>>());
    }

    #[test]
    fn corrupt_middle_segment_is_moved_aside_and_reported() {
        let tmp = TempDir::new("spool-corrupt").unwrap();
        let (spool, _, events) = filled(tmp.path(), 4096, 100, 100);
        let paths = spool.segment_paths();
        assert!(paths.len() >= 3);
        let mid = paths[1].clone();
        let mid_seqs = seqs(&read_segment_file(&mid).unwrap().frames);
        drop(spool);
        let mut raw = fs::read(&mid).unwrap();
        raw[HEADER_LEN as usize + 8 + 20] ^= 0x01; // a payload byte of its first frame
        fs::write(&mid, &raw).unwrap();

        let (spool, rec) = Spool::open(tmp.path(), 4096).unwrap();
        assert_eq!(rec.corrupt.len(), 1);
        let c = &rec.corrupt[0];
        assert_eq!(c.moved_to, mid.with_extension("pcs.corrupt"));
        assert_eq!(fs::read(&c.moved_to).unwrap(), raw, "moved aside intact");
        assert!(!mid.exists());
        assert_eq!(c.first_seq, mid_seqs[0]);
        assert!(matches!(c.bad.reason, FrameError::CrcMismatch { .. }));
        assert_eq!(rec.lost, vec![(mid_seqs[0], *mid_seqs.last().unwrap())]);
        assert_eq!(rec.torn, None);
        // The head is untouched; the other segments still read.
        assert_eq!(
            rec.head,
            Head {
                seq: 100,
                hash: events[99].hash
            }
        );
        let held = seqs(&spool.read_after(0, 1000).unwrap());
        let want: Vec<u64> = (1..=100).filter(|s| !mid_seqs.contains(s)).collect();
        assert_eq!(held, want);
        used(&spool);
    }

    #[test]
    fn a_segment_overlapping_the_previous_is_moved_aside() {
        let tmp = TempDir::new("spool-overlap").unwrap();
        let (spool, _, events) = filled(tmp.path(), 4096, 60, 100);
        let paths = spool.segment_paths();
        drop(spool);
        // A stray copy of the first segment under a later name.
        let stray = tmp.path().join(segment_name(2));
        fs::copy(&paths[0], &stray).unwrap();
        let (spool, rec) = Spool::open(tmp.path(), 4096).unwrap();
        assert_eq!(rec.corrupt.len(), 1);
        assert_eq!(rec.corrupt[0].moved_to, stray.with_extension("pcs.corrupt"));
        assert_eq!(
            rec.head,
            Head {
                seq: 60,
                hash: events[59].hash
            }
        );
        assert_eq!(
            seqs(&spool.read_after(0, 1000).unwrap()),
            (1..=60).collect::<Vec<_>>()
        );
    }

    #[test]
    fn trim_deletes_only_fully_acknowledged_inactive_segments() {
        let tmp = TempDir::new("spool-trim").unwrap();
        let (mut spool, _, _) = filled(tmp.path(), 4096, 100, 100);
        let paths = spool.segment_paths();
        let first_last = *seqs(&read_segment_file(&paths[0]).unwrap().frames)
            .last()
            .unwrap();
        let before = used(&spool);
        assert_eq!(spool.trim_through(first_last - 1).unwrap(), 0);
        assert_eq!(spool.segment_paths(), paths);
        let freed = spool.trim_through(first_last).unwrap();
        assert_eq!(freed, before - used(&spool));
        assert!(!paths[0].exists() && paths[1].exists());
        assert_eq!(spool.first_seq(), Some(first_last + 1));
        // Everything acknowledged: all but the active segment go.
        spool.trim_through(u64::MAX).unwrap();
        assert_eq!(spool.segment_paths(), vec![paths.last().unwrap().clone()]);
        assert_eq!(spool.last_seq(), Some(100));
        used(&spool);
        // Reading from below the oldest held starts at the oldest held.
        let held = seqs(&spool.read_after(0, 1000).unwrap());
        assert_eq!(*held.last().unwrap(), 100);
        assert_eq!(held[0], spool.first_seq().unwrap());
    }

    #[test]
    fn drop_oldest_never_drops_the_active_segment() {
        let tmp = TempDir::new("spool-drop").unwrap();
        let (mut spool, _, _) = filled(tmp.path(), 4096, 100, 100);
        let paths = spool.segment_paths();
        let mut next = 1;
        for p in &paths[..paths.len() - 1] {
            let s = seqs(&read_segment_file(p).unwrap().frames);
            assert_eq!(
                spool.drop_oldest().unwrap(),
                Some((next, *s.last().unwrap()))
            );
            assert!(!p.exists());
            next = s.last().unwrap() + 1;
        }
        assert_eq!(spool.drop_oldest().unwrap(), None);
        assert!(paths.last().unwrap().exists());
        assert_eq!(spool.first_seq(), Some(next));
        used(&spool);
    }

    #[test]
    fn read_after_crosses_segments_and_honours_the_limit() {
        let tmp = TempDir::new("spool-read").unwrap();
        let (spool, _, events) = filled(tmp.path(), 4096, 300, 100);
        assert!(spool.segment_count() > 5);
        for after in [0u64, 1, 17, 63, 64, 65, 128, 150, 250, 293, 299, 300, 400] {
            for max in [1usize, 7, 100, 1000] {
                let got = spool.read_after(after, max).unwrap();
                let want: Vec<Vec<u8>> = events
                    .iter()
                    .filter(|e| e.seq > after)
                    .take(max)
                    .map(|e| e.bytes.clone())
                    .collect();
                assert_eq!(got, want, "after {after} max {max}");
            }
        }
    }

    #[test]
    fn read_segment_file_reports_a_torn_tail_without_touching_the_file() {
        let tmp = TempDir::new("spool-readseg").unwrap();
        let (spool, _, events) = filled(tmp.path(), 1 << 20, 10, 50);
        let p = spool.segment_paths().pop().unwrap();
        drop(spool);
        let mut raw = fs::read(&p).unwrap();
        let cut_at = raw.len() - 3;
        raw.truncate(cut_at);
        fs::write(&p, &raw).unwrap();
        let read = read_segment_file(&p).unwrap();
        assert_eq!(read.frames.len(), 9);
        assert_eq!(read.frames[8], events[8].bytes);
        let bad = read.bad.expect("torn tail");
        assert_eq!(bad.offset, cut_at as u64 - (frame_len(&events[9]) - 3));
        assert!(matches!(bad.reason, FrameError::TruncatedPayload { .. }));
        assert_eq!(fs::read(&p).unwrap(), raw, "file unchanged");
        // Not a spool file at all.
        fs::write(&p, b"hello world").unwrap();
        assert_eq!(
            read_segment_file(&p).unwrap().bad.unwrap().reason,
            FrameError::BadMagic
        );
    }

    #[test]
    fn disk_full_fails_cleanly_and_appends_resume_after_space_returns() {
        let disk = TmpfsMount::new(64 << 10).expect("mount a tmpfs (tests run as root)");
        let mnt = disk.path();
        let dir = mnt.join("spool");
        let (mut spool, _) = Spool::open(&dir, 16 << 10).unwrap();
        let mut sealer = Sealer::resume("n1", Head::EMPTY);
        let mut written: Vec<Sealed> = Vec::new();
        let failed = loop {
            let batch = seal(&mut sealer, 5, 900);
            match spool.append_batch(&batch) {
                Ok(()) => written.extend(batch),
                Err(e) => break (e, batch),
            }
            assert!(written.len() < 10_000, "tmpfs never filled");
        };
        let (err, batch) = failed;
        assert!(err.is_disk_full(), "{err}");
        assert!(
            err.to_string().contains(&mnt.display().to_string()),
            "{err}"
        );
        // Nothing of the failed batch remains; the files hold whole frames.
        assert_eq!(spool.next_seq(), written.len() as u64 + 1);
        used(&spool);
        for p in spool.segment_paths() {
            assert_eq!(read_segment_file(&p).unwrap().bad, None, "{}", p.display());
        }
        assert_eq!(
            spool.read_after(0, 100_000).unwrap(),
            written.iter().map(|e| e.bytes.clone()).collect::<Vec<_>>()
        );
        // Free space (the collector acknowledged the first segments), then
        // the very same batch goes in, and later ones follow.
        let first_seg_last = seqs(&read_segment_file(&spool.segment_paths()[0]).unwrap().frames)
            .pop()
            .unwrap();
        assert!(spool.trim_through(first_seg_last).unwrap() > 0);
        spool.append_batch(&batch).unwrap();
        let more = seal(&mut sealer, 3, 900);
        spool.append_batch(&more).unwrap();
        let held = seqs(&spool.read_after(0, 100_000).unwrap());
        assert_eq!(
            held,
            (first_seg_last + 1..=sealer.head().seq).collect::<Vec<_>>()
        );
        drop(spool);
        let (_spool, rec) = Spool::open(&dir, 16 << 10).unwrap();
        assert_eq!((rec.torn, rec.corrupt.len()), (None, 0));
        assert_eq!(rec.head, sealer.head());
    }
}
