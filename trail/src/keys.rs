//! Node keys: the operator's pinned keys file and the trust-on-first-use
//! store.
//!
//! Keys file (`--keys FILE`): one node per line, `NODE_ID KEY`, where KEY is
//! the node's raw 32-byte Ed25519 public key in hex (64 digits) or base64
//! (standard or URL-safe, padded or not). `#` starts a comment; blank lines
//! are ignored.
//!
//! Key record ([`NodeKeys`]): `DIR/NODE_ID.pub` holds the key the collector
//! trusts for the node and how it came to (pinned, enrolled, first use).

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use base64::Engine as _;

use crate::{hex::hex, verify::valid_node_id};

/// Why a keys file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("keys file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("keys file {path}:{line}: {reason}")]
    Syntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Parses a 32-byte key given in hex or base64.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    let bytes = if let Some(key) = crate::hex::parse_hex::<32>(t) {
        key.to_vec()
    } else {
        use base64::engine::general_purpose as gp;
        let unpadded = t.trim_end_matches('=');
        gp::STANDARD_NO_PAD
            .decode(unpadded)
            .or_else(|_| gp::URL_SAFE_NO_PAD.decode(unpadded))
            .map_err(|_| format!("{t:?} is neither 64 hex digits nor base64"))?
    };
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("key is {} bytes; an Ed25519 key is 32", bytes.len()))
}

/// Reads a keys file.
pub fn load_keys_file(path: &Path) -> Result<HashMap<String, [u8; 32]>, KeysError> {
    let text = fs::read_to_string(path).map_err(|source| KeysError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut out = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: String| KeysError::Syntax {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let mut parts = line.split_whitespace();
        let (Some(node), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err("expected `NODE_ID KEY`".into()));
        };
        if !valid_node_id(node) {
            return Err(err(format!(
                "{node:?} is not a valid node id (1-64 of A-Z a-z 0-9 . _ -)"
            )));
        }
        let key = parse_key(key).map_err(err)?;
        if out.insert(node.to_owned(), key).is_some() {
            return Err(err(format!("node {node:?} is listed twice")));
        }
    }
    Ok(out)
}

/// How the collector came to trust a node's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// Given by the operator at start (`--keys`).
    Pinned,
    /// Enrolled by an operator (`portcullis collector enroll`).
    Enrolled,
    /// Trusted on first use (`--trust tofu` only).
    Tofu,
}

impl Provenance {
    pub fn as_str(self) -> &'static str {
        match self {
            Provenance::Pinned => "pinned",
            Provenance::Enrolled => "enrolled",
            Provenance::Tofu => "tofu",
        }
    }

    fn parse(word: &str) -> Option<Provenance> {
        match word {
            "pinned" => Some(Provenance::Pinned),
            "enrolled" => Some(Provenance::Enrolled),
            "tofu" => Some(Provenance::Tofu),
            _ => None,
        }
    }
}

/// The collector's record of node keys: `DIR/NODE.pub` holds `HEXKEY
/// PROVENANCE` (a key file of an older collector, without the word, counts
/// as first use). The directory is 0700 and each file 0600, like the
/// agent's spool. It is what `audit verify` trusts when given the
/// collector's output directory.
#[derive(Debug)]
pub struct NodeKeys {
    dir: Option<PathBuf>,
    keys: HashMap<String, ([u8; 32], Provenance)>,
}

/// Creates `dir` (and parents) and makes it 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Creates (or truncates) `path` with mode 0600.
pub fn private_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Reads one `NODE.pub` record: the key and how it came to be trusted.
pub fn read_key_file(path: &Path) -> io::Result<([u8; 32], Provenance)> {
    let text = fs::read_to_string(path)?;
    let mut words = text.split_whitespace();
    let bad = |e: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    };
    let key = parse_key(words.next().unwrap_or("")).map_err(bad)?;
    let prov = match words.next() {
        None => Provenance::Tofu,
        Some(w) => Provenance::parse(w).ok_or_else(|| bad(format!("unknown provenance {w:?}")))?,
    };
    Ok((key, prov))
}

