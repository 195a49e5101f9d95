//! The spool segment file format (version 1), shared by the agent that
//! writes spools and by `audit verify`, which reads them.
//!
//! A spool is a directory (mode 0700) of segment files named
//! `seg-{first_seq:020}.pcs`, where `first_seq` is the sequence number of
//! the segment's first event, so lexical order is sequence order. Each
//! segment file is:
//!
//! ```text
//! magic   8 bytes  "PCSPOOL1"
//! frame*  u32 LE   payload length (1 ..= 1 MiB)
//!         u32 LE   CRC-32 (IEEE 802.3, the zlib/`crc32fast` polynomial) of the payload
//!         payload  the event's canonical encoding (an `Event`, see audit.proto)
//! ```
//!
//! Within a segment, frames hold consecutive sequence numbers starting at the
//! one in the file name. How the agent writes, recovers and trims segments
//! is in `agent/src/audit/spool.rs`.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;

/// First 8 bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"PCSPOOL1";
/// Bytes of the segment header (the magic).
pub const HEADER_LEN: u64 = MAGIC.len() as u64;
/// Bytes of a frame header: length and CRC.
pub const FRAME_HEADER_LEN: u64 = 8;
/// Largest payload a frame may carry. Events are far smaller; anything
/// larger in a file is damage, not data.
pub const MAX_FRAME: u32 = 1 << 20;

/// Why a segment file stops decoding at some offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The file is shorter than the 8-byte magic.
    ShortHeader,
    /// The first 8 bytes are not `PCSPOOL1`.
    BadMagic,
    /// Fewer than 8 bytes left for a frame header.
    TruncatedHeader { available: u64 },
    /// A length of 0 or above `MAX_FRAME`.
    BadLength { len: u32 },
    /// The payload runs past the end of the file.
    TruncatedPayload { len: u32, available: u64 },
    /// The payload's CRC does not match the frame header.
    CrcMismatch { expected: u32, actual: u32 },
    /// The payload has no readable sequence number.
    Undecodable,
    /// The frame's sequence number is not the one expected here.
    SeqOutOfOrder { expected: u64, got: u64 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ShortHeader => write!(f, "file shorter than the segment header"),
            FrameError::BadMagic => write!(f, "not a spool segment (bad magic)"),
            FrameError::TruncatedHeader { available } => {
                write!(f, "truncated frame header ({available} of 8 bytes)")
            }
            FrameError::BadLength { len } => {
                write!(f, "frame length {len} out of range 1..={MAX_FRAME}")
            }
            FrameError::TruncatedPayload { len, available } => {
                write!(f, "truncated frame ({available} of {len} payload bytes)")
            }
            FrameError::CrcMismatch { expected, actual } => {
                write!(
                    f,
                    "CRC mismatch (frame says {expected:08x}, payload has {actual:08x})"
                )
            }
            FrameError::Undecodable => write!(f, "payload has no event sequence number"),
            FrameError::SeqOutOfOrder { expected, got } => {
                write!(f, "event seq {got} where {expected} was expected")
            }
        }
    }
}

/// Where and why a segment file stops decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTail {
    /// Byte offset of the first byte not part of a whole, valid frame.
    pub offset: u64,
    pub reason: FrameError,
}

/// One segment file decoded without modifying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRead {
    /// The payloads (canonical event bytes) of the valid frames, in order.
    pub frames: Vec<Vec<u8>>,
    /// File length in bytes.
    pub len: u64,
    /// `None` when the whole file decodes.
    pub bad: Option<BadTail>,
}

/// Decodes one segment file (header and frames, lengths and CRCs) without
/// modifying it. Sequence numbers are not checked here: a verifier checks
/// the chain itself.
pub fn read_segment_file(path: impl AsRef<Path>) -> io::Result<SegmentRead> {
    let data = fs::read(path.as_ref())?;
    let mut frames = Vec::new();
    let bad = scan(&data, |_, payload| {
        frames.push(payload.to_vec());
        Ok(())
    });
    Ok(SegmentRead {
        frames,
        len: data.len() as u64,
        bad,
    })
}

/// CRC of a payload as stored in frame headers.
pub fn frame_crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// Walks the frames of a whole segment file, calling `each(offset, payload)`
/// for every frame whose length and CRC are good; stops at the first bad one
/// (or when `each` refuses a frame) and says where and why.
pub fn scan(
    data: &[u8],
    mut each: impl FnMut(u64, &[u8]) -> Result<(), FrameError>,
) -> Option<BadTail> {
    if data.len() < MAGIC.len() {
        return Some(BadTail {
            offset: 0,
            reason: FrameError::ShortHeader,
        });
    }
    if &data[..MAGIC.len()] != MAGIC {
        return Some(BadTail {
            offset: 0,
            reason: FrameError::BadMagic,
        });
    }
    let mut off = MAGIC.len();
    while off < data.len() {
        match frame_at(data, off) {
            Ok(payload) => {
                if let Err(reason) = each(off as u64, payload) {
                    return Some(BadTail {
                        offset: off as u64,
                        reason,
                    });
                }
                off += FRAME_HEADER_LEN as usize + payload.len();
            }
            Err(reason) => {
                return Some(BadTail {
                    offset: off as u64,
                    reason,
                });
            }
        }
    }
    None
}

/// The payload of the frame starting at `off` in `data`.
pub fn frame_at(data: &[u8], off: usize) -> Result<&[u8], FrameError> {
    let rest = &data[off..];
    if rest.len() < FRAME_HEADER_LEN as usize {
        return Err(FrameError::TruncatedHeader {
            available: rest.len() as u64,
        });
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_FRAME {
        return Err(FrameError::BadLength { len });
    }
    let body = &rest[FRAME_HEADER_LEN as usize..];
    if body.len() < len as usize {
        return Err(FrameError::TruncatedPayload {
            len,
            available: body.len() as u64,
        });
    }
    let payload = &body[..len as usize];
    let actual = frame_crc(payload);
    if actual != crc {
        return Err(FrameError::CrcMismatch {
            expected: crc,
            actual,
        });
    }
    Ok(payload)
}

/// The `seq` (field 1, varint) of an encoded `Event`, without decoding the
/// rest. `None` when the bytes are not a protobuf message with a non-zero
/// seq.
pub fn peek_seq(mut b: &[u8]) -> Option<u64> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(&mut b)?;
                if field == 1 {
                    return (v != 0).then_some(v);
                }
            }
            1 => b = b.get(8..)?,
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                b = b.get(n..)?;
            }
            5 => b = b.get(4..)?,
            _ => return None,
        }
    }
    None
}

/// The file name of the segment whose first event is `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.pcs")
}

/// The first seq a segment file name declares; `None` for other names.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".pcs")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&s| s > 0)
}

/// Appends one frame (header and payload) for `payload` to `buf`.
pub fn push_frame(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&frame_crc(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}
