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
pub mod budgets;
pub mod listing;
pub mod revoke;
pub mod rpc;
pub mod tcp;
pub mod usage;
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

/// The control API's listeners, bound: serve them with
/// [`Listening::serve`].
pub struct Listening {
    unix: Option<UnixSocket>,
    tcp: Option<tcp::Tls>,
}

/// The bound control socket.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds what `[control]` asks for: the socket and, when configured, the
/// mutual-TLS TCP listener. `None`: the API is off.
pub async fn bind(cfg: &ControlSection) -> anyhow::Result<Option<Listening>> {
    let unix = bind_socket(cfg).await?;
    let tcp = match &cfg.tcp {
        Some(t) => Some(tcp::bind(t).await?),
        None => None,
    };
    Ok((unix.is_some() || tcp.is_some()).then_some(Listening { unix, tcp }))
}

/// Binds `control.socket`: mode 0660, owned by root and
/// `control.socket_group`. A socket another live agent answers on is an
/// error (two agents would fight over one node); a stale one (a crash) is
/// replaced.
pub async fn bind_socket(cfg: &ControlSection) -> anyhow::Result<Option<UnixSocket>> {
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
    Ok(Some(UnixSocket {
        listener,
        path: path.clone(),
    }))
}

impl Listening {
    /// Serves until `stop` turns true; then removes the socket file. Both
    /// transports share one API: a caller's call budget is the same on
    /// either.
    pub async fn serve(self, node: Arc<Node>, stop: signal::Receiver<bool>) {
        let api = Arc::new(rpc::ControlApi::new(node));
        let until = |mut stop: signal::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let unix = self.unix.map(|u| {
            let (api, stop) = (api.clone(), stop.clone());
            tokio::spawn(async move {
                tracing::info!(event = "control_listening", socket = %u.path.display(), "control API listening");
                let served = tonic::transport::Server::builder()
                    .serve_with_incoming_shutdown(
                        ControlServer::from_arc(api),
                        UnixListenerStream::new(u.listener),
                        until(stop),
                    )
                    .await;
                if let Err(e) = served {
                    tracing::error!(event = "control_failed", error = %e, "control API stopped");
                }
                let _ = std::fs::remove_file(&u.path);
            })
        });
        let tcp = self
            .tcp
            .map(|t| tokio::spawn(t.serve(ControlServer::from_arc(api), until(stop))));
        for task in [unix, tcp].into_iter().flatten() {
            let _ = task.await;
        }
    }

    /// Where the control socket is, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
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
        let first = bind_socket(&section(&path)).await.unwrap().expect("bound");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let e = bind_socket(&section(&path)).await.err().expect("in use");
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
        let e = bind_socket(&section(&file))
            .await
            .err()
            .expect("not a socket");
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