impl NodeKeys {
    /// Loads every `NODE.pub` in `dir` (created 0700 if missing); `None`
    /// keeps keys in memory only.
    pub fn open(dir: Option<&Path>) -> io::Result<NodeKeys> {
        let mut keys = HashMap::new();
        if let Some(dir) = dir {
            private_dir(dir)?;
            for entry in fs::read_dir(dir)? {
                let path = entry?.path();
                let Some(node) = node_of(&path) else { continue };
                keys.insert(node, read_key_file(&path)?);
            }
        }
        Ok(NodeKeys {
            dir: dir.map(Path::to_owned),
            keys,
        })
    }

    /// The key and provenance the collector holds for `node`, re-read from
    /// the directory (an operator may have enrolled it since the start).
    pub fn get(&mut self, node: &str) -> Option<([u8; 32], Provenance)> {
        if let Some(dir) = &self.dir {
            match read_key_file(&dir.join(format!("{node}.pub"))) {
                Ok(k) => {
                    self.keys.insert(node.to_owned(), k);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.keys.remove(node);
                }
                Err(e) => tracing::warn!(node, error = %e, "unreadable node key file"),
            }
        }
        self.keys.get(node).copied()
    }

    /// Every key held.
    pub fn all(&self) -> &HashMap<String, ([u8; 32], Provenance)> {
        &self.keys
    }

    /// Records `key` for `node` (durably, before returning), replacing what
    /// was there.
    pub fn record(&mut self, node: &str, key: [u8; 32], prov: Provenance) -> io::Result<()> {
        if let Some(dir) = &self.dir {
            write_key_file(dir, node, key, prov)?;
        }
        self.keys.insert(node.to_owned(), (key, prov));
        Ok(())
    }
}

fn node_of(path: &Path) -> Option<String> {
    let node = path.file_name()?.to_str()?.strip_suffix(".pub")?;
    valid_node_id(node).then(|| node.to_owned())
}

/// Writes `DIR/NODE.pub` durably (a synced temporary file renamed into
/// place, then the directory synced).
pub fn write_key_file(dir: &Path, node: &str, key: [u8; 32], prov: Provenance) -> io::Result<()> {
    let path = dir.join(format!("{node}.pub"));
    let tmp = dir.join(format!(".{node}.pub.tmp"));
    {
        let mut f = private_file(&tmp)?;
        writeln!(f, "{} {}", hex(&key), prov.as_str())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_base64_keys_and_names_bad_lines() {
        let key = [7u8; 32];
        let hex = hex(&key);
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key);
        for t in [&hex, &b64, &url] {
            assert_eq!(parse_key(t).unwrap(), key);
        }
        assert!(parse_key("abcd").is_err());
        let dir = std::env::temp_dir().join(format!("portcullis-keys-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys");
        fs::write(&f, format!("# pinned\nn1 {hex}\n\nn2 {b64} # comment\n")).unwrap();
        let m = load_keys_file(&f).unwrap();
        assert_eq!(m.len(), 2);
        fs::write(&f, format!("n1 {hex}\nbad/id {hex}\n")).unwrap();
        let e = load_keys_file(&f).unwrap_err().to_string();
        assert!(e.contains(":2:"), "{e}");
        let kd = dir.join("record");
        let mut s = NodeKeys::open(Some(&kd)).unwrap();
        s.record("n1", key, Provenance::Tofu).unwrap();
        let mut s = NodeKeys::open(Some(&kd)).unwrap();
        assert_eq!(s.get("n1"), Some((key, Provenance::Tofu)));
        // A key file of an older collector (no provenance) is first use.
        fs::write(kd.join("old.pub"), format!("{hex}\n")).unwrap();
        assert_eq!(s.get("old"), Some((key, Provenance::Tofu)));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&kd), 0o700);
        assert_eq!(mode(&kd.join("n1.pub")), 0o600);
        let _ = fs::remove_dir_all(&dir);
    }
}
