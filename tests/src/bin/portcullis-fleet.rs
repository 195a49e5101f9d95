//! `portcullis-fleet [--nodes N] [--agent-bin PATH]`: several nodes, each
//! with its own agent, one client and one collector, in network namespaces
//! (see `tests/src/fleet.rs`). Exits non-zero if any claim fails.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "portcullis-fleet",
    about = "A portcullis fleet in network namespaces: per-node admission, fleet-wide revocation, one collector"
)]
struct Cli {
    /// Nodes in the fleet (2-8).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The `portcullis` node binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match portcullis_e2e::fleet::run(cli.agent_bin, cli.nodes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-fleet: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
