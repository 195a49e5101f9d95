//! `portcullis-collector`: the collector alone, for hosts without BPF. The
//! node binary's `portcullis collector ...` and `portcullis audit ...` are
//! the same commands: `portcullis-collector --listen ... --out DIR`,
//! `portcullis-collector enroll ...`, `portcullis-collector audit verify ...`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis_collector::{
    CollectorAction, CollectorArgs, CollectorCmd, run_command,
    verify_cli::{self, AuditAction},
};

#[derive(Parser)]
#[command(
    name = "portcullis-collector",
    version,
    about = "Receive portcullis agents' audit streams, verify them, write OCSF JSON lines",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    run: CollectorArgs,
}

#[derive(Subcommand)]
enum Action {
    #[command(flatten)]
    Collector(CollectorAction),
    /// Audit trail tools (exit status 0 verified, 1 problems, 2 unreadable).
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let action = match cli.action {
        Some(Action::Audit { action }) => {
            // One-shot: end quietly on a closed pipe, as Unix tools do.
            // SAFETY: restoring a default disposition before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            return verify_cli::run_action(action);
        }
        Some(Action::Collector(a)) => Some(a),
        None => None,
    };
    match run_command(CollectorCmd {
        action,
        run: cli.run,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
