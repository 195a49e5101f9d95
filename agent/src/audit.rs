//! The audit trail: every decision and every unit of cost leaves the node as
//! a hash-chained, signed event (`chain`), is appended to a local spool
//! before anything else sees it, and is streamed to a collector that
//! acknowledges what it has persisted.

pub mod auditor;
pub mod chain;
pub mod drop_marks;
pub mod drops;
pub mod evidence;
pub mod export;
pub mod spool;
pub mod verify;
pub mod verify_cli;
