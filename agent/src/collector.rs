//! `portcullis collector`: receives agents' audit streams, verifies each
//! node's chain, and writes OCSF JSON lines (to rotating files or stdout)
//! for a SIEM to read.
//!
//! - [`server`]: the gRPC `Collector` service (handshake, batches, acks).
//! - [`store`]: output files, rotation, persisted heads, crash recovery.
//! - [`ocsf`]: the record for each event and for each finding.
//! - [`keys`]: the record of node keys (pinned, enrolled, first use).
//! - [`guard`]: bounded findings about failed handshakes.
//!
//! In-process use (tests, tools): [`Collector::open`] then
//! [`Collector::serve`] with a bound listener and a shutdown future, or
//! [`serve`] from options alone.

pub mod guard;
pub mod keys;
pub mod ocsf;
pub mod server;
pub mod store;

use std::{
    collections::HashMap, future::Future, io::Write, net::SocketAddr, path::PathBuf, sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming};

pub use server::Stats;

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

/// `portcullis collector [enroll ...]`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CollectorCmd {
    #[command(subcommand)]
    pub action: Option<CollectorAction>,
    #[command(flatten)]
    pub run: CollectorArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum CollectorAction {
    /// Enroll a node: record its Ed25519 public key (from the agent's
    /// STARTED event or `portcullis agent status`), so the collector accepts
    /// its stream. Takes effect at the node's next connection.
    #[command(group = clap::ArgGroup::new("where").required(true))]
    Enroll {
        /// The collector's output directory (as given to --out).
        #[arg(long, value_name = "DIR", group = "where")]
        out: Option<PathBuf>,
        /// The collector's --state-dir (with --stdout).
        #[arg(long, value_name = "DIR", group = "where")]
        state_dir: Option<PathBuf>,
        /// Replace a different key already on record for the node.
        #[arg(long)]
        replace: bool,
        /// The node id (`agent.node_id`).
        node: String,
        /// Its public key: 64 hex digits or base64.
        key: String,
    },
}

/// `portcullis collector` flags.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("output").required(true))]
pub struct CollectorArgs {
    /// Address to listen on, e.g. 127.0.0.1:7300 or [::]:7300.
    #[arg(long, value_name = "ADDR", required = true)]
    pub listen: Option<SocketAddr>,
    /// Write JSON-lines files (rotating) and state into DIR.
    #[arg(long, value_name = "DIR", group = "output")]
    pub out: Option<PathBuf>,
    /// Write JSON lines to stdout (flushed before each ack).
    #[arg(long, group = "output")]
    pub stdout: bool,
    /// With --stdout: keep heads and first-seen keys in DIR across restarts.
    #[arg(long, value_name = "DIR", requires = "stdout")]
    pub state_dir: Option<PathBuf>,
    /// Rotate output files at this size (bytes); they also rotate each UTC day.
    #[arg(long, value_name = "BYTES", default_value_t = store::DEFAULT_ROTATE_BYTES,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub rotate_bytes: u64,
    /// Pinned node keys: lines `NODE_ID KEY` (hex or base64 Ed25519 key).
    #[arg(long, value_name = "FILE")]
    pub keys: Option<PathBuf>,
    /// `enrolled`: nodes pinned with --keys or enrolled with `portcullis
    /// collector enroll`; `pinned`: only --keys; `tofu`: also an unknown
    /// node's first key (development only; its records say so).
    #[arg(long, value_enum, default_value_t = TrustMode::Enrolled)]
    pub trust: TrustMode,
    /// With --client-ca: a node's client certificate must name its node id
    /// (DNS subject alternative name).
    #[arg(long, requires = "client_ca")]
    pub node_id_from_cert: bool,
    /// Server certificate (PEM); with --tls-key enables TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Allow plaintext on a non-loopback address.
    #[arg(long)]
    pub allow_plaintext: bool,
    /// Largest batch accepted (events).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub max_batch_events: u64,
    /// Largest message accepted (bytes).
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=256 * 1024 * 1024))]
    pub max_message_bytes: u64,
}

/// `portcullis collector [enroll]`.
pub fn run_command(cmd: CollectorCmd) -> anyhow::Result<()> {
    match cmd.action {
        None => run_cli(cmd.run),
        Some(CollectorAction::Enroll {
            out,
            state_dir,
            replace,
            node,
            key,
        }) => {
            let dir = out.or(state_dir).expect("clap requires one");
            let key = keys::parse_key(&key).map_err(|e| anyhow::anyhow!("KEY: {e}"))?;
            let before = keys::enroll(&dir.join("keys"), &node, key, replace)?;
            let id = crate::audit::chain::key_id(&key);
            match before {
                Some((old, prov)) if old == key => {
                    println!(
                        "enrolled {node} (key {id}; it was on record as {})",
                        prov.as_str()
                    )
                }
                Some((old, _)) => println!(
                    "enrolled {node} with key {id}, replacing {}",
                    crate::audit::chain::key_id(&old)
                ),
                None => println!("enrolled {node} with key {id}"),
            }
            Ok(())
        }
    }
}

/// `portcullis collector`: runs until SIGINT or SIGTERM. Prints
/// `portcullis collector: listening on ADDR` to stderr once bound.
pub fn run_cli(args: CollectorArgs) -> anyhow::Result<()> {
    let Some(listen_addr) = args.listen else {
        anyhow::bail!("--listen ADDR is required");
    };
    let pinned = match &args.keys {
        Some(p) => keys::load_keys_file(p)?,
        None => HashMap::new(),
    };
    if args.trust == TrustMode::Pinned && pinned.is_empty() {
        anyhow::bail!("--trust pinned needs --keys FILE with at least one node");
    }
    let output = match (&args.out, args.stdout) {
        (Some(dir), _) => Output::Dir {
            dir: dir.clone(),
            rotate_bytes: args.rotate_bytes,
        },
        (None, true) => Output::Writer {
            writer: Box::new(std::io::stdout()),
            state_dir: args.state_dir.clone(),
        },
        (None, false) => anyhow::bail!("give --out DIR or --stdout"),
    };
    let mut opts = CollectorOptions::new(output);
    opts.trust = args.trust;
    opts.pinned = pinned;
    opts.node_id_from_cert = args.node_id_from_cert;
    opts.max_batch_events = args.max_batch_events as usize;
    opts.max_message_bytes = args.max_message_bytes as usize;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        }),
        _ => None,
    };
    let listen = Listen {
        addr: listen_addr,
        tls,
        allow_plaintext: args.allow_plaintext,
    };
    check_listen(&listen)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot watch SIGTERM");
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("collector stopping");
        };
        serve(
            opts,
            listen,
            |addr| eprintln!("portcullis collector: listening on {addr}"),
            shutdown,
        )
        .await
    })
}
