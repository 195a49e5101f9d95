//! Load, attach, pin and adopt the kernel programs; the only module that
//! touches aya. A restarted agent adopts what is pinned instead of reloading
//! it, so enforcement never gaps (docs/operations.md).

pub mod bpffs;
pub mod clock;
pub mod links;
pub mod maps;
pub mod object;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use portcullis_common::{LAYOUT_VERSION, maps as names, programs};

pub use bpffs::Durability;
pub use links::{LinkTrouble, LinkWatch};
pub use maps::{Maps, ServiceEntry};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{0} is not on a bpf filesystem; mount one (`mount -t bpf bpf DIR`) or set kernel.pin_dir below kernel.bpffs"
    )]
    NotBpffs(PathBuf),
    #[error("the eBPF object has no map {0} (agent and object out of step; rebuild)")]
    MissingMap(String),
    #[error("map {map}: {detail}")]
    Map { map: String, detail: String },
    #[error("program {program}: {detail}")]
    Program { program: String, detail: String },
    #[error("attach {program} to interface {interface}: {detail}")]
    Attach {
        program: String,
        interface: String,
        detail: String,
    },
    #[error(
        "pinned state in {pin_dir} has map layout {found}, this agent writes layout {expected}; run `portcullis agent detach` with the old agent's config to remove it (this opens the protected ports until the new agent starts)"
    )]
    LayoutMismatch {
        pin_dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("all {0} identity slots are in use; revoke identities or wait for expiry")]
    IdentitiesExhausted(u32),
    #[error("identity slot {0} is not live")]
    IdentityNotLive(u32),
    #[error(
        "kernel.pin_dir {pin_dir} is on a bpf filesystem that exists only in this process's mount namespace (not mounted in PID 1's namespace, no mount propagation): its pins, and with them enforcement, would vanish when the agent exits. Run the agent in the host's mount namespace (`nsenter --net=/run/netns/NAME portcullis agent ...` instead of `ip netns exec NAME ...`, or as a systemd service); in a container, mount the host's /sys/fs/bpf (`--mount type=bind,source=/sys/fs/bpf,target=/sys/fs/bpf,bind-propagation=rshared`, or the DaemonSet's hostPath with mountPropagation: Bidirectional); or set kernel.ephemeral_pins = true for tests and demos, where enforcement may end with the agent"
    )]
    EphemeralPins { pin_dir: PathBuf },
    #[error("the kernel table {map} is full; raise {knob} (or revoke admissions)")]
    TableFull {
        map: &'static str,
        knob: &'static str,
    },
}

impl KernelError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        KernelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn map(map: &str, e: impl std::fmt::Display) -> Self {
        KernelError::Map {
            map: map.to_string(),
            detail: e.to_string(),
        }
    }
    fn program(program: &str, e: impl std::fmt::Display) -> Self {
        KernelError::Program {
            program: program.to_string(),
            detail: e.to_string(),
        }
    }
}

/// XDP attach mode (config `kernel.xdp_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Let the kernel pick (native when the driver supports it).
    Auto,
    Native,
    Generic,
}

