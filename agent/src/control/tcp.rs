//! The control API on TCP: mutual TLS only (`control.listen` with
//! `tls_cert`, `tls_key` and `client_ca`, `agent/src/config/control.rs`).
//! The handshake refuses a client without a certificate that chains to
//! `client_ca` (RFC 8446 §4.3.2, §4.4.2); the call's caller is that
//! certificate's subject.

use std::{future::Future, net::SocketAddr, path::Path};

use anyhow::Context;
use portcullis_proto::v1::control_server::ControlServer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

use super::rpc::ControlApi;
use crate::config::ControlTcp;

/// The bound TCP listener and its TLS settings.
pub struct Tls {
    listener: tokio::net::TcpListener,
    config: ServerTlsConfig,
}

fn read(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("control.{key} {}", path.display()))
}

/// Reads the TLS files and binds `control.listen`.
pub async fn bind(t: &ControlTcp) -> anyhow::Result<Tls> {
    let cert = read("tls_cert", &t.cert)?;
    let key = read("tls_key", &t.key)?;
    let ca = read("client_ca", &t.client_ca)?;
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false);
    // Unusable files stop the start here, not the listener later.
    Server::builder().tls_config(config.clone()).context(
        "control.tls_cert, tls_key, client_ca: not a usable PEM certificate, key and CA",
    )?;
    let listener = tokio::net::TcpListener::bind(t.listen)
        .await
        .with_context(|| format!("control.listen {}: cannot listen there", t.listen))?;
    Ok(Tls { listener, config })
}

impl Tls {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(
        self,
        api: ControlServer<ControlApi>,
        stop: impl Future<Output = ()> + Send,
    ) {
        let addr = self.listener.local_addr().ok();
        let builder = Server::builder().tls_config(self.config);
        let builder = match builder {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(event = "control_failed", error = %e, "control TLS settings refused; the API is not served on TCP");
                return;
            }
        };
        tracing::info!(event = "control_listening", addr = ?addr, "control API listening (mutual TLS)");
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        if let Err(e) = builder
            .serve_with_incoming_shutdown(api, incoming, stop)
            .await
        {
            tracing::error!(event = "control_failed", error = %e, "control API (TCP) stopped");
        }
    }
}
