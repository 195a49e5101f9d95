//! Private temporary directories, removed on drop.

use std::{
    io::{self},
    path::{Path, PathBuf},
};

use crate::command::{check_prefix, unique_name};

/// A private directory under /tmp, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        check_prefix(prefix)?;
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("netns: cannot remove {}: {e}", self.path.display());
        }
    }
}
