//! tracing setup: human text or JSON lines (config `agent.log_format`),
//! filtered by RUST_LOG (default info), always to stderr.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Colour only for a person at a terminal, never into files or pipelines.
fn ansi() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

pub fn init(format: &LogFormat) {
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(ansi());
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

pub fn init_plain() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(ansi())
        .try_init();
}
