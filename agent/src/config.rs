//! The agent's TOML configuration: parsed with serde (unknown keys are
//! errors), validated, and converted into kernel units.
//!
//! Parsing happens in two steps so each rule lives in one place: `raw`
//! mirrors the file (every key optional) and `validate` turns it into the
//! typed [`Config`], applying defaults and checking ranges, names and
//! cross-references. Every error names the key (`services[1].port`) and
//! says the fix. [`EXAMPLE`] documents every key with its default.

mod budgets;
mod control;
mod edit;
mod findings;
mod gcra;
mod ids;
mod metrics;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis_common::{PROTO_TCP, PROTO_UDP};
use serde::Deserialize;

pub use budgets::{CostControlSection, ExtractionSection};
pub use control::{
    ControlSection, ControlTcp, DEFAULT_SOCKET as DEFAULT_CONTROL_SOCKET, Grantee, Role,
};
pub use edit::ServiceSpec;
pub use findings::FindingsSection;
pub use ids::{fnv1a32, identity_key, service_id};
pub use metrics::MetricsSection;

/// A complete, commented configuration documenting every key with its
/// default (`portcullis agent --print-example-config`, docs/configuration.md).
pub const EXAMPLE: &str = include_str!("config/example.toml");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub agent: AgentSection,
    pub kernel: KernelSection,
    pub knock: KnockSection,
    /// Limits of identities without an override.
    pub limits: Limits,
    pub services: Vec<Service>,
    /// Per-identity limits, already merged over `limits`.
    pub identities: BTreeMap<String, Limits>,
    pub admissions: Vec<StaticAdmission>,
    pub tokens: Option<TokensSection>,
    /// Cedar policy directory; `None`: the built-in "what the token's
    /// scope grants" policy.
    pub policy_dir: Option<PathBuf>,
    pub audit: AuditSection,
    pub accounting: AccountingSection,
    pub control: ControlSection,
    pub metrics: MetricsSection,
    pub findings: FindingsSection,
    /// `[[budgets]]` of the file (the control API adds its own).
    pub budgets: Vec<crate::budget::Budget>,
    pub cost_control: CostControlSection,
}

/// `[audit]`: the local spool every event is written to before anything
/// else sees it, checkpoints, report intervals, and the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSection {
    pub spool_dir: PathBuf,
    /// Bound on the spool (events not yet acknowledged by the collector).
    pub spool_max_bytes: u64,
    /// Size at which the spool starts a new segment file.
    pub segment_bytes: u64,
    pub on_full: OnFull,
    /// A signed checkpoint after this many events...
    pub checkpoint_events: u64,
    /// ...or this long after the previous one, whichever comes first.
    pub checkpoint_interval: Duration,
    /// How often drop summaries and cost reports are emitted.
    pub report_interval: Duration,
    /// Where events are streamed; `None`: they stay in the spool.
    pub collector: Option<CollectorTarget>,
}

/// What the agent does when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Refuse new admissions (each refusal counted and audited once space
    /// returns); existing admissions keep being enforced. Nothing is dropped.
    RefuseAdmissions,
    /// Delete the oldest unsent events and record an explicit gap event.
    DropOldest,
}

impl OnFull {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::RefuseAdmissions => "refuse_admissions",
            OnFull::DropOldest => "drop_oldest",
        }
    }
}

/// `[audit.collector]`: the gRPC endpoint events are streamed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorTarget {
    /// `https://host:port`, or `http://host:port` (loopback only unless
    /// `allow_plaintext`).
    pub endpoint: String,
    pub tls: Option<CollectorTls>,
    pub allow_plaintext: bool,
    /// Most events per batch on the stream.
    pub batch_max_events: usize,
}

/// TLS to the collector (rustls, ring provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorTls {
    /// PEM CA certificate(s) the collector's certificate must chain to.
    pub ca_file: PathBuf,
    /// The name the collector's certificate must carry; default: the
    /// endpoint's host.
    pub server_name: Option<String>,
    /// mTLS: the agent's PEM certificate and key, both or neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// `[accounting]`: where spend to date is kept and in what currency prices
/// are given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountingSection {
    /// Month- and day-to-date spend per identity and tenant, persisted so a
    /// restart neither forgets nor double-counts.
    pub ledger: PathBuf,
    /// Label of the price unit (ISO 4217 code or any 1-16 printable chars).
    pub currency: String,
}

/// A service's price table in integer micro-units of the currency (no
/// floats in money). All zero: usage is counted but costs nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    pub per_connection_micros: u64,
    /// Per MiB (1,048,576 bytes) of request bytes into the service.
    pub per_mib_in_micros: u64,
    /// Per MiB of response bytes out of the service.
    pub per_mib_out_micros: u64,
    /// What a model server reports (`ReportUsage`): per request served,
    pub per_request_micros: u64,
    /// per million prompt tokens in and generated tokens out,
    pub per_mtok_in_micros: u64,
    pub per_mtok_out_micros: u64,
    /// and per GPU-hour (reported in GPU-milliseconds).
    pub per_gpu_hour_micros: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSection {
    pub node_id: String,
    pub log_format: LogFormat,
    pub stats_interval: Duration,
    /// The node's Ed25519 signing key (knock replies, audit checkpoints);
    /// created with mode 0600 when missing.
    pub node_key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSection {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Attach the TC egress program (response accounting and caps).
    pub egress: bool,
    pub pin_dir: PathBuf,
    /// Where to mount bpffs if `pin_dir` is not on one.
    pub bpffs: PathBuf,
    pub max_flows: u32,
    pub max_admissions: u32,
    pub max_knock_sources: u32,
    /// Sampled drop events per CPU per second.
    pub events_per_sec: u32,
    /// Allow pins on a bpf filesystem that dies with the agent's mount
    /// namespace (tests and demos only): enforcement then ends with the
    /// agent. Off, such a start is refused.
    pub ephemeral_pins: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    Auto,
    Native,
    Generic,
}

/// The knock listener and its pre-auth limits (enforced in XDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnockSection {
    /// UDP port; 0 turns knocking off.
    pub port: u16,
    pub per_source_per_sec: u32,
    pub per_source_burst: u32,
    /// Per CPU.
    pub global_per_sec: u32,
    pub global_burst: u32,
    /// A knock's timestamp must lie within this of the agent's clock, and
    /// its nonce is remembered this long.
    pub window: Duration,
    /// Longest admission a knock grants (also capped by the token's expiry).
    pub max_ttl: Duration,
    /// Answer a successful knock with a signed reply (never larger than the
    /// knock). Refusals are always silent.
    pub reply: bool,
}

