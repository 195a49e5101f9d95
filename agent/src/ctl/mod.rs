//! `portcullis ctl`: the control API's client, one subcommand per call.
//! Human tables by default, `--json` for automation; a refused call exits
//! non-zero with the server's message.

mod budget;
mod fleet;
mod show;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hyper_util::rt::TokioIo;
use portcullis_proto::v1::{self, control_client::ControlClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::DEFAULT_CONTROL_SOCKET as DEFAULT_SOCKET;

#[derive(Args)]
pub struct CtlCmd {
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Call an agent over TCP with mutual TLS instead of the socket:
    /// `https://HOST:PORT` (its `control.listen`).
    #[arg(long, value_name = "URL", global = true, requires_all = ["ca", "cert", "key"])]
    endpoint: Option<String>,
    /// The name the agent's certificate carries, when it is not the
    /// endpoint's host.
    #[arg(long, value_name = "NAME", global = true)]
    server_name: Option<String>,
    /// The CA that signed the agent's certificate (PEM).
    #[arg(long, value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// This client's certificate and key (PEM), signed by the agent's
    /// `control.client_ca`.
    #[arg(long, value_name = "FILE", global = true)]
    cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", global = true)]
    key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Call several agents at once: `NAME=TARGET`, TARGET a control socket
    /// path or `https://HOST:PORT` (with --ca/--cert/--key); repeatable.
    /// Each node's reply is printed under its name; the exit status is 1
    /// if any node failed.
    #[arg(long = "node", value_name = "NAME=TARGET", global = true)]
    nodes: Vec<String>,
    /// Nodes from a file: one `NAME TARGET` per line, `#` comments.
    #[arg(long, value_name = "FILE", global = true)]
    nodes_file: Option<PathBuf>,
    /// With several nodes: how long each node may take.
    #[arg(long, value_name = "SECS", default_value_t = 10, global = true)]
    node_timeout_secs: u64,
    #[command(subcommand)]
    call: Call,
}

#[derive(Subcommand)]
enum Call {
    /// The node at a glance: programs, policy, tables, spool.
    Status,
    /// Admit a client address with the client's token (a gateway's call).
    Admit {
        #[arg(long)]
        service: String,
        /// The client's address.
        #[arg(long, value_name = "ADDR")]
        client: String,
        /// Admit only this source port (one connection); default every port.
        #[arg(long, default_value_t = 0)]
        source_port: u32,
        /// File holding the client's token; `-` reads standard input. (Never
        /// on the command line, where other users can read it.)
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
    },
    /// Revoke admissions now: by identity, token, source, tenant or service.
    Revoke(RevokeArgs),
    /// Live admissions.
    Admissions(ListArgs),
    /// Live flows (connections).
    Flows(ListArgs),
    /// Drop reasons, knock refusals, per-identity counters and spend.
    Stats {
        /// Only this identity (as `ctl stats` lists it).
        #[arg(long)]
        identity: Option<String>,
    },
    /// The protected services and their modes; `set-mode` switches one.
    Services {
        #[command(subcommand)]
        action: Option<ServicesCall>,
    },
    /// The policy set in force, or validate a directory against this node.
    Policy {
        #[command(subcommand)]
        action: PolicyCall,
    },
    /// Report what a model server served an identity (a model server's
    /// call): priced by the service's table into the identity's spend.
    Usage {
        /// `SUBJECT` or `TENANT/SUBJECT`, as `ctl stats` shows it.
        #[arg(long)]
        identity: String,
        #[arg(long)]
        service: String,
        #[arg(long, default_value_t = 0)]
        requests: u64,
        #[arg(long, default_value_t = 0)]
        tokens_in: u64,
        #[arg(long, default_value_t = 0)]
        tokens_out: u64,
        /// GPU time in milliseconds.
        #[arg(long, default_value_t = 0)]
        gpu_ms: u64,
        /// Makes a retry safe: a report id already charged is not charged
        /// again.
        #[arg(long, default_value = "")]
        report_id: String,
    },
    /// Budgets: list, set, remove, approve (docs/cost-control.md).
    Budget {
        #[command(subcommand)]
        action: budget::BudgetCall,
    },
    /// Spend to date with the forecast and the budgets' verdict.
    Spend {
        /// identity, tenant or service.
        #[arg(long, default_value = "identity")]
        by: String,
    },
    /// Stream audit events as they are written.
    Watch {
        /// Event kinds (admission_granted, revocation, ...); repeatable.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        #[arg(long)]
        identity: Option<String>,
        #[arg(long)]
        service: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
struct RevokeArgs {
    /// An identity: `SUBJECT` or `TENANT/SUBJECT`, as `ctl stats` shows it.
    #[arg(long, group = "target")]
    identity: Option<String>,
    /// A token, by its `jti` claim.
    #[arg(long, group = "target")]
    jti: Option<String>,
    /// A client address, from every service.
    #[arg(long, group = "target")]
    source: Option<String>,
    /// Every identity of a tenant.
    #[arg(long, group = "target")]
    tenant: Option<String>,
    /// Every admission to a service.
    #[arg(long, group = "target")]
    service: Option<String>,
    /// Why, for the audit record.
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args)]
struct ListArgs {
    #[arg(long)]
    identity: Option<String>,
    #[arg(long)]
    service: Option<String>,
    #[arg(long)]
    source: Option<String>,
    /// Rows per request (the agent bounds it by control.max_page_size).
    #[arg(long, default_value_t = 0)]
    page_size: u32,
    /// Only the first page.
    #[arg(long)]
    first_page: bool,
}

#[derive(Subcommand)]
enum ServicesCall {
    /// Switch a service between enforce and shadow (operator).
    SetMode {
        #[arg(value_name = "SERVICE")]
        service: String,
        /// `enforce` or `shadow`.
        #[arg(value_name = "MODE")]
        mode: String,
    },
    /// Protect one more service (operator); the keys of a [[services]]
    /// table. Lasts until the agent restarts or SIGHUP re-reads the file.
    Add(AddArgs),
    /// Stop protecting a service (operator); its admissions are cut.
    Remove {
        #[arg(value_name = "SERVICE")]
        service: String,
    },
}

#[derive(Args)]
struct AddArgs {
    #[arg(long)]
    name: String,
    #[arg(long)]
    port: u32,
    /// `tcp` (default) or `udp`.
    #[arg(long, default_value = "")]
    protocol: String,
    /// Only this destination address (default: every local address).
    #[arg(long, default_value = "")]
    address: String,
    /// invoke (default), read, retrain or export.
    #[arg(long, default_value = "")]
    action: String,
    /// enforce (default) or shadow.
    #[arg(long, default_value = "")]
    mode: String,
    #[arg(long, default_value = "")]
    tenant: String,
    #[arg(long, default_value = "")]
    version: String,
    #[arg(long, default_value = "")]
    sensitivity: String,
    #[arg(long, default_value = "")]
    cost_tier: String,
    #[arg(long, default_value_t = 0)]
    max_sources_per_identity: u32,
    /// A price key, e.g. `per_mtok_out_micros=15000000`; repeatable.
    #[arg(long = "price", value_name = "KEY=MICROS", value_parser = price_key)]
    price: Vec<(String, u64)>,
}

fn price_key(s: &str) -> Result<(String, u64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: give KEY=MICROS, e.g. per_mtok_out_micros=15000000"))?;
    let v = v
        .parse()
        .map_err(|_| format!("{s:?}: {v:?} is not a whole number of micro-units"))?;
    Ok((k.to_string(), v))
}

#[derive(Subcommand)]
enum PolicyCall {
    /// Version and ids of the set in force.
    Get,
    /// Validate `*.cedar` (and a `*.cedarschema`) in DIR against this node.
    Validate {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Validate DIR's files, then make them the node's policy set
    /// (operator); an invalid set changes nothing.
    Apply {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Runs one call; errors print the server's message.
pub async fn run(cmd: CtlCmd) -> ExitCode {
    match call(cmd).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis ctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn call(cmd: CtlCmd) -> anyhow::Result<ExitCode> {
    if !cmd.nodes.is_empty() || cmd.nodes_file.is_some() {
        let nodes = fleet::nodes(&cmd.nodes, cmd.nodes_file.as_deref())?;
        match &cmd.call {
            Call::Watch { .. } => {
                bail!("watch streams from one node: give --socket or --endpoint, not --node")
            }
            Call::Admit { token_file, .. } if token_file == Path::new("-") => {
                bail!("--token-file - is read once: with several nodes give a file")
            }
            _ => {}
        }
        let timeout = std::time::Duration::from_secs(cmd.node_timeout_secs.max(1));
        return fleet::run(nodes, cmd.json, timeout).await;
    }
    let mut c = match &cmd.endpoint {
        Some(url) => {
            let file = |flag: &str, p: &Option<PathBuf>| -> anyhow::Result<Vec<u8>> {
                let p = p
                    .as_ref()
                    .with_context(|| format!("--endpoint needs --{flag}"))?;
                std::fs::read(p).with_context(|| format!("--{flag} {}", p.display()))
            };
            connect_tls(
                url,
                cmd.server_name.as_deref(),
                &file("ca", &cmd.ca)?,
                &file("cert", &cmd.cert)?,
                &file("key", &cmd.key)?,
            )
            .await?
        }
        None => connect(&cmd.socket).await?,
    };
    let json = cmd.json;
    match cmd.call {
        Call::Status => {
            let r = c.status(v1::StatusRequest {}).await.map_err(server)?;
            show::status(&r.into_inner(), json);
        }
        Call::Admit {
            service,
            client,
            source_port,
            token_file,
        } => {
            let token = read_token(&token_file)?;
            let r = c
                .admit(v1::AdmitRequest {
                    token,
                    service,
                    client_address: client,
                    source_port,
                })
                .await
                .map_err(server)?;
            show::admitted(&r.into_inner(), json);
        }
        Call::Revoke(a) => {
            use v1::revoke_request::Target;
            let target = if let Some(id) = a.identity {
                Target::Identity(identity_ref(&id))
            } else if let Some(j) = a.jti {
                Target::Jti(j)
            } else if let Some(s) = a.source {
                Target::Source(s)
            } else if let Some(t) = a.tenant {
                Target::Tenant(t)
            } else if let Some(s) = a.service {
                Target::Service(s)
            } else {
                bail!("name what to revoke: --identity, --jti, --source, --tenant or --service");
            };
            let r = c
                .revoke(v1::RevokeRequest {
                    target: Some(target),
                    reason: a.reason,
                })
                .await
                .map_err(server)?;
            show::revoked(&r.into_inner(), json);
        }
        Call::Admissions(a) => {
            let mut rows = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .list_admissions(v1::ListAdmissionsRequest {
                        identity: a.identity.clone().unwrap_or_default(),
                        service: a.service.clone().unwrap_or_default(),
                        source: a.source.clone().unwrap_or_default(),
                        page_size: a.page_size,
                        page_token: token,
                    })
                    .await
                    .map_err(server)?
                    .into_inner();
                rows.extend(r.admissions);
                token = r.next_page_token;
                if token.is_empty() || a.first_page {
                    break;
                }
            }
            show::admissions(&rows, json);
        }
        Call::Flows(a) => {
            let mut rows = Vec::new();
            let mut token = String::new();
            loop {
                let r = c
                    .list_flows(v1::ListFlowsRequest {
                        identity: a.identity.clone().unwrap_or_default(),
                        service: a.service.clone().unwrap_or_default(),
                        source: a.source.clone().unwrap_or_default(),
                        page_size: a.page_size,
                        page_token: token,
                    })
                    .await
                    .map_err(server)?
                    .into_inner();
                rows.extend(r.flows);
                token = r.next_page_token;
                if token.is_empty() || a.first_page {
                    break;
                }
            }
            show::flows(&rows, json);
        }
        Call::Budget { action } => budget::budget(&mut c, action, json).await?,
        Call::Spend { by } => budget::spend(&mut c, by, json).await?,
        Call::Stats { identity } => {
            let r = c
                .stats(v1::StatsRequest {
                    identity: identity.unwrap_or_default(),
                })
                .await
                .map_err(server)?;
            show::stats(&r.into_inner(), json);
        }
        Call::Services { action } => {
            use v1::services_request::Op;
            let edited = matches!(
                action,
                Some(ServicesCall::Add(_) | ServicesCall::Remove { .. })
            );
            let op = match action {
                None => Op::Get(v1::Empty {}),
                Some(ServicesCall::SetMode { service, mode }) => {
                    Op::SetMode(v1::SetMode { service, mode })
                }
                Some(ServicesCall::Add(a)) => Op::Add(Box::new(v1::ServiceSpec {
                    name: a.name,
                    protocol: a.protocol,
                    port: a.port,
                    address: a.address,
                    action: a.action,
                    mode: a.mode,
                    tenant: a.tenant,
                    version: a.version,
                    sensitivity: a.sensitivity,
                    cost_tier: a.cost_tier,
                    max_sources_per_identity: a.max_sources_per_identity,
                    price: a.price.into_iter().collect(),
                })),
                Some(ServicesCall::Remove { service }) => Op::Remove(service),
            };
            let r = c
                .services(v1::ServicesRequest { op: Some(op) })
                .await
                .map_err(server)?;
            show::services(&r.into_inner(), json, edited);
        }
        Call::Policy { action } => {
            use v1::policy_request::Op;
            let op = match action {
                PolicyCall::Get => Op::Get(v1::Empty {}),
                PolicyCall::Validate { dir } => Op::Validate(v1::PolicyFiles {
                    files: policy_dir(&dir)?,
                }),
                PolicyCall::Apply { dir } => Op::Apply(v1::PolicyFiles {
                    files: policy_dir(&dir)?,
                }),
            };
            let r = c
                .policy(v1::PolicyRequest { op: Some(op) })
                .await
                .map_err(server)?
                .into_inner();
            show::policy(&r, json);
            if !r.valid {
                return Ok(ExitCode::from(1));
            }
        }
        Call::Usage {
            identity,
            service,
            requests,
            tokens_in,
            tokens_out,
            gpu_ms,
            report_id,
        } => {
            let r = c
                .report_usage(v1::ReportUsageRequest {
                    identity: Some(identity_ref(&identity)),
                    service,
                    requests,
                    tokens_in,
                    tokens_out,
                    gpu_ms,
                    report_id,
                })
                .await
                .map_err(server)?;
            show::usage(&r.into_inner(), json);
        }
        Call::Watch {
            kinds,
            identity,
            service,
            count,
        } => {
            let mut stream = c
                .watch(v1::WatchRequest {
                    kinds,
                    identity: identity.unwrap_or_default(),
                    service: service.unwrap_or_default(),
                })
                .await
                .map_err(server)?
                .into_inner();
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                match stream.message().await.map_err(server)? {
                    Some(ev) => show::watched(&ev, json),
                    None => break,
                }
                seen += 1;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Dials the control socket. The URI is required by the API and unused.
pub async fn connect(socket: &Path) -> anyhow::Result<ControlClient<Channel>> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://portcullis.control")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach the agent's control socket {} (is the agent running? --socket names another; you need read-write access to it)",
                socket.display()
            )
        })?;
    Ok(ControlClient::new(channel))
}

/// Dials an agent's `control.listen` with mutual TLS.
pub async fn connect_tls(
    url: &str,
    server_name: Option<&str>,
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> anyhow::Result<ControlClient<Channel>> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    let channel = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("--endpoint {url:?} is not a URL; give https://HOST:PORT"))?
        .tls_config(tls)
        .context("TLS settings")?
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the agent at {url} (is control.listen set there? is this client's certificate signed by its control.client_ca, and its own by --ca?)"
            )
        })?;
    Ok(ControlClient::new(channel))
}

/// `TENANT/SUBJECT` or `SUBJECT`, as identities are shown: escaped parts
/// (`agent/src/identity.rs`) are unescaped, so the agent finds the same
/// name. Text no identity shows as is sent as the subject, for the agent
/// to refuse.
fn identity_ref(id: &str) -> v1::IdentityRef {
    match crate::identity::IdentityName::parse(id) {
        Some(n) => v1::IdentityRef {
            tenant: n.tenant.unwrap_or_default(),
            subject: n.subject,
        },
        None => v1::IdentityRef {
            tenant: String::new(),
            subject: id.to_string(),
        },
    }
}

/// The server's refusal, as it said it.
fn server(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the token from standard input")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}", path.display()))?;
    }
    let token = text.trim().to_string();
    if token.is_empty() {
        bail!(
            "--token-file {}: empty; it must hold the client's token",
            path.display()
        );
    }
    Ok(token)
}

/// The `*.cedar` and `*.cedarschema` files of a policy directory.
fn policy_dir(dir: &Path) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut files = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".cedar") || name.ends_with(".cedarschema") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            files.insert(name.to_string(), text);
        }
    }
    if files.is_empty() {
        bail!("{}: no *.cedar files", dir.display());
    }
    Ok(files)
}
