//! `portcullis-demo [--agent-bin PATH]`: the whole story in two network
//! namespaces on the embedded defaults (see `tests/src/demo.rs`). The node
//! binary is `portcullis` next to this program unless given.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "portcullis-demo",
    about = "A self-contained portcullis demo in network namespaces"
)]
struct Cli {
    /// The `portcullis` node binary (default: next to this program).
    #[arg(long, value_name = "PATH")]
    agent_bin: Option<PathBuf>,
    /// Run straight through without waiting for Enter between chapters
    /// (also when standard input is not a terminal); every step's outcome
    /// is still checked and a failed one makes the exit status 1.
    #[arg(long)]
    non_interactive: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match portcullis_e2e::demo::run(cli.agent_bin, !cli.non_interactive) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
