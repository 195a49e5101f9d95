//! Knocking on a portcullis node: the datagram codec the node agent shares
//! ([`wire`]), an async client for Rust programs ([`client`]), and the
//! `portcullis knock` command line ([`cli`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use portcullis_knock::{KnockOptions, knock};
//! let node = "192.0.2.10:62201".parse()?;
//! let outcome = knock(&KnockOptions::new(node, "eyJ...", "llm")).await?;
//! println!("admitted until {:?}", outcome.expires_at);
//! # Ok(()) }
//! ```

pub mod cli;
pub mod client;
pub mod wire;

pub use cli::{KnockArgs, run_cli};
pub use client::{
    KnockClient, KnockClientError, KnockOptions, KnockOutcome, KnockReplyError, KnockReplyInfo,
    PopKey, build_knock, decode_reply, knock,
};
pub use wire::*;
