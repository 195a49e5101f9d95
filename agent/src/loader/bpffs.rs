//! The bpf filesystem that pins live on. A fresh machine has none mounted;
//! the agent mounts one where the config says instead of failing. Pins are
//! what keeps enforcement alive when the agent is gone (docs/operations.md), so the agent also proves they will outlive it:
//! a bpffs that exists only in the agent's own mount namespace (`ip netns
//! exec`, a container without the host's /sys/fs/bpf) dies with the agent
//! and takes the XDP program with it.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::KernelError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// `PROC_PID_INIT_INO` (include/linux/proc_ns.h): the inode of the initial
/// PID namespace, fixed on every kernel since 3.8. Only from there is PID 1
/// the host's init.
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

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
/// when `pin_dir` lies below it and nothing is mounted there yet. Returns
/// whether it mounted one.
pub fn ensure(pin_dir: &Path, mount_point: &Path) -> Result<bool, KernelError> {
    let nearest = nearest_existing(pin_dir);
    let mut mounted = false;
    if !is_bpffs(&nearest).map_err(|e| KernelError::io(&nearest, e))? {
        if !pin_dir.starts_with(mount_point) {
            return Err(KernelError::NotBpffs(pin_dir.to_path_buf()));
        }
        std::fs::create_dir_all(mount_point).map_err(|e| KernelError::io(mount_point, e))?;
        mount(mount_point)?;
        mounted = true;
        tracing::info!(mount_point = %mount_point.display(), "mounted bpffs");
    }
    for sub in ["", "maps", "links"] {
        let d = pin_dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| KernelError::io(&d, e))?;
    }
    if !is_bpffs(pin_dir).map_err(|e| KernelError::io(pin_dir, e))? {
        return Err(KernelError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(mounted)
}

/// Whether pins under a directory outlive the agent, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The same bpf filesystem is mounted in PID 1's mount namespace (the
    /// agent runs on the host, or was given the host's bpffs).
    HostMountNamespace,
    /// The mount is in a propagation peer group (`shared:N` or `master:N`):
    /// it is the host's, handed into a container with mount propagation.
    Propagated(String),
    /// Nothing outside the agent's mount namespace holds it.
    Ephemeral,
}

impl Durability {
    pub fn outlives_agent(&self) -> bool {
        !matches!(self, Durability::Ephemeral)
    }

    /// Words for status output and the `Lifecycle` event.
    pub fn describe(&self) -> String {
        match self {
            Durability::HostMountNamespace => "host mount namespace".into(),
            Durability::Propagated(tag) => format!("propagated from the host ({tag})"),
            Durability::Ephemeral => "ephemeral (dies with the agent's mount namespace)".into(),
        }
    }
}

/// Decides whether the bpffs holding `pin_dir` (which exists) outlives
/// this process's mount namespace.
pub fn durability(pin_dir: &Path) -> io::Result<Durability> {
    let own = std::fs::read_to_string("/proc/self/mountinfo")?;
    let target = std::fs::canonicalize(pin_dir)?;
    let Some(mount) = containing_mount(&own, &target) else {
        return Err(io::Error::other(format!(
            "{} is not below any mount in /proc/self/mountinfo",
            target.display()
        )));
    };
    if mount.fstype != "bpf" {
        return Err(io::Error::other(format!(
            "{} is on {} ({}), not on a bpf filesystem",
            target.display(),
            mount.point.display(),
            mount.fstype
        )));
    }
    if in_initial_pid_namespace()
        && let Ok(init) = std::fs::read_to_string("/proc/1/mountinfo")
        && parse_mountinfo(&init).any(|m| m.fstype == "bpf" && m.dev == mount.dev)
    {
        return Ok(Durability::HostMountNamespace);
    }
    if let Some(tag) = mount
        .optional
        .iter()
        .find(|t| t.starts_with("shared:") || t.starts_with("master:"))
    {
        return Ok(Durability::Propagated(tag.clone()));
    }
    Ok(Durability::Ephemeral)
}

/// Undoes [`ensure`]'s mount (the agent refused to use it).
pub fn unmount(at: &Path) {
    if let Ok(c) = CString::new(at.as_os_str().as_bytes()) {
        // SAFETY: valid C string. A failure leaves a mount that dies with
        // this mount namespace anyway.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn in_initial_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").is_ok_and(|m| m.ino() == INIT_PID_NS_INO)
}

/// One line of /proc/PID/mountinfo (proc(5)).
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    /// `major:minor` of the filesystem: one bpffs instance has one.
    dev: String,
    point: PathBuf,
    optional: Vec<String>,
    fstype: String,
}

fn parse_mountinfo(text: &str) -> impl Iterator<Item = MountEntry> + '_ {
    text.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut f = left.split(' ');
        let (_id, _parent, dev, _root, point) =
            (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let _options = f.next()?;
        let optional = f.map(str::to_owned).collect();
        let fstype = right.split(' ').next()?.to_owned();
        Some(MountEntry {
            dev: dev.to_owned(),
            point: PathBuf::from(unescape_octal(point)),
            optional,
            fstype,
        })
    })
}

/// The mount `path` lives on: the last-mounted entry with the longest
/// mount point above it (later lines shadow earlier ones).
fn containing_mount(mountinfo: &str, path: &Path) -> Option<MountEntry> {
    let mut best: Option<MountEntry> = None;
    for m in parse_mountinfo(mountinfo) {
        if path.starts_with(&m.point)
            && best
                .as_ref()
                .is_none_or(|b| m.point.as_os_str().len() >= b.point.as_os_str().len())
        {
            best = Some(m);
        }
    }
    best
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len() + 1
            && let Some(oct) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 27 0:21 / /proc rw,relatime shared:5 - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
46 27 0:41 / /tmp/pcl\\040bpf rw,relatime master:7 - bpf bpf rw
47 45 0:42 / /sys/fs/bpf/inner rw,relatime shared:9 - bpf bpf rw
";

    #[test]
    fn the_longest_mount_point_wins() {
        let m = containing_mount(INFO, Path::new("/sys/fs/bpf/portcullis/maps")).unwrap();
        assert_eq!((m.dev.as_str(), m.fstype.as_str()), ("0:40", "bpf"));
        assert!(m.optional.is_empty());
        let m = containing_mount(INFO, Path::new("/sys/fs/bpf/inner/x")).unwrap();
        assert_eq!(m.optional, ["shared:9"]);
        let m = containing_mount(INFO, Path::new("/tmp/pcl bpf/portcullis")).unwrap();
        assert_eq!(
            (m.dev.as_str(), m.optional[0].as_str()),
            ("0:41", "master:7")
        );
        let m = containing_mount(INFO, Path::new("/var/lib")).unwrap();
        assert_eq!(m.fstype, "ext4");
        // A prefix of the name is not a parent directory.
        let m = containing_mount(INFO, Path::new("/sys/fs/bpfx")).unwrap();
        assert_eq!(m.fstype, "ext4");
    }

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape_octal("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert_eq!(unescape_octal("/odd\\04"), "/odd\\04");
    }
}
