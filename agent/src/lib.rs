//! The portcullis agent: the modules behind the `portcullis` binary.

pub mod accounting;
pub mod admin;
pub mod admission;
pub mod apply;
pub mod audit;
pub mod collector;
pub mod config;
pub mod demo;
pub mod devtoken;
pub mod identity;
pub mod kernel;
pub mod logging;
pub mod netns;
pub mod nodekey;
pub mod policy;
pub mod runtime;
pub mod start_files;