impl KnockSection {
    pub fn enabled(&self) -> bool {
        self.port != 0
    }
}

impl Default for KnockSection {
    fn default() -> Self {
        KnockSection {
            port: 62_201,
            per_source_per_sec: 5,
            per_source_burst: 10,
            global_per_sec: 2_000,
            global_burst: 200,
            window: Duration::from_secs(30),
            max_ttl: Duration::from_secs(3600),
            reply: true,
        }
    }
}

/// One identity's limits. Rates of 0 are unlimited; bursts count units
/// (connections, bytes) allowed back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub conn_per_sec: u32,
    pub conn_burst: u32,
    pub bytes_per_sec: u64,
    pub bytes_burst: u64,
    pub egress_bytes_per_sec: u64,
    pub egress_bytes_burst: u64,
    /// Flows (connections) the identity may have at once; 0: unlimited.
    pub max_flows: u32,
}

impl Default for Limits {
    /// The defaults of the `[limits]` section.
    fn default() -> Self {
        Limits {
            conn_per_sec: 50,
            conn_burst: 20,
            bytes_per_sec: 0,
            bytes_burst: 1 << 20,
            egress_bytes_per_sec: 0,
            egress_bytes_burst: 1 << 20,
            max_flows: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the kernel programs see it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Only this destination; `None`: every local address. IPv4-mapped IPv6
    /// addresses are stored as IPv4.
    pub address: Option<IpAddr>,
    /// [`service_id`] of the name: stable across restarts, never 0.
    pub id: u32,
    /// What the port carries: the action a token's scope must grant.
    pub action: Action,
    /// The model behind the port, as policies see it (`resource`).
    pub model: ModelAttrs,
    pub price: Price,
    /// Live admissions one identity may hold for this service (distinct
    /// source addresses or flow-scoped ports); a knock beyond it is refused
    /// (`identity_quota`), so one identity cannot fill the node's table.
    pub max_sources_per_identity: u32,
    /// `enforce` (default) or `shadow`: pass what would be dropped, count
    /// it apart (a rollout's dry run). Switchable at run time.
    pub mode: ServiceMode,
}

/// A service's enforcement mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceMode {
    #[default]
    Enforce,
    Shadow,
}

impl ServiceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceMode::Enforce => "enforce",
            ServiceMode::Shadow => "shadow",
        }
    }

    pub fn parse(s: &str) -> Option<ServiceMode> {
        match s {
            "enforce" => Some(ServiceMode::Enforce),
            "shadow" => Some(ServiceMode::Shadow),
            _ => None,
        }
    }
}

/// Default for [`Service::max_sources_per_identity`].
pub const DEFAULT_MAX_SOURCES_PER_IDENTITY: u32 = 64;

/// A service's model attributes for policy (Cedar `Model` entity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAttrs {
    /// Owning tenant; empty: shared by all tenants.
    pub tenant: String,
    pub version: String,
    pub sensitivity: String,
    pub cost_tier: String,
}

/// The ML action a service's port carries (read-only vs inference vs
/// retraining are separate grants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Invoke,
    Read,
    Retrain,
    ExportWeights,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Invoke => "invoke",
            Action::Read => "read",
            Action::Retrain => "retrain",
            Action::ExportWeights => "export_weights",
        }
    }
}

/// How tokens are verified (`[tokens]`): without it nobody can be admitted
/// by knock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokensSection {
    pub jwks_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    pub leeway: Duration,
    pub max_lifetime: Duration,
    /// The claim naming the tenant; `None` (`tenant_claim = ""`): no
    /// tenants, the claim is ignored.
    pub tenant_claim: Option<String>,
    /// The tenant of tokens without the claim; `None`: such tokens are
    /// refused.
    pub default_tenant: Option<String>,
    /// RFC 9068 §2.2 makes `client_id` REQUIRED; off only for identity
    /// providers that omit it.
    pub require_client_id: bool,
    pub require_typ: bool,
    pub allow_hs256: bool,
    /// Revoked `jti`s and subjects, one per line (`jti:ID`, `sub:SUBJECT`),
    /// re-read when it changes; `agent revoke --jti/--subject` appends.
    pub revocations_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAdmission {
    pub identity: String,
    /// IPv4-mapped IPv6 addresses are stored as IPv4.
    pub source: IpAddr,
    /// The name of a configured service.
    pub service: String,
    pub ttl: Duration,
    /// Non-zero: flow-scoped (one 5-tuple, one use).
    pub source_port: u16,
}

