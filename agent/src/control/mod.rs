//! The control API (`proto/portcullis/v1/control.proto`): gRPC on a Unix
//! socket, for operators, gateways and automation.
//!
//! [`auth`] decides who the caller is and what it may call, [`rpc`] runs
//! each call (authorise, act, audit a `ControlCall`), [`listing`] pages the
//! kernel's tables, [`revoke`] turns a revocation into admission's and the
//! enforcer's work, [`watch`] streams sealed events. Writes to the kernel
//! go through `agent/src/enforce/`, admissions through the knock service's
//! path (`agent/src/daemon/knock_service.rs`).

pub mod auth;
pub mod listing;
pub mod revoke;
pub mod rpc;
pub mod watch;

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use portcullis_proto::v1::control_server::ControlServer;
use tokio::{net::UnixListener, sync::watch as signal};
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::ControlSection;
pub use crate::daemon::node::Node;

/// The control socket, bound: serve it with [`Listening::serve`].
pub struct Listening {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds `control.socket`: mode 0660, owned by root and
/// `control.socket_group`. A socket another live agent answers on is an
/// error (two agents would fight over one node); a stale one (a crash) is
/// replaced.
pub async fn bind(cfg: &ControlSection) -> anyhow::Result<Option<Listening>> {
    let Some(path) = &cfg.socket else {
        return Ok(None);
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("control.socket: creating the directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                bail!(
                    "control.socket {}: another agent is serving on it; stop it, or give this agent its own control.socket",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| {
                format!("control.socket: removing the stale {}", path.display())
            })?;
        }
        Ok(_) => bail!(
            "control.socket {}: the path exists and is not a socket; remove it or choose another path",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("control.socket: binding {}", path.display()))?;
    // Bound with the umask's mode (never writable by others, so nobody
    // else can connect meanwhile), then narrowed to the configured group.
    let gid = match &cfg.socket_group {
        Some(g) => Some(group_id(g).with_context(|| format!("control.socket_group {g:?}"))?),
        None => None,
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .with_context(|| format!("control.socket: chown {}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("control.socket: chmod {}", path.display()))?;
    Ok(Some(Listening {
        listener,
        path: path.clone(),
    }))
}

impl Listening {
    /// Serves until `stop` turns true; then removes the socket file.
    pub async fn serve(self, node: Arc<Node>, mut stop: signal::Receiver<bool>) {
        let api = rpc::ControlApi::new(node);
        let path = self.path.clone();
        tracing::info!(event = "control_listening", socket = %path.display(), "control API listening");
        let incoming = UnixListenerStream::new(self.listener);
        let served = tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(ControlServer::new(api), incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(event = "control_failed", error = %e, "control API stopped");
        }
        let _ = std::fs::remove_file(&path);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A group's id from its name or number.
fn group_id(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(g).context("a group name has no NUL")?;
    // SAFETY: getgrnam reads the group database; the result is copied out
    // before any other call that could overwrite its static buffer.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        bail!("no such group; create it or give its number");
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*gr).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(path: &Path) -> ControlSection {
        ControlSection {
            socket: Some(path.to_path_buf()),
            ..ControlSection::default()
        }
    }

    #[tokio::test]
    async fn a_socket_in_use_is_refused_a_stale_one_replaced() {
        let dir = portcullis_testkit::TempDir::new("ctlbind").unwrap();
        let path = dir.path().join("run").join("control.sock");
        let first = bind(&section(&path)).await.unwrap().expect("bound");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let e = bind(&section(&path)).await.err().expect("in use");
        assert!(format!("{e:#}").contains("another agent"), "{e:#}");
        // The first agent died without removing it: the next one takes over.
        drop(first);
        assert!(path.exists());
        bind(&section(&path))
            .await
            .unwrap()
            .expect("stale socket replaced");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = bind(&section(&file)).await.err().expect("not a socket");
        assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
        assert!(
            bind(&ControlSection {
                socket: None,
                ..ControlSection::default()
            })
            .await
            .unwrap()
            .is_none()
        );
    }
}
