//! The portcullis agent: the modules behind the `portcullis` binary.

pub mod config;
pub mod kernel;
pub mod netns;
pub mod admin;
pub mod apply;
pub mod demo;
pub mod logging;
pub mod runtime;
