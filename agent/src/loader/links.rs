//! Watching the pinned links while the agent runs. A link pin is what keeps
//! a program attached: `rm /sys/fs/bpf/portcullis/links/xdp-eth0` (or a
//! bpffs unmounted under the agent) would detach enforcement silently. The
//! agent holds its own descriptor for every link, so removing the pin does
//! not detach anything while it runs; it notices within a second, pins the
//! link again, and reports it. If the pin cannot be restored (the bpffs was
//! unmounted), the agent keeps holding the link, so enforcement lasts as
//! long as it runs, and says so every time it checks. A link whose
//! interface went away (or that was detached by other means) cannot be
//! repaired in place: that is reported as lost, and the agent stops with an
//! error so its supervisor restarts it, which attaches afresh.
//!
//! aya 0.14 exposes neither a link's descriptor nor its interface, so this
//! uses the bpf(2) commands directly: BPF_OBJ_GET, BPF_OBJ_PIN and
//! BPF_OBJ_GET_INFO_BY_FD (include/uapi/linux/bpf.h).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for BPF_OBJ_PIN / BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info`: type, id, prog_id, then the
/// per-type union, whose first member is the interface index for XDP and
/// TCX links.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct LinkInfoHead {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    _rest: [u32; 11],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) bpf_attr prefix of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens the object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..ObjAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjAttr::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

fn link_info(fd: &OwnedFd) -> io::Result<LinkInfoHead> {
    let mut info = LinkInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoHead>() as u32,
        info: &mut info as *mut LinkInfoHead as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// One pinned link the agent keeps open.
#[derive(Debug)]
struct Watched {
    name: String,
    path: PathBuf,
    fd: OwnedFd,
    id: u32,
}

/// What a check found wrong with one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTrouble {
    /// The pin was gone; the link was pinned again (enforcement never
    /// stopped: the agent's descriptor kept it attached).
    Repinned { link: String, path: PathBuf },
    /// The pin is gone and cannot be restored: only the agent's descriptor
    /// keeps the link attached now, so enforcement ends when the agent does.
    Unpinned { link: String, detail: String },
    /// The link no longer enforces (its interface is gone or it was
    /// detached), or another object sits at its pin.
    Lost { link: String, detail: String },
}

impl std::fmt::Display for LinkTrouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkTrouble::Repinned { link, path } => write!(
                f,
                "the pin of link {link} ({}) was removed; pinned it again",
                path.display()
            ),
            LinkTrouble::Unpinned { link, detail } => write!(
                f,
                "link {link} is held only by this agent (enforcement ends when it exits): {detail}"
            ),
            LinkTrouble::Lost { link, detail } => write!(f, "link {link} lost: {detail}"),
        }
    }
}

/// The agent's hold on its pinned links.
#[derive(Debug, Default)]
pub struct LinkWatch {
    links: Vec<Watched>,
}

impl LinkWatch {
    /// Opens every link pinned under `<pin_dir>/links` named in `names`
    /// (`xdp-eth0`, `tc-eth0`).
    pub fn open(pin_dir: &Path, names: &[String]) -> io::Result<LinkWatch> {
        let mut links = Vec::with_capacity(names.len());
        for name in names {
            let path = pin_dir.join("links").join(name);
            let fd = obj_get(&path).map_err(|e| {
                io::Error::new(e.kind(), format!("link pin {}: {e}", path.display()))
            })?;
            let id = link_info(&fd)?.id;
            links.push(Watched {
                name: name.clone(),
                path,
                fd,
                id,
            });
        }
        Ok(LinkWatch { links })
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Checks every link: still attached, still pinned (re-pinned if not).
    pub fn check(&self) -> Vec<LinkTrouble> {
        let mut out = Vec::new();
        for w in &self.links {
            match link_info(&w.fd) {
                Ok(info) if info.ifindex == 0 => {
                    out.push(LinkTrouble::Lost {
                        link: w.name.clone(),
                        detail: "detached from its interface (the interface is gone?)".into(),
                    });
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    out.push(LinkTrouble::Lost {
                        link: w.name.clone(),
                        detail: format!("cannot read it: {e}"),
                    });
                    continue;
                }
            }
            match obj_get(&w.path).and_then(|fd| link_info(&fd)) {
                Ok(info) if info.id == w.id => {}
                Ok(info) => out.push(LinkTrouble::Lost {
                    link: w.name.clone(),
                    detail: format!(
                        "another link (id {}) is pinned at {} in place of ours (id {})",
                        info.id,
                        w.path.display(),
                        w.id
                    ),
                }),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if let Some(dir) = w.path.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    match obj_pin(&w.fd, &w.path) {
                        Ok(()) => out.push(LinkTrouble::Repinned {
                            link: w.name.clone(),
                            path: w.path.clone(),
                        }),
                        Err(e) => out.push(LinkTrouble::Unpinned {
                            link: w.name.clone(),
                            detail: format!(
                                "its pin {} was removed and cannot be restored: {e}",
                                w.path.display()
                            ),
                        }),
                    }
                }
                Err(e) => out.push(LinkTrouble::Lost {
                    link: w.name.clone(),
                    detail: format!("its pin {} cannot be read: {e}", w.path.display()),
                }),
            }
        }
        out
    }
}
