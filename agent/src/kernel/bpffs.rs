//! The bpf filesystem that pins live on. A fresh machine has none mounted;
//! the agent mounts one where the config says instead of failing.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::KernelError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether `path` (which must exist) is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` exists on a bpffs, mounting one at `mount_point`
/// when `pin_dir` lies below it and nothing is mounted there yet.
pub fn ensure(pin_dir: &Path, mount_point: &Path) -> Result<(), KernelError> {
    let nearest = nearest_existing(pin_dir);
    if !is_bpffs(&nearest).map_err(|e| KernelError::io(&nearest, e))? {
        if !pin_dir.starts_with(mount_point) {
            return Err(KernelError::NotBpffs(pin_dir.to_path_buf()));
        }
        std::fs::create_dir_all(mount_point).map_err(|e| KernelError::io(mount_point, e))?;
        mount(mount_point)?;
        tracing::info!(mount_point = %mount_point.display(), "mounted bpffs");
    }
    for sub in ["", "maps", "links"] {
        let d = pin_dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| KernelError::io(&d, e))?;
    }
    if !is_bpffs(pin_dir).map_err(|e| KernelError::io(pin_dir, e))? {
        return Err(KernelError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(())
}

fn nearest_existing(p: &Path) -> PathBuf {
    let mut cur = p.to_path_buf();
    while !cur.exists() {
        if !cur.pop() {
            return PathBuf::from("/");
        }
    }
    cur
}

fn mount(at: &Path) -> Result<(), KernelError> {
    let target = CString::new(at.as_os_str().as_bytes())
        .map_err(|e| KernelError::io(at, io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let bpf = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(KernelError::io(at, io::Error::last_os_error()));
    }
    Ok(())
}
