//! A compact JSON writer for OCSF records: the records must be byte for
//! byte what `serde_json` would write for the same value (so `audit verify`
//! can recompute them), without building a `Value` per event.

use base64::Engine as _;

/// Bytes that need escaping in a JSON string (0: none; else the letter of
/// a short escape, or `u` for `\u00XX`), as serde_json escapes them.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// A compact JSON writer appending to a byte buffer: `k(key)` then one
/// value; objects and arrays nest with `obj`/`end` and `arr`/`end_arr`.
/// Keys are trusted literals (written unescaped).
pub(super) struct Json<'a> {
    out: &'a mut Vec<u8>,
    /// A value was just completed at this level: the next needs a comma.
    comma: bool,
}

impl<'a> Json<'a> {
    pub(super) fn new(out: &'a mut Vec<u8>) -> Json<'a> {
        Json { out, comma: false }
    }

    fn sep(&mut self) {
        if self.comma {
            self.out.push(b',');
        }
    }

    pub(super) fn k(&mut self, key: &str) -> &mut Self {
        self.sep();
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.comma = false;
        self
    }

    pub(super) fn obj(&mut self) {
        self.sep();
        self.out.push(b'{');
        self.comma = false;
    }

    pub(super) fn end(&mut self) {
        self.out.push(b'}');
        self.comma = true;
    }

    pub(super) fn arr(&mut self) {
        self.sep();
        self.out.push(b'[');
        self.comma = false;
    }

    pub(super) fn end_arr(&mut self) {
        self.out.push(b']');
        self.comma = true;
    }

    pub(super) fn null(&mut self) {
        self.sep();
        self.out.extend_from_slice(b"null");
        self.comma = true;
    }

    pub(super) fn b(&mut self, v: bool) {
        self.sep();
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        self.comma = true;
    }

    fn digits(&mut self, mut v: u64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.out.extend_from_slice(&tmp[i..]);
    }

    pub(super) fn u(&mut self, v: u64) {
        self.sep();
        self.digits(v);
        self.comma = true;
    }

    pub(super) fn i(&mut self, v: i64) {
        self.sep();
        if v < 0 {
            self.out.push(b'-');
        }
        self.digits(v.unsigned_abs());
        self.comma = true;
    }

    /// The inside of a string (no quotes), escaped.
    fn escaped(&mut self, s: &str) {
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &c) in bytes.iter().enumerate() {
            let e = ESCAPE[c as usize];
            if e == 0 {
                continue;
            }
            self.out.extend_from_slice(&bytes[start..i]);
            if e == b'u' {
                self.out.extend_from_slice(b"\\u00");
                self.out.push(HEX_DIGITS[(c >> 4) as usize]);
                self.out.push(HEX_DIGITS[(c & 0xf) as usize]);
            } else {
                self.out.extend_from_slice(&[b'\\', e]);
            }
            start = i + 1;
        }
        self.out.extend_from_slice(&bytes[start..]);
    }

    pub(super) fn s(&mut self, s: &str) {
        self.s_parts(&[s]);
    }

    /// One string made of `parts`.
    pub(super) fn s_parts(&mut self, parts: &[&str]) {
        self.sep();
        self.out.push(b'"');
        for p in parts {
            self.escaped(p);
        }
        self.out.push(b'"');
        self.comma = true;
    }

    /// `"NODE/SEQ"`.
    pub(super) fn s_node_seq(&mut self, node: &str, seq: u64) {
        self.sep();
        self.out.push(b'"');
        self.escaped(node);
        self.out.push(b'/');
        self.digits(seq);
        self.out.push(b'"');
        self.comma = true;
    }

    pub(super) fn strs(&mut self, v: &[String]) {
        self.arr();
        for s in v {
            self.s(s);
        }
        self.end_arr();
    }

    /// Lower-case hex, as a string.
    pub(super) fn hex(&mut self, bytes: &[u8]) {
        self.sep();
        self.out.reserve(bytes.len() * 2 + 2);
        self.out.push(b'"');
        for &b in bytes {
            self.out.push(HEX_DIGITS[(b >> 4) as usize]);
            self.out.push(HEX_DIGITS[(b & 0xf) as usize]);
        }
        self.out.push(b'"');
        self.comma = true;
    }

    /// Standard base64 (padded), as a string.
    pub(super) fn b64(&mut self, bytes: &[u8]) {
        self.sep();
        self.out.push(b'"');
        let at = self.out.len();
        let n = base64::encoded_len(bytes.len(), true).expect("a batch event is far below usize");
        self.out.resize(at + n, 0);
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(bytes, &mut self.out[at..])
            .expect("sized by encoded_len");
        self.out.truncate(at + written);
        self.out.push(b'"');
        self.comma = true;
    }
}