/// A configuration error. Messages are self-contained (they name the key and
/// the fix, and include any underlying error), so no `source()` chain is
/// exposed: printing the chain would repeat them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {error}; check the path and its permissions", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// An error in a config file, with the file's path.
    #[error("{}: {error}", path.display())]
    InFile {
        path: PathBuf,
        error: Box<ConfigError>,
    },
    #[error("not valid TOML; fix the syntax where shown:\n{detail}")]
    Syntax { detail: String },
    /// Rejected while deserializing (unknown key, wrong type); `detail` is the
    /// toml crate's text with line and column.
    #[error("{field}: {fix}\n{detail}")]
    Toml {
        field: String,
        fix: &'static str,
        detail: String,
    },
    /// Rejected by validation; `message` says what is wrong and the fix.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    /// The path of the offending key (`services[1].port`), if there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Toml { field, .. } | ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::InFile { error, .. } => error.field(),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

impl Config {
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, system_hostname)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::from_toml_str(&text).map_err(|error| ConfigError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The identity's override, or the `[limits]` defaults.
    pub fn identity_limits(&self, name: &str) -> Limits {
        self.identities.get(name).copied().unwrap_or(self.limits)
    }
}

/// `hostname` supplies the default node id; tests pass a fixed one.
fn parse(text: &str, hostname: impl FnOnce() -> io::Result<String>) -> Result<Config, ConfigError> {
    match raw::parse(text) {
        Ok(r) => validate::validate(r, hostname),
        Err(e) => Err(refine_oversized(text, e)),
    }
}

/// An integer beyond TOML's range: the file is validated again with the
/// nearest i64 in its place, so the error names the field's own range, and
/// the number is shown as written.
fn refine_oversized(text: &str, e: ConfigError) -> ConfigError {
    let Err(te) = toml::from_str::<toml::Table>(text) else {
        return e;
    };
    let Some((field, literal, fixed)) = raw::oversized_integer(text, &te) else {
        return e;
    };
    match raw::parse(&fixed).and_then(|r| validate::validate(r, || Ok("node".into()))) {
        Err(ConfigError::Invalid { field: f, message }) if f == field => ConfigError::Invalid {
            field: f,
            message: message
                .replace(&i64::MAX.to_string(), &literal)
                .replace(&i64::MIN.to_string(), &literal),
        },
        _ => e,
    }
}

