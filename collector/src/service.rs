//! The collector as a service: opening the output and key
//! stores, and serving the gRPC `Collector` (`collector/src/server.rs`) on
//! a listener, with TLS when given.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use crate::{
    options::{CollectorOptions, TlsFiles},
    server,
};

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

pub use crate::server::Stats;

/// An opened collector: output recovered, ready to serve.
#[derive(Clone)]
pub struct Collector {
    shared: Arc<server::Shared>,
}

impl Collector {
    /// Opens the output (recovering heads, cutting a torn tail) and the key
    /// stores.
    pub fn open(opts: CollectorOptions) -> anyhow::Result<Collector> {
        Ok(Collector {
            shared: server::Shared::open(opts)?,
        })
    }

    /// Counters (connections, refusals, records).
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The tonic service, to mount on any server.
    pub fn service(
        &self,
    ) -> portcullis_proto::v1::collector_server::CollectorServer<server::CollectorService> {
        server::CollectorService::new(self.shared.clone()).into_server()
    }

    /// Serves on `listener` until `shutdown` completes, then saves state.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<&TlsFiles>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let mut builder = Server::builder();
        if let Some(t) = tls {
            builder = builder
                .tls_config(tls_config(t)?)
                .context("configuring TLS")?;
        }
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        // On shutdown, open streams end with UNAVAILABLE (the agents resume
        // elsewhere or later), so the graceful shutdown does not wait on them.
        let shared = self.shared.clone();
        let signal = async move {
            shutdown.await;
            shared.begin_shutdown();
        };
        // Findings about failed handshakes are summed per window and
        // written when it ends.
        let flusher = {
            let shared = self.shared.clone();
            let window = shared.guard_window();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(window.min(Duration::from_secs(1)));
                loop {
                    tick.tick().await;
                    let s = shared.clone();
                    if tokio::task::spawn_blocking(move || s.flush_guard(false))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            })
        };
        let served = builder
            .serve_with_incoming_shutdown(self.service(), incoming, signal)
            .await
            .context("collector server");
        flusher.abort();
        self.shared.flush_guard(true);
        self.shared.save_state();
        served
    }
}

fn tls_config(t: &TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let cert =
        std::fs::read(&t.cert).with_context(|| format!("--tls-cert {}", t.cert.display()))?;
    let key = std::fs::read(&t.key).with_context(|| format!("--tls-key {}", t.key.display()))?;
    let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &t.client_ca {
        let ca = std::fs::read(ca).with_context(|| format!("--client-ca {}", ca.display()))?;
        cfg = cfg.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(cfg)
}

/// Listener settings for [`serve`].
pub struct Listen {
    pub addr: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Allow plaintext on a non-loopback address.
    pub allow_plaintext: bool,
}

/// Refuses plaintext off loopback unless allowed.
pub fn check_listen(l: &Listen) -> anyhow::Result<()> {
    if l.tls.is_none() && !l.addr.ip().is_loopback() && !l.allow_plaintext {
        anyhow::bail!(
            "--listen {}: plaintext is allowed only on loopback; give --tls-cert and --tls-key, \
             or --allow-plaintext if the network is otherwise protected",
            l.addr
        );
    }
    Ok(())
}

/// Opens the collector, binds `listen.addr` and serves until `shutdown`.
/// `on_bound` is told the bound address (useful with port 0).
pub async fn serve(
    opts: CollectorOptions,
    listen: Listen,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    check_listen(&listen)?;
    let c = Collector::open(opts)?;
    let listener = tokio::net::TcpListener::bind(listen.addr)
        .await
        .with_context(|| format!("--listen {}", listen.addr))?;
    on_bound(listener.local_addr()?);
    c.serve(listener, listen.tls.as_ref(), shutdown).await
}
