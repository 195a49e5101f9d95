//! The collector's command line: `portcullis collector [enroll]` on a node
//! binary, `portcullis-collector` on its own.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf};

use portcullis_trail::{chain::key_id, keys};

use crate::{
    enroll::enroll,
    options::{CollectorOptions, Output, TlsFiles, TrustMode},
    service::{Listen, check_listen, serve},
    store,
};

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

/// `portcullis collector [enroll]`: logs to stderr (filtered by RUST_LOG,
/// default info).
pub fn run_command(cmd: CollectorCmd) -> anyhow::Result<()> {
    init_logging();
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
            let before = enroll(&dir.join("keys"), &node, key, replace)?;
            let id = key_id(&key);
            match before {
                Some((old, prov)) if old == key => {
                    println!(
                        "enrolled {node} (key {id}; it was on record as {})",
                        prov.as_str()
                    )
                }
                Some((old, _)) => {
                    println!("enrolled {node} with key {id}, replacing {}", key_id(&old))
                }
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

fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
