//! The audit trail: every decision and every unit of cost leaves the node as
//! a hash-chained, signed event (`trail/src/chain.rs`), is appended to a
//! local spool before anything else sees it, and is streamed to a collector
//! that acknowledges what it has persisted.

pub mod auditor;
pub mod drop_marks;
pub mod drops;
pub mod export;
pub mod spool;
