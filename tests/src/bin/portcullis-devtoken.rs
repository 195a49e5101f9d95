//! `portcullis-devtoken`: DEVELOPMENT ONLY, a local token issuer so demos
//! and tests need no identity provider (see `tests/src/devtoken.rs`). It is
//! not part of a release: production tokens come from an identity provider.

use std::{path::PathBuf, process::ExitCode, time::Duration};

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
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        audience: String,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        tenant: Option<String>,
        /// `client_id` (RFC 9068 §2.2); default portcullis-dev.
        #[arg(long)]
        client_id: Option<String>,
        /// Repeatable, e.g. --role analyst.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Repeatable, e.g. --scope model:llm:invoke.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        ttl_secs: u64,
        /// Bind the token to a proof key (RFC 7638 thumbprint, `cnf.jkt`).
        #[arg(long)]
        cnf_jkt: Option<String>,
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
        TokenAction::Mint {
            key,
            issuer,
            audience,
            subject,
            tenant,
            client_id,
            roles,
            scopes,
            ttl_secs,
            cnf_jkt,
        } => {
            let claims = devtoken::MintClaims {
                issuer,
                audience,
                subject,
                tenant,
                client_id,
                roles,
                scopes,
                ttl: Duration::from_secs(ttl_secs),
                cnf_jkt,
            };
            println!("{}", devtoken::mint(&key, claims)?);
            Ok(())
        }
    }
}
