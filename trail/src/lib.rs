//! The portcullis audit-trail format, shared by the node agent that writes
//! the trail and by the collector and `audit verify`, which check it.
//!
//! - [`chain`]: event hashing, sealing, checkpoint and hello messages;
//! - [`verify`]: the chain checks a verifier makes, event by event;
//! - [`ocsf`]: the OCSF mapping of events and findings, as JSON lines;
//! - [`keys`]: pinned and recorded node public keys;
//! - [`node_key`]: the node's Ed25519 signing key and its file;
//! - [`frame`]: the spool segment file format;
//! - [`time`], [`hex`], [`pem`]: the encodings the formats use.

pub mod chain;
pub mod frame;
pub mod hex;
pub mod keys;
pub mod node_key;
pub mod ocsf;
pub mod pem;
pub mod time;
pub mod verify;
