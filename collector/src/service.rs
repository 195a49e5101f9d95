//! The collector as a service: options, opening the output and key
//! stores, and serving the gRPC `Collector` (`collector/src/server.rs`) on
//! a listener, with TLS when given.

use std::{
    collections::HashMap, future::Future, io::Write, net::SocketAddr, path::PathBuf, sync::Arc,
    time::Duration,
};

use crate::{guard, server};

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

pub use crate::server::Stats;

/// Which node keys the collector accepts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustMode {
    /// Keys pinned with --keys or enrolled (`portcullis collector enroll`):
    /// the default; an unknown node is refused.
    Enrolled,
    /// Only keys pinned with --keys.
    Pinned,
    /// Also trust an unknown node's first key (development only; every
    /// record of such a node says `portcullis.trust = "tofu"`).
    Tofu,
}

impl TrustMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TrustMode::Enrolled => "enrolled",
            TrustMode::Pinned => "pinned",
            TrustMode::Tofu => "tofu",
        }
    }
}

/// Where records go.
pub enum Output {
    /// Rotating JSON-lines files in a directory (also holds state and keys).
    Dir { dir: PathBuf, rotate_bytes: u64 },
    /// A stream, e.g. stdout; `state_dir` (optional) keeps heads and TOFU
    /// keys across restarts.
    Writer {
        writer: Box<dyn Write + Send>,
        state_dir: Option<PathBuf>,
    },
}

/// TLS for the listener (PEM files).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates chaining to this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Everything `portcullis collector` is told.
pub struct CollectorOptions {
    pub output: Output,
    pub trust: TrustMode,
    /// Operator-pinned keys per node (`--keys FILE`).
    pub pinned: HashMap<String, [u8; 32]>,
    /// Refuse batches with more events than this.
    pub max_batch_events: usize,
    /// Refuse messages larger than this (bytes, encoded).
    pub max_message_bytes: usize,
    /// Seconds a client has to complete Hello and Proof.
    pub handshake_timeout_secs: u64,
    /// Require the client certificate to name the node id (mTLS).
    pub node_id_from_cert: bool,
    /// Bounds on findings about failed handshakes.
    pub guard: guard::GuardLimits,
}

impl CollectorOptions {
    pub fn new(output: Output) -> CollectorOptions {
        CollectorOptions {
            output,
            trust: TrustMode::Enrolled,
            pinned: HashMap::new(),
            max_batch_events: 1024,
            max_message_bytes: 4 * 1024 * 1024,
            handshake_timeout_secs: 10,
            node_id_from_cert: false,
            guard: guard::GuardLimits::default(),
        }
    }
}

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
