//! Node keys: the operator's pinned keys file and the trust-on-first-use
//! store.
//!
//! Keys file (`--keys FILE`): one node per line, `NODE_ID KEY`, where KEY is
//! the node's raw 32-byte Ed25519 public key in hex (64 digits) or base64
//! (standard or URL-safe, padded or not). `#` starts a comment; blank lines
//! are ignored.
//!
//! TOFU store: `DIR/NODE_ID.pub` holds the hex key first seen for the node,
//! written once (create-new, fsynced), so trust survives restarts.

use std::{
    collections::HashMap,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use base64::Engine as _;

use crate::audit::verify::valid_node_id;

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
    let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| e.to_string())?
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

/// Keys first seen per node, persisted in a directory.
#[derive(Debug)]
pub struct TofuStore {
    dir: Option<PathBuf>,
    keys: HashMap<String, [u8; 32]>,
}

impl TofuStore {
    /// Loads every `NODE.pub` in `dir` (created if missing); `None` keeps
    /// keys in memory only.
    pub fn open(dir: Option<&Path>) -> io::Result<TofuStore> {
        let mut keys = HashMap::new();
        if let Some(dir) = dir {
            fs::create_dir_all(dir)?;
            for entry in fs::read_dir(dir)? {
                let path = entry?.path();
                let Some(node) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".pub"))
                else {
                    continue;
                };
                if !valid_node_id(node) {
                    continue;
                }
                let text = fs::read_to_string(&path)?;
                let key = parse_key(&text).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                keys.insert(node.to_owned(), key);
            }
        }
        Ok(TofuStore {
            dir: dir.map(Path::to_owned),
            keys,
        })
    }

    pub fn get(&self, node: &str) -> Option<&[u8; 32]> {
        self.keys.get(node)
    }

    /// Records `key` as `node`'s key (durably, before returning).
    pub fn remember(&mut self, node: &str, key: [u8; 32]) -> io::Result<()> {
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{node}.pub"));
            let tmp = dir.join(format!(".{node}.pub.tmp"));
            {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(crate::audit::chain::hex(&key).as_bytes())?;
                f.write_all(b"\n")?;
                f.sync_all()?;
            }
            // link(2) never replaces: a key already there stays.
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            linked?;
            fs::File::open(dir)?.sync_all()?;
        }
        self.keys.insert(node.to_owned(), key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_base64_keys_and_names_bad_lines() {
        let key = [7u8; 32];
        let hex = crate::audit::chain::hex(&key);
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
        let mut s = TofuStore::open(Some(&dir.join("tofu"))).unwrap();
        s.remember("n1", key).unwrap();
        let s = TofuStore::open(Some(&dir.join("tofu"))).unwrap();
        assert_eq!(s.get("n1"), Some(&key));
        let _ = fs::remove_dir_all(&dir);
    }
}
