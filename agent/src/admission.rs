//! Admission: who may reach a protected service, from where, until when.
//! Tokens (JWT access tokens) are verified, knocks (single-packet
//! authorization) are checked, and the verdicts are returned as decisions;
//! `agent/src/enforce/` writes them into the kernel.

pub mod admitter;
pub mod grants;
pub mod jwk;
pub mod nonces;
pub mod pop;
pub mod refusal;
pub mod revocations;
pub mod token;
