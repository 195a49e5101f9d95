//! `portcullis`: one binary, subcommands only; the work lives in the library.

use std::{net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use portcullis_agent::{
    admin, admission::revocations::Entry, config::Config, daemon, identity::IdentityName,
};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "eBPF/XDP admission enforcement for model-serving ports"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (loads or adopts the kernel programs and enforces).
    Agent(AgentCmd),
    /// Knock: ask a node to admit this host to a service with a token.
    Knock(portcullis_knock::KnockArgs),
    /// Check and test Cedar policies offline (for policy CI).
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Manage a running agent through its control API.
    Ctl(portcullis_agent::ctl::CtlCmd),
    /// Receive agents' audit streams, verify them, write OCSF JSON lines.
    Collector(portcullis_collector::CollectorCmd),
    /// Audit trail tools (exit status 0 verified, 1 problems, 2 unreadable).
    Audit {
        #[command(subcommand)]
        action: portcullis_collector::verify_cli::AuditAction,
    },
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Parse and validate a policy directory against its schema.
    Validate {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Decide a table of requests and compare with the expected decisions;
    /// exits non-zero on any mismatch.
    Test {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_name = "FILE")]
        requests: PathBuf,
        /// Print one JSON document (every case's decision and policies).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentCmd {
    #[command(subcommand)]
    action: Option<AgentAction>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Written with the origin (fresh/adopted/replaced) once enforcing.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Print a commented example configuration and exit.
    #[arg(long)]
    print_example_config: bool,
}

#[derive(Args)]
struct ConfigArg {
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum AgentAction {
    /// Counters per reason, admissions and flows, read from the pinned maps.
    Status {
        #[command(flatten)]
        c: ConfigArg,
        /// Print one JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Admit a source to a service as an identity (break-glass, root only).
    Admit {
        #[command(flatten)]
        c: ConfigArg,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        source: IpAddr,
        #[arg(long)]
        service: String,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
        ttl_secs: u64,
        /// Non-zero: admit exactly this source port, once.
        #[arg(long, default_value_t = 0)]
        source_port: u16,
    },
    /// Revoke an identity, a source's admissions to a service, a token
    /// (--jti), every token of a subject (--subject) or of a subject in one
    /// tenant (--tenant with --subject).
    #[command(group = clap::ArgGroup::new("what").required(true))]
    Revoke {
        #[command(flatten)]
        c: ConfigArg,
        /// An identity as `agent status` shows it: `alice`, `acme/alice`.
        #[arg(long, group = "what")]
        identity: Option<String>,
        #[arg(long, requires = "service", group = "what")]
        source: Option<IpAddr>,
        #[arg(long, requires = "source")]
        service: Option<String>,
        /// A token's `jti` (recorded in tokens.revocations_file).
        #[arg(long, group = "what")]
        jti: Option<String>,
        /// Every token of this subject (recorded in tokens.revocations_file).
        #[arg(long, group = "what")]
        subject: Option<String>,
        /// With --subject: only the subject's tokens of this tenant.
        #[arg(long, requires = "subject")]
        tenant: Option<String>,
    },
    /// Remove all pinned programs and maps (stops enforcement).
    Detach(ConfigArg),
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if writes_to_a_pipe_and_exits(&cli.command) {
        // Rust ignores SIGPIPE, so `portcullis agent status | head -1`
        // would panic on the closed pipe; a one-shot command should end
        // quietly instead, as other Unix tools do. Daemons (agent,
        // collector) keep ignoring it.
        // SAFETY: restoring a default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if let Command::Audit { action } = cli.command {
        return portcullis_collector::verify_cli::run_action(action);
    }
    if let Command::Ctl(cmd) = cli.command {
        // A client: one thread is plenty.
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(portcullis_agent::ctl::run(cmd)),
            Err(e) => {
                eprintln!("portcullis ctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn writes_to_a_pipe_and_exits(c: &Command) -> bool {
    match c {
        Command::Agent(AgentCmd { action: None, run }) => run.print_example_config,
        Command::Agent(_)
        | Command::Knock(_)
        | Command::Policy { .. }
        | Command::Audit { .. }
        | Command::Ctl(_) => true,
        Command::Collector(_) => false,
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Knock(args) => portcullis_knock::run_cli(args),
        Command::Collector(cmd) => portcullis_collector::run_command(cmd),
        Command::Audit { .. } | Command::Ctl(_) => {
            unreachable!("handled in main: they have their own exit codes")
        }
        Command::Policy {
            action: PolicyAction::Validate { dir },
        } => portcullis_agent::policy::validate_cli(&dir),
        Command::Policy {
            action:
                PolicyAction::Test {
                    dir,
                    requests,
                    json,
                },
        } => portcullis_agent::policy::test_cli(&dir, &requests, json),
        Command::Agent(AgentCmd { action: None, run }) => {
            if run.print_example_config {
                print!("{}", portcullis_agent::config::EXAMPLE);
                return Ok(());
            }
            let Some(path) = run.config else {
                anyhow::bail!("--config FILE is required (see --print-example-config)");
            };
            let cfg = load(&path)?;
            portcullis_agent::logging::init(&cfg.agent.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(
                cfg,
                daemon::RunOptions {
                    ready_file: run.ready_file,
                    config_path: Some(path.clone()),
                },
            ))
        }
        Command::Agent(AgentCmd {
            action: Some(a), ..
        }) => {
            portcullis_agent::logging::init_plain();
            admin::require_root(match &a {
                AgentAction::Status { .. } => "agent status",
                AgentAction::Admit { .. } => "agent admit",
                AgentAction::Revoke { .. } => "agent revoke",
                AgentAction::Detach(_) => "agent detach",
            })?;
            match a {
                AgentAction::Status { c, json } => admin::status(&load(&c.config)?, json),
                AgentAction::Admit {
                    c,
                    identity,
                    source,
                    service,
                    ttl_secs,
                    source_port,
                } => admin::admit(
                    &load(&c.config)?,
                    &identity,
                    source,
                    &service,
                    Duration::from_secs(ttl_secs),
                    source_port,
                ),
                AgentAction::Revoke {
                    c,
                    identity: Some(id),
                    ..
                } => admin::revoke_identity(&load(&c.config)?, &id),
                AgentAction::Revoke {
                    c,
                    source: Some(src),
                    service: Some(svc),
                    ..
                } => admin::revoke_source(&load(&c.config)?, src, &svc),
                AgentAction::Revoke {
                    c, jti: Some(jti), ..
                } => admin::revoke_token(&load(&c.config)?, Entry::Jti(jti)),
                AgentAction::Revoke {
                    c,
                    subject: Some(sub),
                    tenant,
                    ..
                } => admin::revoke_token(
                    &load(&c.config)?,
                    match tenant {
                        Some(t) => Entry::Identity(IdentityName::new(Some(&t), &sub)),
                        None => Entry::Subject(sub),
                    },
                ),
                AgentAction::Revoke { .. } => anyhow::bail!(
                    "give one of --identity NAME, --source IP with --service NAME, --jti ID or --subject NAME"
                ),
                AgentAction::Detach(c) => admin::detach(&load(&c.config)?),
            }
        }
    }
}
