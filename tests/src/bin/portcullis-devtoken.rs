//! `portcullis-devtoken`: DEVELOPMENT ONLY, a local token issuer so demos
//! and tests need no identity provider (see `tests/src/devtoken.rs`). It is
//! not part of a release: production tokens come from an identity provider.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use portcullis_e2e::devtoken;

#[derive(Parser)]
#[command(
    name = "portcullis-devtoken",
    about = "DEVELOPMENT ONLY: a local token issuer for demos and tests"
)]
struct Cli {
    #[command(subcommand)]
    action: TokenAction,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a development issuer key (issuer.key, mode 0600) and its
    /// public JWKS (jwks.json) in DIR. Never use it in production.
    Keygen {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print a signed access token (RFC 9068) from a development key.
    Mint {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[command(flatten)]
        claims: Box<devtoken::MintClaims>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().action) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-devtoken: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(action: TokenAction) -> anyhow::Result<()> {
    match action {
        TokenAction::Keygen { dir } => {
            let out = devtoken::keygen(&dir)?;
            println!("development issuer key: {}", out.key_path.display());
            println!(
                "public JWKS (tokens.jwks_file): {}",
                out.jwks_path.display()
            );
            println!("kid: {}", out.kid);
            eprintln!(
                "warning: development only; production tokens come from your identity provider"
            );
            Ok(())
        }
        TokenAction::Mint { key, claims } => {
            println!("{}", devtoken::mint(&key, *claims)?);
            Ok(())
        }
    }
}
