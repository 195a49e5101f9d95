//! The portcullis agent: the modules behind the `portcullis` binary.

pub mod config;
pub mod kernel;
