//! The portcullis agent: the modules behind the `portcullis` binary.

pub mod accounting;
pub mod admin;
pub mod admission;
pub mod audit;
pub mod budget;
pub mod config;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod enforce;
pub mod findings;
pub mod identity;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod start_files;
