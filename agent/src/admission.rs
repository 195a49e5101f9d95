//! Admission: who may reach a protected service, from where, until when.
//! Tokens (JWT access tokens) are verified, knocks (single-packet
//! authorization) are checked, and verdicts become kernel admissions.

pub mod admitter;
pub mod jwk;
pub mod knock;
pub mod revocations;
pub mod token;