impl AttachMode {
    fn xdp(self) -> XdpMode {
        match self {
            AttachMode::Auto => XdpMode::Default,
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// What `Kernel::open` needs from the configuration.
#[derive(Clone, Debug)]
pub struct Options {
    pub pin_dir: PathBuf,
    pub bpffs: PathBuf,
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub egress: bool,
    pub max_flows: u32,
    pub max_admissions: u32,
    pub max_knock_sources: u32,
    /// Accept pins that die with the agent's mount namespace.
    pub ephemeral_pins: bool,
}

/// Where the pins will live, as [`prepare_pins`] found it.
#[derive(Clone, Debug)]
pub struct PinsReady {
    pub durability: Durability,
    /// The agent mounted the bpffs itself (at `Options::bpffs`).
    pub mounted: bool,
}

/// Makes sure the pin directory is on a bpffs (mounting one if needed) and
/// that its pins will outlive the agent; refuses otherwise, unless
/// `ephemeral_pins`. Touches no program or map: call it before anything
/// else, so a refused start changes nothing (a bpffs it mounted for the
/// refused start is unmounted again).
pub fn prepare_pins(opts: &Options) -> Result<PinsReady, KernelError> {
    let mounted = bpffs::ensure(&opts.pin_dir, &opts.bpffs)?;
    let durability = match bpffs::durability(&opts.pin_dir) {
        Ok(d) => d,
        Err(e) => {
            if mounted {
                bpffs::unmount(&opts.bpffs);
            }
            return Err(KernelError::io(&opts.pin_dir, e));
        }
    };
    if !durability.outlives_agent() && !opts.ephemeral_pins {
        if mounted {
            bpffs::unmount(&opts.bpffs);
        }
        return Err(KernelError::EphemeralPins {
            pin_dir: opts.pin_dir.clone(),
        });
    }
    Ok(PinsReady {
        durability,
        mounted,
    })
}

/// How the running state came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Nothing was pinned: programs loaded and attached.
    Fresh,
    /// Pinned programs from this very object were adopted untouched.
    Adopted,
    /// Pinned maps kept, programs atomically replaced (a different object).
    Replaced,
}

pub struct Kernel {
    pub maps: Maps,
    pub origin: Origin,
    /// The agent's own hold on the pinned links.
    pub links: LinkWatch,
    // Kept so the programs' fds outlive the load; links hold them anyway.
    _ebpf: Option<Ebpf>,
}

fn link_path(pin_dir: &Path, kind: &str, iface: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{kind}-{iface}"))
}

impl Kernel {
    /// Adopts pinned state when it came from this object, otherwise loads
    /// (reusing pinned maps) and attaches, replacing pinned links atomically.
    pub fn open(opts: &Options) -> Result<Kernel, KernelError> {
        bpffs::ensure(&opts.pin_dir, &opts.bpffs)?;
        let mut k = match Self::try_adopt(opts)? {
            Some(k) => k,
            None => Self::load_and_attach(opts)?,
        };
        let names: Vec<String> = Self::wanted_links(opts)
            .iter()
            .map(|(kind, i)| format!("{kind}-{i}"))
            .collect();
        k.links = LinkWatch::open(&opts.pin_dir, &names)
            .map_err(|e| KernelError::io(&opts.pin_dir.join("links"), e))?;
        Ok(k)
    }

    fn wanted_links(opts: &Options) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        for i in &opts.interfaces {
            v.push(("xdp", i.as_str()));
            if opts.egress {
                v.push(("tc", i.as_str()));
            }
        }
        v
    }

    fn try_adopt(opts: &Options) -> Result<Option<Kernel>, KernelError> {
        let maps_dir = opts.pin_dir.join("maps");
        if !maps_dir.join(names::META).exists() {
            return Ok(None);
        }
        let maps = Maps::from_pins(&maps_dir)?;
        let meta = maps.read_meta()?;
        if meta.layout_version == 0 {
            // Pinned maps without a stamp: a load died half-way. Reload.
            return Ok(None);
        }
        if meta.layout_version != LAYOUT_VERSION {
            return Err(KernelError::LayoutMismatch {
                pin_dir: opts.pin_dir.clone(),
                found: meta.layout_version,
                expected: LAYOUT_VERSION,
            });
        }
        let all_linked = Self::wanted_links(opts)
            .iter()
            .all(|(kind, i)| link_path(&opts.pin_dir, kind, i).exists());
        if meta.object_hash != object::object_hash() || !all_linked {
            return Ok(None);
        }
        Self::remove_stale_links(opts)?;
        Ok(Some(Kernel {
            maps,
            origin: Origin::Adopted,
            links: LinkWatch::default(),
            _ebpf: None,
        }))
    }

    fn load_and_attach(opts: &Options) -> Result<Kernel, KernelError> {
        let maps_dir = opts.pin_dir.join("maps");
        let had_pins = maps_dir.join(names::META).exists();
        let pin_paths: Vec<(&str, PathBuf)> = names::ALL
            .iter()
            .map(|n| (*n, maps::pin_path(&opts.pin_dir, n)))
            .collect();
        let mut loader = sized_loader(opts);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(object::OBJECT)
            .map_err(|e| KernelError::program("object", with_causes(&e)))?;
        let mut any_replaced = false;
        {
            let xdp: &mut Xdp = program(&mut ebpf, programs::INGRESS)?;
            xdp.load()
                .map_err(|e| KernelError::program(programs::INGRESS, verifier(e)))?;
            for iface in &opts.interfaces {
                any_replaced |= attach_xdp(xdp, &opts.pin_dir, iface, opts.mode)?;
            }
        }
        if opts.egress {
            let tc: &mut SchedClassifier = program(&mut ebpf, programs::EGRESS)?;
            tc.load()
                .map_err(|e| KernelError::program(programs::EGRESS, verifier(e)))?;
            for iface in &opts.interfaces {
                any_replaced |= attach_tc(tc, &opts.pin_dir, iface)?;
            }
        }
        Self::remove_stale_links(opts)?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        // The stamp goes last: only a complete load is ever adopted.
        maps.write_meta(object::meta())?;
        let origin = if had_pins || any_replaced {
            Origin::Replaced
        } else {
            Origin::Fresh
        };
        Ok(Kernel {
            maps,
            origin,
            links: LinkWatch::default(),
            _ebpf: Some(ebpf),
        })
    }

    /// Unpins links for interfaces (or egress) no longer configured.
    fn remove_stale_links(opts: &Options) -> Result<(), KernelError> {
        let dir = opts.pin_dir.join("links");
        let wanted: Vec<String> = Self::wanted_links(opts)
            .iter()
            .map(|(k, i)| format!("{k}-{i}"))
            .collect();
        let entries = std::fs::read_dir(&dir).map_err(|e| KernelError::io(&dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !wanted.contains(&name) {
                tracing::info!(link = %name, "detaching link no longer in the config");
                std::fs::remove_file(entry.path())
                    .map_err(|e| KernelError::io(&entry.path(), e))?;
            }
        }
        Ok(())
    }

    /// Removes every pin under `pin_dir`: programs detach, maps are freed.
    /// This opens the protected ports; it is the operator's explicit act.
    pub fn detach(pin_dir: &Path) -> Result<usize, KernelError> {
        let mut removed = 0;
        for sub in ["links", "maps"] {
            let dir = pin_dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                std::fs::remove_file(entry.path())
                    .map_err(|e| KernelError::io(&entry.path(), e))?;
                removed += 1;
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(pin_dir);
        Ok(removed)
    }

    /// The maps, the link watch, and the loaded object (if any) to keep
    /// alive alongside.
    pub fn into_parts(self) -> (Maps, LinkWatch, Option<Ebpf>) {
        (self.maps, self.links, self._ebpf)
    }

    /// Opens pinned maps without touching programs (status, break-glass
    /// admin while the agent is down).
    pub fn open_pinned_maps(pin_dir: &Path) -> Result<Maps, KernelError> {
        Maps::from_pins(&pin_dir.join("maps"))
    }
}

/// Loads the object and its programs without pinning or attaching anything:
/// for BPF_PROG_TEST_RUN tests and benchmarks.
pub struct Unattached {
    pub ebpf: Ebpf,
    pub maps: Maps,
}

impl Unattached {
    pub fn load() -> Result<Unattached, KernelError> {
        Self::load_with(EbpfLoader::new())
    }

    /// Like [`Unattached::load`] with the table sizes of `opts`, as the
    /// agent's loader applies them.
    pub fn load_sized(opts: &Options) -> Result<Unattached, KernelError> {
        Self::load_with(sized_loader(opts))
    }

    fn load_with(mut loader: EbpfLoader<'_>) -> Result<Unattached, KernelError> {
        let mut ebpf = loader
            .load(object::OBJECT)
            .map_err(|e| KernelError::program("object", with_causes(&e)))?;
        Self::finish(&mut ebpf)?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        Ok(Unattached { ebpf, maps })
    }

    fn finish(ebpf: &mut Ebpf) -> Result<(), KernelError> {
        for name in [programs::INGRESS, programs::BASELINE_DROP] {
            let p: &mut Xdp = program(ebpf, name)?;
            p.load()
                .map_err(|e| KernelError::program(name, verifier(e)))?;
        }
        let tc: &mut SchedClassifier = program(ebpf, programs::EGRESS)?;
        tc.load()
            .map_err(|e| KernelError::program(programs::EGRESS, verifier(e)))?;
        Ok(())
    }

    pub fn xdp(&self, name: &str) -> &Xdp {
        let p = self
            .ebpf
            .program(name)
            .expect("program loaded by Unattached::load");
        p.try_into().expect("program is XDP")
    }

    pub fn tc(&self, name: &str) -> &SchedClassifier {
        let p = self
            .ebpf
            .program(name)
            .expect("program loaded by Unattached::load");
        p.try_into().expect("program is TC")
    }
}

/// A loader with the configured table sizes.
fn sized_loader(opts: &Options) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(names::FLOWS, opts.max_flows)
        .map_max_entries(names::ADMISSIONS, opts.max_admissions)
        .map_max_entries(names::KNOCK_SRC, opts.max_knock_sources);
    loader
}

/// The object's program `name` as its type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| KernelError::program(name, "missing in object"))?
        .try_into()
        .map_err(|e| KernelError::program(name, e))
}

/// Verifier rejections carry the log in the alternate Display form.
fn verifier(e: aya::programs::ProgramError) -> String {
    with_causes(&e)
}

/// What the capabilities check costs a start: which ones, and where the
/// deployment files grant them.
const PRIVILEGE_HINT: &str = "the kernel refused for lack of privilege: the agent needs CAP_BPF and CAP_PERFMON (kernel 5.8 or later; before it CAP_SYS_ADMIN), CAP_NET_ADMIN, and CAP_SYS_RESOURCE on kernels before 5.11, as deploy/systemd/portcullis-agent.service and deploy/kubernetes grant them";

/// The error with each of its causes; a refusal for lack of privilege
/// (EPERM anywhere in the chain) says which capabilities are missing.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut eperm = false;
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        eperm |= c
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM));
        cause = c.source();
    }
    if eperm || text.contains("Operation not permitted") {
        text.push_str("; ");
        text.push_str(PRIVILEGE_HINT);
    }
    text
}

