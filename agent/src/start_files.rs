//! Files a start creates, removed again when that start fails: a start
//! refused for a bad interface or a kernel refusal must not leave a new node
//! key, an audit spool or a ledger behind that the next start would then
//! treat as this node's history. What existed before is never touched, and
//! an audit spool that already held a trail keeps the failed start's
//! STARTED/STOPPING events (the trail says the start happened).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// Tracks paths a start may create; [`StartFiles::commit`] keeps them,
/// dropping the guard (a failed start) removes the new ones.
#[derive(Debug, Default)]
pub struct StartFiles {
    /// Paths that did not exist: removed whole (files or directories).
    created: Vec<PathBuf>,
    /// Directories that existed empty of spool segments: entries that were
    /// not there before are removed.
    new_entries_in: Vec<(PathBuf, BTreeSet<std::ffi::OsString>)>,
    /// A bpf filesystem the start mounted: unmounted again (nothing of an
    /// earlier run can be on it).
    mounts: Vec<PathBuf>,
    committed: bool,
}

impl StartFiles {
    pub fn new() -> StartFiles {
        StartFiles::default()
    }

    /// `path` (a file or directory the start may create, with its missing
    /// parents): the top-most missing ancestor is removed on failure.
    pub fn track(&mut self, path: &Path) {
        let Some(top) = first_missing(path) else {
            return;
        };
        if !self.created.iter().any(|c| top.starts_with(c)) {
            self.created.retain(|c| !c.starts_with(&top));
            self.created.push(top);
        }
    }

    /// The audit spool directory: tracked whole when missing; when it
    /// exists without any segment, what the start adds to it is removed on
    /// failure; a spool with segments (a trail) is left alone.
    pub fn track_spool(&mut self, dir: &Path) {
        if !dir.exists() {
            self.track(dir);
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let names: BTreeSet<_> = entries.flatten().map(|e| e.file_name()).collect();
        let has_trail = names
            .iter()
            .any(|n| Path::new(n).extension().is_some_and(|x| x == "pcs"));
        if !has_trail {
            self.new_entries_in.push((dir.to_path_buf(), names));
        }
    }

    /// A bpf filesystem this start mounted.
    pub fn track_mount(&mut self, at: &Path) {
        self.mounts.push(at.to_path_buf());
    }

    /// The start succeeded: keep everything.
    pub fn commit(mut self) {
        self.committed = true;
    }

    fn undo(&self) {
        for m in &self.mounts {
            crate::loader::bpffs::unmount(m);
            tracing::info!(mount_point = %m.display(), "unmounted the bpffs the failed start mounted");
        }
        for p in &self.created {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            match r {
                Ok(()) => {
                    tracing::info!(path = %p.display(), "removed what the failed start created")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove what the failed start created")
                }
            }
        }
        for (dir, before) in &self.new_entries_in {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !before.contains(&e.file_name()) {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        }
    }
}

impl Drop for StartFiles {
    fn drop(&mut self) {
        if !self.committed {
            self.undo();
        }
    }
}

/// The top-most ancestor of `path` (itself included) that does not exist.
fn first_missing(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return None;
    }
    let mut top = path.to_path_buf();
    while let Some(parent) = top.parent() {
        if parent.as_os_str().is_empty() || parent.exists() {
            break;
        }
        top = parent.to_path_buf();
    }
    Some(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pcl-startfiles-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_failed_start_removes_only_what_it_created() {
        let d = scratch("fail");
        std::fs::write(d.join("old.key"), "keep").unwrap();
        let spool = d.join("spool");
        std::fs::create_dir(&spool).unwrap();
        std::fs::write(spool.join("notes"), "keep").unwrap();
        {
            let mut g = StartFiles::new();
            g.track(&d.join("old.key"));
            g.track(&d.join("state/deep/node.key"));
            g.track_spool(&spool);
            std::fs::create_dir_all(d.join("state/deep")).unwrap();
            std::fs::write(d.join("state/deep/node.key"), "new").unwrap();
            std::fs::write(spool.join("seg-1.pcs"), "new").unwrap();
        }
        assert!(d.join("old.key").exists());
        assert!(!d.join("state").exists());
        assert!(spool.join("notes").exists());
        assert!(!spool.join("seg-1.pcs").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_trail_and_a_successful_start_are_kept() {
        let d = scratch("keep");
        let spool = d.join("spool");
        std::fs::create_dir(&spool).unwrap();
        std::fs::write(spool.join("seg-1.pcs"), "old").unwrap();
        {
            let mut g = StartFiles::new();
            g.track_spool(&spool);
            std::fs::write(spool.join("seg-9.pcs"), "new").unwrap();
        }
        assert!(
            spool.join("seg-9.pcs").exists(),
            "a trail keeps its failed start"
        );
        {
            let mut g = StartFiles::new();
            g.track(&d.join("node.key"));
            std::fs::write(d.join("node.key"), "new").unwrap();
            g.commit();
        }
        assert!(d.join("node.key").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
