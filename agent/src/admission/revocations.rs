//! Revocations as a file: `jti:ID` revokes one token, `sub:SUBJECT` every
//! token of a subject in every tenant (RFC 7519 §4.1.7 `jti`, §4.1.2
//! `sub`), `id:NAME` every token of one identity, a subject in one tenant,
//! named as `agent status` shows it (`acme/alice`). The agent
//! re-reads it when it changes; `portcullis agent revoke --jti/--subject`
//! appends to it, so revocation works from another process and survives
//! restarts. Blank lines and `#` comments are ignored.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::identity::IdentityName;

/// Longest accepted line: ids and subjects are short; a longer line is a
/// mistake, not a revocation.
const MAX_LINE: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    pub jtis: BTreeSet<String>,
    pub subjects: BTreeSet<String>,
    pub identities: BTreeSet<IdentityName>,
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}:{line}: {reason}; write `jti:ID`, `sub:SUBJECT` or `id:TENANT/SUBJECT`, one per line"
    )]
    Syntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// One entry, as `agent revoke` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Jti(String),
    Subject(String),
    Identity(IdentityName),
}

impl Entry {
    fn line(&self) -> String {
        match self {
            Entry::Jti(j) => format!("jti:{j}"),
            Entry::Subject(s) => format!("sub:{s}"),
            Entry::Identity(n) => format!("id:{n}"),
        }
    }

    fn value(&self) -> String {
        match self {
            Entry::Jti(v) | Entry::Subject(v) => v.clone(),
            Entry::Identity(n) => n.display(),
        }
    }
}

pub fn parse(path: &Path, text: &str) -> Result<Revocations, RevocationError> {
    let mut out = Revocations::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: &str| RevocationError::Syntax {
            path: path.to_path_buf(),
            line: i + 1,
            reason: reason.to_string(),
        };
        if line.len() > MAX_LINE {
            return Err(err("line too long"));
        }
        match line.split_once(':') {
            Some(("jti", v)) if !v.trim().is_empty() => {
                out.jtis.insert(v.trim().to_string());
            }
            Some(("sub", v)) if !v.trim().is_empty() => {
                out.subjects.insert(v.trim().to_string());
            }
            Some(("id", v)) if !v.trim().is_empty() => match IdentityName::parse(v.trim()) {
                Some(n) => {
                    out.identities.insert(n);
                }
                None => return Err(err("not an identity name as `agent status` shows it")),
            },
            Some(("jti" | "sub" | "id", _)) => return Err(err("empty value")),
            _ => return Err(err("unknown entry")),
        }
    }
    Ok(out)
}

/// Appends an entry (creating the file, mode 0600) and syncs it.
pub fn append(path: &Path, entry: &Entry) -> Result<(), RevocationError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| RevocationError::Io {
        path: path.to_path_buf(),
        source,
    };
    let v = entry.value();
    let v = v.as_str();
    if v.is_empty() || v.len() > MAX_LINE - 4 || v.contains(['\n', '\r']) {
        return Err(RevocationError::Syntax {
            path: path.to_path_buf(),
            line: 0,
            reason: "the value must be one non-empty line".into(),
        });
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    writeln!(f, "{}", entry.line()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The file as last read; `reload` reports what changed.
pub struct RevocationFile {
    path: PathBuf,
    last: Mutex<(Option<Vec<u8>>, Revocations)>,
}

/// What a reload added and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Revocations,
    pub removed: Revocations,
}

impl RevocationFile {
    pub fn new(path: PathBuf) -> RevocationFile {
        RevocationFile {
            path,
            last: Mutex::new((None, Revocations::default())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if its contents changed. A missing file means no
    /// revocations; a bad file keeps the previous set (and says why).
    pub fn reload(&self) -> Result<Option<Change>, RevocationError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(RevocationError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.0.as_deref() == Some(bytes.as_slice()) {
            return Ok(None);
        }
        let now = parse(&self.path, &String::from_utf8_lossy(&bytes))?;
        let change = Change {
            added: diff(&now, &last.1),
            removed: diff(&last.1, &now),
        };
        *last = (Some(bytes), now);
        Ok(Some(change))
    }
}

fn diff(a: &Revocations, b: &Revocations) -> Revocations {
    Revocations {
        jtis: a.jtis.difference(&b.jtis).cloned().collect(),
        subjects: a.subjects.difference(&b.subjects).cloned().collect(),
        identities: a.identities.difference(&b.identities).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_comments_and_blank_lines() {
        let r = parse(
            Path::new("f"),
            "# revoked\n\njti:abc\nsub: alice \nid:acme/bob\nid:a%2Fb\n",
        )
        .unwrap();
        assert!(r.jtis.contains("abc"));
        assert!(r.subjects.contains("alice"));
        assert!(
            r.identities
                .contains(&IdentityName::new(Some("acme"), "bob"))
        );
        assert!(r.identities.contains(&IdentityName::new(None, "a/b")));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for bad in ["jti:", "user:bob", "nonsense", "id:a/b/c", "id:"] {
            let e = parse(Path::new("/etc/rev"), &format!("jti:ok\n{bad}\n")).unwrap_err();
            assert!(e.to_string().starts_with("/etc/rev:2:"), "{e}");
        }
        let long = format!("jti:{}", "x".repeat(MAX_LINE));
        assert!(parse(Path::new("f"), &long).is_err());
    }

    #[test]
    fn reload_reports_changes_and_keeps_last_good_set() {
        let dir = std::env::temp_dir().join(format!("pcl-rev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("revocations");
        let _ = std::fs::remove_file(&path);
        let f = RevocationFile::new(path.clone());
        // Missing file: nothing revoked, and a change from "never read".
        assert_eq!(f.reload().unwrap().unwrap(), Change::default());
        assert!(f.reload().unwrap().is_none());
        append(&path, &Entry::Subject("alice".into())).unwrap();
        append(&path, &Entry::Jti("t1".into())).unwrap();
        let c = f.reload().unwrap().unwrap();
        assert!(c.added.subjects.contains("alice") && c.added.jtis.contains("t1"));
        std::fs::write(&path, "jti:t1\n").unwrap();
        let c = f.reload().unwrap().unwrap();
        assert!(c.removed.subjects.contains("alice") && c.added.jtis.is_empty());
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(f.reload().is_err());
        std::fs::write(&path, "jti:t1\n").unwrap();
        assert!(f.reload().unwrap().is_none(), "the last good set is kept");
        assert!(append(&path, &Entry::Jti("a\nsub:x".into())).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
