//! What `portcullis collector` is told: trust, output, TLS files, bounds.

use std::{collections::HashMap, io::Write, path::PathBuf};

use crate::guard;

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