fn system_hostname() -> io::Result<String> {
    fs::read_to_string("/proc/sys/kernel/hostname")
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_common::{DEFAULT_MAX_ADMISSIONS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_KNOCK_SOURCES};

    const KERNEL: &str = "[kernel]\ninterfaces = [\"eth0\"]\n";
    const SERVICE: &str = "[[services]]\nname = \"llm\"\nport = 8000\n";

    fn parse_ok(text: &str) -> Config {
        parse(text, || Ok("test-node\n".to_owned())).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text, || Ok("test-node\n".to_owned())) {
            Ok(config) => panic!("accepted:\n{text}\n---\n{config:#?}"),
            Err(e) => e,
        }
    }

    /// The error names `field` first and contains `words` (the fix).
    fn assert_rejects(text: &str, field: &str, words: &str) {
        let error = parse_err(text);
        let message = error.to_string();
        assert_eq!(error.field(), Some(field), "{message}");
        assert!(message.starts_with(&format!("{field}: ")), "{message}");
        assert!(message.contains(words), "{message:?} lacks {words:?}");
    }

    fn minimal() -> Config {
        parse_ok(&format!("{KERNEL}{SERVICE}"))
    }

    /// The example with every optional ("#key" / "#[table]") line enabled.
    fn example_uncommented() -> String {
        EXAMPLE
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => {
                    rest
                }
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn example_parses() {
        let config = parse_ok(EXAMPLE);
        assert_eq!(config.kernel.interfaces, ["eth0"]);
        assert_eq!(config.services[0].name, "llm");
    }

    #[test]
    fn example_optional_settings_parse() {
        let config = parse_ok(&example_uncommented());
        assert_eq!(config.agent.node_id, "node-a");
        assert_eq!(
            config.services[0].address,
            Some("10.1.0.1".parse().unwrap())
        );
        assert_eq!(config.identity_limits("alice").conn_per_sec, 10);
        assert_eq!(config.admissions.len(), 1);
        assert_eq!(config.admissions[0].ttl, Duration::from_secs(3600));
        let tokens = config.tokens.expect("[tokens] in the example");
        assert_eq!(tokens.issuer, "https://idp.example.com");
        assert_eq!(tokens.leeway, Duration::from_secs(30));
        assert!(tokens.require_typ && !tokens.allow_hs256);
        assert_eq!(
            tokens.revocations_file.as_deref(),
            Some(Path::new("/var/lib/portcullis/revocations"))
        );
    }

    const TOKENS: &str =
        "[tokens]\njwks_file = \"/etc/p/jwks.json\"\nissuer = \"https://idp\"\naudience = \"pc\"\n";

    #[test]
    fn tokens_section_requires_issuer_audience_and_jwks() {
        for (drop, field) in [
            ("issuer", "tokens.issuer"),
            ("audience", "tokens.audience"),
            ("jwks_file", "tokens.jwks_file"),
        ] {
            let text: String = TOKENS
                .lines()
                .filter(|l| !l.starts_with(drop))
                .map(|l| format!("{l}\n"))
                .collect();
            let err = Config::from_toml_str(&format!("{KERNEL}{SERVICE}{text}")).unwrap_err();
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(err.to_string().contains("missing"), "{err}");
        }
    }

    #[test]
    fn tokens_leeway_is_bounded_and_paths_absolute() {
        let err = Config::from_toml_str(&format!("{KERNEL}{SERVICE}{TOKENS}leeway_secs = 3600\n"))
            .unwrap_err();
        assert_eq!(err.field(), Some("tokens.leeway_secs"), "{err}");
        let rel = TOKENS.replace("/etc/p/jwks.json", "jwks.json");
        let err = Config::from_toml_str(&format!("{KERNEL}{SERVICE}{rel}")).unwrap_err();
        assert_eq!(err.field(), Some("tokens.jwks_file"), "{err}");
    }

    #[test]
    fn service_action_defaults_to_invoke_and_rejects_unknown() {
        assert_eq!(minimal().services[0].action, Action::Invoke);
        let cfg = parse_ok(&format!("{KERNEL}{SERVICE}action = \"retrain\"\n"));
        assert_eq!(cfg.services[0].action, Action::Retrain);
        let err =
            Config::from_toml_str(&format!("{KERNEL}{SERVICE}action = \"delete\"\n")).unwrap_err();
        assert_eq!(err.field(), Some("services[0].action"), "{err}");
    }

    #[test]
    fn knock_window_and_ttl_are_bounded() {
        for (key, bad) in [
            ("window_secs", 0),
            ("window_secs", 301),
            ("max_ttl_secs", 0),
            ("max_ttl_secs", 86_401),
        ] {
            let err = Config::from_toml_str(&format!("{KERNEL}[knock]\n{key} = {bad}\n{SERVICE}"))
                .unwrap_err();
            assert_eq!(
                err.field().map(str::to_owned),
                Some(format!("knock.{key}")),
                "{err}"
            );
        }
    }

    // The example claims to show the defaults: keep it honest.
    #[test]
    fn example_shows_the_defaults() {
        assert_eq!(parse_ok(EXAMPLE), minimal());
    }

    #[test]
    fn defaults_applied() {
        let config = minimal();
        assert_eq!(config.agent.node_id, "test-node");
        assert_eq!(config.agent.log_format, LogFormat::Text);
        assert_eq!(config.agent.stats_interval, Duration::from_secs(1));
        let kernel = &config.kernel;
        assert_eq!(kernel.xdp_mode, XdpMode::Auto);
        assert!(kernel.egress);
        assert_eq!(kernel.pin_dir, Path::new("/sys/fs/bpf/portcullis"));
        assert_eq!(kernel.bpffs, Path::new("/sys/fs/bpf"));
        assert_eq!(kernel.max_flows, DEFAULT_MAX_FLOWS);
        assert_eq!(kernel.max_admissions, DEFAULT_MAX_ADMISSIONS);
        assert_eq!(kernel.max_knock_sources, DEFAULT_MAX_KNOCK_SOURCES);
        assert_eq!(kernel.events_per_sec, 100);
        assert_eq!(config.knock, KnockSection::default());
        assert_eq!(config.knock.port, 62_201);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.conn_per_sec, 50);
        assert_eq!(config.limits.bytes_burst, 1_048_576);
        let service = &config.services[0];
        assert_eq!(service.protocol, Protocol::Tcp);
        assert_eq!(service.address, None);
        assert_eq!(service.id, service_id("llm"));
        assert!(config.identities.is_empty() && config.admissions.is_empty());
    }

    #[test]
    fn audit_and_accounting_defaults_are_safe() {
        let c = minimal();
        assert_eq!(c.audit.spool_dir, Path::new("/var/lib/portcullis/spool"));
        assert_eq!(c.audit.spool_max_bytes, 256 << 20);
        assert_eq!(c.audit.segment_bytes, 8 << 20);
        assert_eq!(c.audit.on_full, OnFull::RefuseAdmissions);
        assert_eq!(c.audit.checkpoint_events, 1000);
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(10));
        assert_eq!(c.audit.collector, None);
        assert_eq!(c.accounting.currency, "USD");
        assert_eq!(c.services[0].price, Price::default());
    }

    #[test]
    fn collector_plaintext_only_to_loopback_unless_allowed() {
        let base = format!("{KERNEL}{SERVICE}[audit.collector]\n");
        for ok in [
            "http://127.0.0.1:7000",
            "http://[::1]:7000",
            "http://localhost:7000",
        ] {
            let c = parse_ok(&format!("{base}endpoint = \"{ok}\"\n"));
            let t = c.audit.collector.unwrap();
            assert!(t.tls.is_none() && !t.allow_plaintext, "{ok}");
        }
        assert_rejects(
            &format!("{base}endpoint = \"http://10.0.0.9:7000\"\n"),
            "audit.collector.endpoint",
            "allow_plaintext = true",
        );
        parse_ok(&format!(
            "{base}endpoint = \"http://10.0.0.9:7000\"\nallow_plaintext = true\n"
        ));
        assert_rejects(
            &format!("{base}endpoint = \"https://c.example:7443\"\n"),
            "audit.collector.ca_file",
            "PEM file of the CA",
        );
        assert_rejects(
            &format!(
                "{base}endpoint = \"https://c.example:7443\"\nca_file = \"/ca.pem\"\nclient_cert = \"/a.pem\"\n"
            ),
            "audit.collector.client_key",
            "both client_cert and client_key",
        );
        assert_rejects(
            &format!("{base}endpoint = \"http://127.0.0.1:7000\"\nca_file = \"/ca.pem\"\n"),
            "audit.collector.ca_file",
            "use an https:// endpoint",
        );
        for bad in [
            "ftp://x:1",
            "https://x",
            "https://x:0",
            "x:7000",
            "https://:7000",
        ] {
            assert_rejects(
                &format!("{base}endpoint = \"{bad}\"\n"),
                "audit.collector.endpoint",
                "not a collector URL",
            );
        }
    }

    #[test]
    fn spool_sizes_and_prices_are_bounded() {
        assert_rejects(
            &format!("{KERNEL}{SERVICE}[audit]\nspool_max_bytes = 100000\nsegment_bytes = 50000\n"),
            "audit.segment_bytes",
            "at most 25000",
        );
        assert_rejects(
            &format!("{KERNEL}{SERVICE}[audit]\nspool_dir = \"spool\"\n"),
            "audit.spool_dir",
            "absolute path",
        );
        assert_rejects(
            &format!("{KERNEL}{SERVICE}price = {{ per_mib_in_micros = -1 }}\n"),
            "services[0].price.per_mib_in_micros",
            "out of range",
        );
        let c = parse_ok(&format!(
            "{KERNEL}{SERVICE}price = {{ per_connection_micros = 5, per_mib_out_micros = 7, per_mtok_out_micros = 9, per_gpu_hour_micros = 11 }}\n"
        ));
        assert_eq!(
            c.services[0].price,
            Price {
                per_connection_micros: 5,
                per_mib_in_micros: 0,
                per_mib_out_micros: 7,
                per_request_micros: 0,
                per_mtok_in_micros: 0,
                per_mtok_out_micros: 9,
                per_gpu_hour_micros: 11,
            }
        );
        assert_rejects(
            &format!("{KERNEL}{SERVICE}price = {{ per_mtok_in_micros = 1000000000001 }}\n"),
            "services[0].price.per_mtok_in_micros",
            "out of range",
        );
        assert_rejects(
            &format!("{KERNEL}{SERVICE}[accounting]\ncurrency = \"\"\n"),
            "accounting.currency",
            "currency label",
        );
    }

    #[test]
    fn node_id_defaults_to_the_hostname() {
        let text = format!("{KERNEL}{SERVICE}");
        let bad = parse(&text, || Ok("bad host\n".to_owned())).unwrap_err();
        assert_eq!(bad.field(), Some("agent.node_id"));
        assert!(bad.to_string().contains("set node_id"), "{bad}");
        let unreadable = parse(&text, || Err(io::ErrorKind::NotFound.into())).unwrap_err();
        assert_eq!(unreadable.field(), Some("agent.node_id"));
        let explicit = parse(
            &format!("[agent]\nnode_id = \"n1\"\n{text}"),
            || unreachable!(),
        );
        assert_eq!(explicit.unwrap().agent.node_id, "n1");
    }

    #[test]
    fn bad_node_id() {
        let text = format!("[agent]\nnode_id = \"a/b\"\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "agent.node_id", "A-Z, a-z, 0-9");
    }

    #[test]
    fn missing_interfaces() {
        assert_rejects(SERVICE, "kernel.interfaces", "missing");
        assert_rejects(
            &format!("[kernel]\negress = false\n{SERVICE}"),
            "kernel.interfaces",
            "eth0",
        );
    }

    #[test]
    fn empty_interfaces() {
        let text = format!("[kernel]\ninterfaces = []\n{SERVICE}");
        assert_rejects(&text, "kernel.interfaces", "at least one");
    }

    #[test]
    fn bad_ifname() {
        for name in [
            "",
            "sixteen-bytes-xx",
            "a/b",
            "eth0:1",
            "a b",
            "tab\\t",
            "nul\\u0000",
            ".",
            "..",
        ] {
            let text = format!("[kernel]\ninterfaces = [\"eth0\", \"{name}\"]\n{SERVICE}");
            assert_rejects(&text, "kernel.interfaces[1]", "not a valid interface name");
        }
        let ok = parse_ok(&format!(
            "[kernel]\ninterfaces = [\"fifteen-bytes-x\", \"veth.10\"]\n{SERVICE}"
        ));
        assert_eq!(ok.kernel.interfaces.len(), 2);
    }

    #[test]
    fn duplicate_ifname() {
        let text = format!("[kernel]\ninterfaces = [\"eth0\", \"eth1\", \"eth0\"]\n{SERVICE}");
        assert_rejects(&text, "kernel.interfaces[2]", "kernel.interfaces[0]");
    }

    #[test]
    fn bad_xdp_mode() {
        let text = format!("[kernel]\ninterfaces = [\"eth0\"]\nxdp_mode = \"fast\"\n{SERVICE}");
        assert_rejects(&text, "kernel.xdp_mode", "native");
    }

    #[test]
    fn relative_pin_dir() {
        let text = format!("[kernel]\ninterfaces = [\"eth0\"]\npin_dir = \"bpf/pcl\"\n{SERVICE}");
        assert_rejects(&text, "kernel.pin_dir", "absolute path");
        let text = format!("[kernel]\ninterfaces = [\"eth0\"]\nbpffs = \"\"\n{SERVICE}");
        assert_rejects(&text, "kernel.bpffs", "absolute path");
    }

    #[test]
    fn kernel_ranges() {
        for (key, value, range) in [
            ("max_flows", 1023, "1024-4194304"),
            ("max_admissions", 2_000_000, "16-1048576"),
            ("max_knock_sources", 15, "16-1048576"),
            ("events_per_sec", -1, "0-100000"),
        ] {
            let text = format!("[kernel]\ninterfaces = [\"eth0\"]\n{key} = {value}\n{SERVICE}");
            assert_rejects(&text, &format!("kernel.{key}"), range);
        }
        let text = format!("[agent]\nstats_interval_ms = 99\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "agent.stats_interval_ms", "100-60000");
    }

    #[test]
    fn no_services() {
        assert_rejects(KERNEL, "services", "[[services]]");
    }

    #[test]
    fn bad_port_0() {
        let text = format!("{KERNEL}{SERVICE}[[services]]\nname = \"b\"\nport = 0\n");
        assert_rejects(
            &text,
            "services[1].port",
            "0 is not a valid port; use 1-65535",
        );
        let text = format!("{KERNEL}[[services]]\nname = \"b\"\nport = 65536\n");
        assert_rejects(&text, "services[0].port", "use 1-65535");
        assert_rejects(
            &format!("{KERNEL}[[services]]\nname = \"b\"\n"),
            "services[0].port",
            "missing",
        );
    }

    #[test]
    fn duplicate_service() {
        let same_port = format!("{KERNEL}{SERVICE}[[services]]\nname = \"b\"\nport = 8000\n");
        assert_rejects(
            &same_port,
            "services[1].port",
            "already protected by services[0]",
        );
        let same_name = format!("{KERNEL}{SERVICE}[[services]]\nname = \"llm\"\nport = 9000\n");
        assert_rejects(&same_name, "services[1].name", "its own name");
        // IPv4-mapped IPv6 is the same address to the kernel.
        let mapped = format!(
            "{KERNEL}[[services]]\nname = \"a\"\nport = 1\naddress = \"10.0.0.1\"\n\
             [[services]]\nname = \"b\"\nport = 1\naddress = \"::ffff:10.0.0.1\"\n"
        );
        assert_rejects(&mapped, "services[1].port", "10.0.0.1");
    }

    #[test]
    fn services_may_share_a_port_across_protocols_and_addresses() {
        let text = format!(
            "{KERNEL}{SERVICE}[[services]]\nname = \"b\"\nport = 8000\nprotocol = \"udp\"\n\
             [[services]]\nname = \"c\"\nport = 8000\naddress = \"fd00::1\"\n"
        );
        let config = parse_ok(&text);
        assert_eq!(config.services.len(), 3);
        assert_eq!(config.service("b").unwrap().protocol.number(), PROTO_UDP);
        assert_eq!(
            config.service("c").unwrap().address,
            Some("fd00::1".parse().unwrap())
        );
        assert!(config.service("d").is_none());
    }

    #[test]
    fn bad_service_name() {
        for name in ["", "LLM", "9lives", "-x", "a.b", &"a".repeat(65)] {
            let text = format!("{KERNEL}[[services]]\nname = \"{name}\"\nport = 1\n");
            assert_rejects(&text, "services[0].name", "starting with a letter");
        }
        parse_ok(&format!(
            "{KERNEL}[[services]]\nname = \"{}\"\nport = 1\n",
            "a".repeat(64)
        ));
    }

    #[test]
    fn admission_to_unknown_service() {
        let text = format!(
            "{KERNEL}{SERVICE}[[admissions]]\nidentity = \"alice\"\nsource = \"10.0.0.2\"\n\
             service = \"lm\"\nttl_secs = 60\n"
        );
        assert_rejects(&text, "admissions[0].service", "use one of: llm");
    }

    #[test]
    fn admission_fields() {
        let text = format!(
            "{KERNEL}{SERVICE}[[admissions]]\nidentity = \"bob\"\nsource = \"::ffff:10.0.0.2\"\n\
             service = \"llm\"\nttl_secs = 60\nsource_port = 40000\n"
        );
        let admission = &parse_ok(&text).admissions[0];
        assert_eq!(admission.identity, "bob");
        assert_eq!(admission.source, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(admission.ttl, Duration::from_secs(60));
        assert_eq!(admission.source_port, 40_000);
        let missing = format!("{KERNEL}{SERVICE}[[admissions]]\nidentity = \"bob\"\n");
        assert_rejects(&missing, "admissions[0].source", "missing");
        let bad_identity = text.replace("\"bob\"", "\"Bob\"");
        assert_rejects(
            &bad_identity,
            "admissions[0].identity",
            "not a valid identity name",
        );
    }

    #[test]
    fn duplicate_admission() {
        let one = "[[admissions]]\nidentity = \"a\"\nsource = \"10.0.0.2\"\nservice = \"llm\"\nttl_secs = 60\n";
        let other_identity = one.replace("\"a\"", "\"b\"");
        let text = format!("{KERNEL}{SERVICE}{one}{other_identity}");
        assert_rejects(&text, "admissions[1]", "admissions[0]");
        let flow_scoped = format!("{other_identity}source_port = 5\n");
        parse_ok(&format!("{KERNEL}{SERVICE}{one}{flow_scoped}"));
    }

    #[test]
    fn ttl_0() {
        let text = format!(
            "{KERNEL}{SERVICE}[[admissions]]\nidentity = \"a\"\nsource = \"10.0.0.2\"\n\
             service = \"llm\"\nttl_secs = 0\n"
        );
        assert_rejects(&text, "admissions[0].ttl_secs", "1-31536000");
        assert_rejects(
            &text.replace("= 0", "= 31536001"),
            "admissions[0].ttl_secs",
            "1-31536000",
        );
    }

    #[test]
    fn bad_ip_address_text() {
        for text in [
            "10.0.0.256",
            "10.0.0.1/24",
            "10.0.0.1:80",
            "example.com",
            "",
        ] {
            let service =
                format!("{KERNEL}[[services]]\nname = \"a\"\nport = 1\naddress = \"{text}\"\n");
            assert_rejects(&service, "services[0].address", "not an IP address");
            let admission = format!(
                "{KERNEL}{SERVICE}[[admissions]]\nidentity = \"a\"\nsource = \"{text}\"\n\
                 service = \"llm\"\nttl_secs = 1\n"
            );
            assert_rejects(&admission, "admissions[0].source", "not an IP address");
        }
    }

    #[test]
    fn knock_port_clash_with_udp_service() {
        let udp =
            format!("{KERNEL}[[services]]\nname = \"dns\"\nprotocol = \"udp\"\nport = 62201\n");
        assert_rejects(&udp, "services[0].port", "knock port");
        parse_ok(&udp.replace("udp", "tcp"));
        let knock_off = parse_ok(&format!("[knock]\nport = 0\nper_source_per_sec = 0\n{udp}"));
        assert!(!knock_off.knock.enabled());
    }

    #[test]
    fn knock_rates_need_at_least_1_while_enabled() {
        let text = format!("[knock]\nglobal_burst = 0\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "knock.global_burst", "1-4294967295");
        let text = format!("[knock]\nport = 70000\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "knock.port", "0-65535");
    }

    #[test]
    fn rate_with_zero_burst() {
        let text = format!("[limits]\nbytes_per_sec = 1000\nbytes_burst = 0\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "limits.bytes_burst", "at least 1");
        // Unlimited rates need no burst.
        parse_ok(&format!(
            "[limits]\nconn_per_sec = 0\nconn_burst = 0\n{KERNEL}{SERVICE}"
        ));
        // A burst inherited from [limits] is blamed on the identity, saying so.
        let inherited = format!(
            "[limits]\nconn_per_sec = 0\nconn_burst = 0\n[identities.alice]\nconn_per_sec = 5\n{KERNEL}{SERVICE}"
        );
        assert_rejects(
            &inherited,
            "identities.alice.conn_burst",
            "inherited from [limits]",
        );
    }

    #[test]
    fn rate_too_high_to_represent() {
        let text = format!("[limits]\nconn_per_sec = 1000000001\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "limits.conn_per_sec", "out of range");
        let text = format!("[limits]\negress_bytes_per_sec = 65536000000001\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "limits.egress_bytes_per_sec", "out of range");
    }

    #[test]
    fn identity_overrides_inherit_limits() {
        let text = format!(
            "[limits]\nbytes_per_sec = 100\n[identities.alice]\nconn_per_sec = 10\n{KERNEL}{SERVICE}"
        );
        let config = parse_ok(&text);
        let alice = config.identity_limits("alice");
        assert_eq!(alice.conn_per_sec, 10);
        assert_eq!(alice.conn_burst, 20);
        assert_eq!(alice.bytes_per_sec, 100);
        assert_eq!(config.identity_limits("bob"), config.limits);
    }

    #[test]
    fn bad_identity_name() {
        let text = format!("[identities.Alice]\nconn_per_sec = 1\n{KERNEL}{SERVICE}");
        assert_rejects(&text, "identities.Alice", "not a valid identity name");
    }

    #[test]
    fn unknown_field_names_the_section() {
        let cases = [
            (format!("bogus = 1\n{KERNEL}{SERVICE}"), "bogus"),
            (format!("[agnet]\n{KERNEL}{SERVICE}"), "agnet"),
            (
                format!("[agent]\nnodeid = \"x\"\n{KERNEL}{SERVICE}"),
                "agent.nodeid",
            ),
            (format!("{KERNEL}xdp = \"auto\"\n{SERVICE}"), "kernel.xdp"),
            (
                format!("[knock]\nbogus = 1\n{KERNEL}{SERVICE}"),
                "knock.bogus",
            ),
            (
                format!("[limits]\nconn_rate = 1\n{KERNEL}{SERVICE}"),
                "limits.conn_rate",
            ),
            (
                format!("[identities.alice]\nfoo = 1\n{KERNEL}{SERVICE}"),
                "identities.alice.foo",
            ),
            (
                format!("{KERNEL}{SERVICE}{SERVICE}prot = \"tcp\"\n"),
                "services[1].prot",
            ),
            (
                format!("{KERNEL}{SERVICE}[[admissions]]\nttl = 1\n"),
                "admissions[0].ttl",
            ),
        ];
        for (text, field) in cases {
            assert_rejects(&text, field, "remove it or fix its spelling");
            assert!(parse_err(&text).to_string().contains("line "));
        }
    }

    /// With every section present (`[accounting]` and `[audit]` sort
    /// first), each error still blames its own key.
    #[test]
    fn every_section_is_located() {
        const ALL: &str = "[accounting]\ncurrency = \"EUR\"\n[audit]\nspool_dir = \"/var/lib/p\"\n[audit.collector]\nendpoint = \"http://127.0.0.1:7443\"\n[agent]\nnode_id = \"n\"\n[policy]\ndir = \"/etc/p\"\n";
        let cases = [
            (
                format!("{ALL}[knock]\nbogus = 1\n{KERNEL}{SERVICE}"),
                "knock.bogus",
            ),
            (
                format!("{ALL}[kernel]\ninterfaces = \"eth0\"\n{SERVICE}"),
                "kernel.interfaces",
            ),
            (
                format!("{ALL}{KERNEL}[[services]]\nname = \"a\"\nport = 80.5\n"),
                "services[0].port",
            ),
            (format!("{ALL}[foo]\nx = 1\n{KERNEL}{SERVICE}"), "foo"),
            (
                format!("{KERNEL}{SERVICE}[accounting]\nledgr = \"/x\"\n"),
                "accounting.ledgr",
            ),
            (
                format!("{KERNEL}{SERVICE}[audit]\nspool = \"/x\"\n"),
                "audit.spool",
            ),
            (
                format!("{KERNEL}{SERVICE}[audit.collector]\nendpont = \"x\"\n"),
                "audit.collector.endpont",
            ),
            (
                format!("{ALL}{KERNEL}{SERVICE}price = {{ per_gib = 1 }}\n"),
                "services[0].price.per_gib",
            ),
            (
                format!("{ALL}{KERNEL}{SERVICE}[tokens]\nissuer = 5\n"),
                "tokens.issuer",
            ),
        ];
        for (text, field) in cases {
            let e = parse_err(&text);
            assert_eq!(e.field(), Some(field), "{text}\n---\n{e}");
        }
    }

    /// An integer TOML cannot even hold names its key and the key's range,
    /// not "not valid TOML".
    #[test]
    fn integers_beyond_toml_name_their_field() {
        let e = parse_err(&format!(
            "{KERNEL}[[services]]\nname = \"a\"\nport = 99999999999999999999\n"
        ));
        assert_eq!(e.field(), Some("services[0].port"), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("99999999999999999999") && text.contains("1-65535"),
            "{text}"
        );
        let e = parse_err(&format!(
            "{SERVICE}[kernel]\ninterfaces = [\"eth0\"]\nmax_flows = -123456789012345678901 # comment\n"
        ));
        assert_eq!(e.field(), Some("kernel.max_flows"), "{e}");
        assert!(e.to_string().contains("-123456789012345678901"), "{e}");
        // Past TOML and past the field's own range too (bytes_burst takes
        // any i64): still named, with the TOML limit.
        let e = parse_err(&format!(
            "{KERNEL}{SERVICE}[limits]\nbytes_burst = 1_000_000_000_000_000_000_000\n"
        ));
        assert_eq!(e.field(), Some("limits.bytes_burst"), "{e}");
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn wrong_type_is_located_with_line_and_column() {
        let text = format!("{KERNEL}[[services]]\nname = \"a\"\nport = \"8000\"\n");
        assert_rejects(
            &text,
            "services[0].port",
            "TOML parse error at line 5, column 8",
        );
        let text = format!("{KERNEL}[services]\nname = \"a\"\n");
        assert_rejects(&text, "services", "wrong kind of value");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let error = parse_err("[kernel\ninterfaces = [\"eth0\"]\n");
        assert!(matches!(error, ConfigError::Syntax { .. }));
        assert_eq!(error.field(), None);
        assert!(error.to_string().contains("line 1, column"), "{error}");
    }

    #[test]
    fn load_names_the_file() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.toml");
        let error = Config::load(&missing).unwrap_err();
        assert!(
            error.to_string().contains(&*missing.to_string_lossy()),
            "{error}"
        );
        let bad = dir.join("bad.toml");
        fs::write(&bad, "[kernel]\ninterfaces = []\n").unwrap();
        let error = Config::load(&bad).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("{}: kernel.interfaces: ", bad.display()))
        );
        assert_eq!(error.field(), Some("kernel.interfaces"));
        let good = dir.join("good.toml");
        fs::write(&good, EXAMPLE).unwrap();
        assert!(Config::load(&good).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gcra_conversions() {
        let limits = Limits {
            conn_per_sec: 10,
            conn_burst: 20,
            bytes_per_sec: 1_000_000,
            bytes_burst: 1_000_000,
            egress_bytes_per_sec: 0,
            egress_bytes_burst: 5,
            max_flows: 7,
        };
        let gcra = limits.kernel_identity(1);
        assert_eq!((gcra.key, gcra.max_flows), (1, 7));
        assert_eq!(gcra.conn_cost_ns, 100_000_000);
        assert_eq!(gcra.conn_burst_ns, 2_000_000_000);
        assert_eq!(
            gcra.in_byte_cost,
            1_000 << portcullis_common::BYTE_COST_SHIFT
        );
        assert_eq!(gcra.in_burst_ns, 1_000_000_000);
        // Rate 0 is unlimited: zero cost and burst.
        assert_eq!((gcra.out_byte_cost, gcra.out_burst_ns), (0, 0));
        // 3/s rounds down; a huge byte burst saturates rather than wrapping.
        let odd = Limits {
            conn_per_sec: 3,
            conn_burst: u32::MAX,
            bytes_per_sec: 1,
            bytes_burst: u64::MAX,
            ..limits
        }
        .kernel_identity(1);
        assert_eq!(odd.conn_cost_ns, 333_333_333);
        assert_eq!(odd.conn_burst_ns, 333_333_333 * u64::from(u32::MAX));
        assert_eq!(odd.in_byte_cost, 1_000_000_000 << 16);
        assert_eq!(odd.in_burst_ns, u64::MAX);
    }

    #[test]
    fn knock_kernel_config() {
        let config = KnockSection::default().kernel_config(100);
        assert_eq!(config.knock_port, 62_201);
        assert_eq!(config.events_per_sec, 100);
        assert_eq!(config.knock_src_cost_ns, 200_000_000);
        assert_eq!(config.knock_src_burst_ns, 2_000_000_000);
        assert_eq!(config.knock_all_cost_ns, 500_000);
        assert_eq!(config.knock_all_burst_ns, 100_000_000);
        let off = KnockSection {
            port: 0,
            ..KnockSection::default()
        }
        .kernel_config(7);
        let expected = portcullis_common::KernelConfig {
            events_per_sec: 7,
            ..Default::default()
        };
        assert_eq!(off, expected);
    }

    #[test]
    fn fnv_hashes_match_reference_values() {
        assert_eq!(fnv1a32(""), 0x811c_9dc5);
        assert_eq!(fnv1a32("a"), 0xe40c_292c);
        assert_eq!(fnv1a32("foobar"), 0xbf9c_f968);
        assert_eq!(identity_key(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(identity_key("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(identity_key("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn service_ids_are_stable_and_never_0() {
        // Pinned: changing the scheme would orphan admissions in pinned maps.
        assert_eq!(service_id("a"), 0x640c_292d);
        assert_eq!(service_id("llm"), (fnv1a32("llm") & 0x7fff_ffff) | 1);
        for i in 0..10_000 {
            let id = service_id(&format!("svc-{i}"));
            assert_ne!(id, 0);
            assert!(id <= 0x7fff_ffff);
        }
    }
}