/// Attaches (or atomically re-points a pinned link to) the XDP program.
/// Returns whether an existing link was replaced.
fn attach_xdp(
    xdp: &mut Xdp,
    pin_dir: &Path,
    iface: &str,
    mode: AttachMode,
) -> Result<bool, KernelError> {
    let path = link_path(pin_dir, "xdp", iface);
    let err = |detail: String| KernelError::Attach {
        program: programs::INGRESS.into(),
        interface: iface.into(),
        detail,
    };
    if let Ok(pinned) = PinnedLink::from_pin(&path) {
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| err(e.to_string()))?;
        let id = xdp.attach_to_link(link).map_err(|e| err(e.to_string()))?;
        // The link stays pinned; dropping our handle keeps it attached.
        let _ = xdp.take_link(id);
        return Ok(true);
    }
    let id = xdp
        .attach(iface, mode.xdp())
        .map_err(|e| err(format!("{e:#}")))?;
    let link = xdp.take_link(id).map_err(|e| err(e.to_string()))?;
    pin_new_link(link, &path, "a bpf_link", "kernel too old", err)?;
    Ok(false)
}

/// Pins a link just attached: only a bpf_link (an fd link) outlives the
/// agent, so a program attached another way is an error naming the cause.
fn pin_new_link<L>(
    link: L,
    path: &Path,
    kind: &str,
    why_not: &str,
    err: impl Fn(String) -> KernelError,
) -> Result<(), KernelError>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    let fd: FdLink = link
        .try_into()
        .map_err(|e| err(format!("not {kind} ({e}); {why_not}")))?;
    fd.pin(path)
        .map_err(|e| err(format!("pin {}: {e}", path.display())))?;
    Ok(())
}

/// Same for the TC egress program (TCX link on kernels >= 6.6).
fn attach_tc(tc: &mut SchedClassifier, pin_dir: &Path, iface: &str) -> Result<bool, KernelError> {
    let path = link_path(pin_dir, "tc", iface);
    let err = |detail: String| KernelError::Attach {
        program: programs::EGRESS.into(),
        interface: iface.into(),
        detail,
    };
    if let Ok(pinned) = PinnedLink::from_pin(&path) {
        let link =
            SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| err(e.to_string()))?;
        let id = tc.attach_to_link(link).map_err(|e| err(e.to_string()))?;
        let _ = tc.take_link(id);
        return Ok(true);
    }
    let id = tc
        .attach(iface, TcAttachType::Egress)
        .map_err(|e| err(format!("{e:#}")))?;
    let link = tc.take_link(id).map_err(|e| err(e.to_string()))?;
    pin_new_link(link, &path, "a TCX link", "kernel < 6.6", err)?;
    Ok(false)
}
