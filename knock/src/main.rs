//! `portcullis-knock`: the knock client alone, for client machines (the
//! node's `portcullis knock` is the same command).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "portcullis-knock",
    version,
    about = "Ask a portcullis node to admit this host to a service with a token"
)]
struct Cli {
    #[command(flatten)]
    args: portcullis_knock::KnockArgs,
}

fn main() -> ExitCode {
    // A one-shot command: end quietly on a closed pipe, as Unix tools do.
    // SAFETY: restoring a default disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match portcullis_knock::run_cli(Cli::parse().args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-knock: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
