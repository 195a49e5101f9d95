//! `portcullis collector`: receives agents' audit streams, verifies each
//! node's chain, and writes OCSF JSON lines (to rotating files or stdout)
//! for a SIEM to read; and `audit verify`, which checks a trail offline.
//!
//! - [`options`]: what the collector is told;
//! - [`service`]: [`Collector::open`] and [`Collector::serve`];
//! - [`server`]: the gRPC `Collector` service (handshake, batches, acks);
//! - [`store`]: output files, rotation, persisted heads, crash recovery;
//! - [`guard`]: bounded findings about failed handshakes;
//! - [`enroll`]: recording a node's key;
//! - [`evidence`]: `audit verify` over collector output and agent spools;
//! - [`cli`], [`verify_cli`]: the command lines.
//!
//! The trail's format (chain, checks, OCSF, keys) is `portcullis-trail`.
//! Nothing here needs BPF: the collector runs on any Linux host.

pub mod cli;
pub mod enroll;
pub mod evidence;
pub mod guard;
pub mod options;
pub mod server;
pub mod service;
pub mod store;
pub mod verify_cli;

pub use cli::{CollectorAction, CollectorArgs, CollectorCmd, run_command};
pub use options::{CollectorOptions, Output, TlsFiles, TrustMode};
pub use service::{Collector, Listen, Stats, check_listen, serve};
