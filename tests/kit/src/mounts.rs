//! Fresh filesystems on private directories: a bpffs for one agent's pins,
//! a small tmpfs to fill a disk.

use std::{
    io::{self},
    mem,
    path::{Path, PathBuf},
};

use crate::tempdir::TempDir;

/// A fresh filesystem instance mounted on a private directory under /tmp;
/// unmounted (lazily, so an open file cannot make it fail) and removed on
/// drop, even when a test fails.
#[derive(Debug)]
pub(crate) struct FreshMount {
    path: PathBuf,
}

impl FreshMount {
    fn new(prefix: &str, fstype: &std::ffi::CStr, data: Option<&str>) -> io::Result<FreshMount> {
        let dir = TempDir::new(prefix)?;
        let path = dir.path().to_path_buf();
        // The directory now belongs to the mount guard.
        mem::forget(dir);
        let c = cstring(&path)?;
        let data = data
            .map(|d| {
                std::ffi::CString::new(d)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
            })
            .transpose()?;
        let data_ptr = data
            .as_ref()
            .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
        // SAFETY: valid NUL-terminated strings; `data` outlives the call.
        let rc = unsafe { libc::mount(fstype.as_ptr(), c.as_ptr(), fstype.as_ptr(), 0, data_ptr) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "mount {} on {}: {e}",
                    fstype.to_string_lossy(),
                    path.display()
                ),
            ));
        }
        Ok(FreshMount { path })
    }
}

impl Drop for FreshMount {
    fn drop(&mut self) {
        if let Ok(c) = cstring(&self.path) {
            // SAFETY: valid C string. MNT_DETACH: a process still holding a
            // file in it cannot make the unmount fail.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "netns: umount {}: {}",
                    self.path.display(),
                    io::Error::last_os_error()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("netns: rmdir {}: {e}", self.path.display());
        }
    }
}

pub(crate) fn cstring(p: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A fresh bpf filesystem instance on a private directory; dropping it also
/// drops every pin in it (programs whose only reference was a pinned link
/// detach).
#[derive(Debug)]
pub struct BpffsMount {
    mnt: FreshMount,
}

impl BpffsMount {
    pub fn new() -> io::Result<BpffsMount> {
        Ok(BpffsMount {
            mnt: FreshMount::new("bpffs", c"bpf", None)?,
        })
    }

    /// The mount point (`kernel.bpffs` in the agent config).
    pub fn path(&self) -> &Path {
        &self.mnt.path
    }

    /// `<mount>/portcullis` (`kernel.pin_dir` in the agent config).
    pub fn pin_dir(&self) -> PathBuf {
        self.mnt.path.join("portcullis")
    }
}

/// A tmpfs of `size_bytes` on a private directory (mode 0700): a real disk
/// that fills up, for ENOSPC tests.
#[derive(Debug)]
pub struct TmpfsMount {
    mnt: FreshMount,
}

impl TmpfsMount {
    pub fn new(size_bytes: u64) -> io::Result<TmpfsMount> {
        let data = format!("size={size_bytes},mode=0700");
        Ok(TmpfsMount {
            mnt: FreshMount::new("tmpfs", c"tmpfs", Some(&data))?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.mnt.path
    }
}
