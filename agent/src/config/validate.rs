//! Raw file contents → the typed [`Config`]: defaults, ranges, names and
//! cross-references. Every error names the key (`services[1].port`) and says
//! the fix; the first problem found is reported, section by section.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use portcullis_common::{
    BYTE_COST_SHIFT, DEFAULT_MAX_ADMISSIONS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_KNOCK_SOURCES,
    MAX_IDENTITIES, MAX_SERVICES, MAX_USAGE_SERVICES,
};

use super::raw::{
    RawAccounting, RawAdmission, RawAgent, RawAudit, RawCollector, RawConfig, RawKernel, RawKnock,
    RawLimits, RawPrice, RawService, RawTokens,
};
use super::{
    AccountingSection, Action, AgentSection, AuditSection, CollectorTarget, CollectorTls, Config,
    ConfigError, KernelSection, KnockSection, Limits, LogFormat, ModelAttrs, OnFull, Price,
    Protocol, Service, StaticAdmission, TokensSection, XdpMode, service_id,
};

const DEFAULT_STATS_INTERVAL_MS: u64 = 1_000;
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
const DEFAULT_EVENTS_PER_SEC: u32 = 100;
const MAX_TTL_SECS: i64 = 31_536_000;
const U32_MAX: i64 = u32::MAX as i64;
/// The highest event rate (connections, knocks) whose GCRA cost, 1e9/rate
/// ns, is still non-zero: the kernel reads a zero cost as "unlimited".
const MAX_EVENT_RATE: i64 = 1_000_000_000;
/// The same bound for byte rates, whose cost carries fraction bits.
const MAX_BYTE_RATE: i64 = 1_000_000_000 << BYTE_COST_SHIFT;

/// Validates `raw`; `hostname` is asked only if `agent.node_id` is absent.
pub(super) fn validate(
    raw: RawConfig,
    hostname: impl FnOnce() -> io::Result<String>,
) -> Result<Config, ConfigError> {
    let agent = agent(raw.agent, hostname)?;
    let kernel = kernel(raw.kernel)?;
    let knock = knock(&raw.knock)?;
    let limits = limits("limits", &raw.limits, &Limits::default())?;
    let identities = identities(&raw.identities, &limits)?;
    let services = services(&raw.services, &knock)?;
    let admissions = admissions(&raw.admissions, &services)?;
    check_identity_slots(&identities, &admissions)?;
    let tokens = raw.tokens.as_ref().map(tokens).transpose()?;
    let policy_dir = raw
        .policy
        .as_ref()
        .map(|p| {
            let dir = required(
                "policy.dir",
                p.dir.clone(),
                "name the directory of Cedar policies",
            )?;
            absolute("policy.dir", Some(dir), "/etc/portcullis/policy")
        })
        .transpose()?;
    let audit = audit(&raw.audit)?;
    let accounting = accounting(&raw.accounting)?;
    let control = super::control::validate(&raw.control)?;
    let metrics = super::metrics::validate(&raw.metrics)?;
    let findings = super::findings::validate(&raw.findings)?;
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let budgets = super::budgets::budgets(&raw.budgets, &names)?;
    let cost_control = super::budgets::cost_control(&raw.cost_control)?;
    Ok(Config {
        agent,
        kernel,
        knock,
        limits,
        services,
        identities,
        admissions,
        tokens,
        policy_dir,
        audit,
        accounting,
        control,
        metrics,
        findings,
        budgets,
        cost_control,
    })
}

const MIB: i64 = 1 << 20;

/// `[audit]`. The spool must hold at least a few segments so that trimming
/// acknowledged segments frees space while the active one fills.
fn audit(raw: &RawAudit) -> Result<AuditSection, ConfigError> {
    let spool_max_bytes: u64 = int(
        "audit.spool_max_bytes",
        raw.spool_max_bytes,
        256 * MIB as u64,
        64 * 1024..=1 << 40,
    )?;
    let segment_bytes: u64 = int(
        "audit.segment_bytes",
        raw.segment_bytes,
        (8 * MIB as u64).min(spool_max_bytes / 4),
        4096..=1 << 30,
    )?;
    if segment_bytes.saturating_mul(4) > spool_max_bytes {
        return Err(invalid(
            "audit.segment_bytes",
            format!(
                "{segment_bytes} is more than a quarter of audit.spool_max_bytes \
                 ({spool_max_bytes}); use at most {} or raise spool_max_bytes",
                spool_max_bytes / 4
            ),
        ));
    }
    Ok(AuditSection {
        spool_dir: absolute(
            "audit.spool_dir",
            raw.spool_dir.clone(),
            "/var/lib/portcullis/spool",
        )?,
        spool_max_bytes,
        segment_bytes,
        on_full: raw.on_full.unwrap_or(OnFull::RefuseAdmissions),
        checkpoint_events: int(
            "audit.checkpoint_events",
            raw.checkpoint_events,
            1000,
            1..=1_000_000,
        )?,
        checkpoint_interval: Duration::from_secs(int(
            "audit.checkpoint_secs",
            raw.checkpoint_secs,
            10,
            1..=3600,
        )?),
        report_interval: Duration::from_secs(int(
            "audit.report_interval_secs",
            raw.report_interval_secs,
            10,
            1..=3600,
        )?),
        collector: raw.collector.as_ref().map(collector).transpose()?,
    })
}

/// `[audit.collector]`: events leave the node only over TLS unless the
/// collector is on this host (loopback) or plaintext is explicitly allowed.
fn collector(raw: &RawCollector) -> Result<CollectorTarget, ConfigError> {
    let endpoint = required(
        "audit.collector.endpoint",
        raw.endpoint.clone(),
        "set the collector's URL, e.g. \"https://collector.example:7443\"",
    )?;
    let (scheme, host) = split_endpoint(&endpoint).ok_or_else(|| {
        invalid(
            "audit.collector.endpoint",
            format!(
                "{endpoint:?} is not a collector URL; use \"https://HOST:PORT\" \
                 (or \"http://127.0.0.1:PORT\" for a collector on this host)"
            ),
        )
    })?;
    let allow_plaintext = raw.allow_plaintext.unwrap_or(false);
    let path = |key: &str, v: &Option<String>| {
        v.clone()
            .map(|p| {
                absolute(
                    &format!("audit.collector.{key}"),
                    Some(p),
                    "/etc/portcullis/x.pem",
                )
            })
            .transpose()
    };
    let client_cert = path("client_cert", &raw.client_cert)?;
    let client_key = path("client_key", &raw.client_key)?;
    if client_cert.is_some() != client_key.is_some() {
        return Err(invalid(
            if client_cert.is_some() {
                "audit.collector.client_key"
            } else {
                "audit.collector.client_cert"
            },
            "mTLS needs both client_cert and client_key; set both or neither",
        ));
    }
    let tls = if scheme == "https" {
        let ca_file = required(
            "audit.collector.ca_file",
            path("ca_file", &raw.ca_file)?,
            "name the PEM file of the CA that signed the collector's certificate",
        )?;
        Some(CollectorTls {
            ca_file,
            server_name: raw.server_name.clone(),
            client_cert,
            client_key,
        })
    } else {
        for (key, set) in [
            ("ca_file", raw.ca_file.is_some()),
            ("server_name", raw.server_name.is_some()),
            ("client_cert", client_cert.is_some()),
        ] {
            if set {
                return Err(invalid(
                    format!("audit.collector.{key}"),
                    "is a TLS setting but the endpoint is http://; use an https:// endpoint",
                ));
            }
        }
        if !allow_plaintext && !is_loopback_host(host) {
            return Err(invalid(
                "audit.collector.endpoint",
                format!(
                    "{endpoint:?} sends audit events unencrypted off this host; use https:// \
                     with ca_file, or set allow_plaintext = true if the network is trusted"
                ),
            ));
        }
        None
    };
    Ok(CollectorTarget {
        endpoint,
        tls,
        allow_plaintext,
        batch_max_events: int(
            "audit.collector.batch_max_events",
            raw.batch_max_events,
            1024,
            1..=65_536,
        )?,
    })
}

/// `scheme://host:port` with scheme http or https and a non-zero port:
/// returns (scheme, host without brackets).
fn split_endpoint(url: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|&p| p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty() && !host.contains('/')).then_some((scheme, host))
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `[accounting]`.
fn accounting(raw: &RawAccounting) -> Result<AccountingSection, ConfigError> {
    let currency = raw.currency.clone().unwrap_or_else(|| "USD".to_owned());
    if currency.is_empty()
        || currency.len() > 16
        || currency
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            "accounting.currency",
            format!(
                "{currency:?} is not a currency label; use 1-16 printable characters, e.g. \"USD\""
            ),
        ));
    }
    Ok(AccountingSection {
        ledger: absolute(
            "accounting.ledger",
            raw.ledger.clone(),
            "/var/lib/portcullis/ledger.json",
        )?,
        currency,
    })
}

/// A service's `price` table: integer micro-units, each at most 10^12
/// (a million currency units per connection, MiB, request, million tokens
/// or GPU-hour) so sums stay far from overflow.
fn price(field: &str, raw: &Option<RawPrice>) -> Result<Price, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Price::default());
    };
    let one =
        |name: &str, v: Option<i64>| int(&format!("{field}.{name}"), v, 0, 0..=1_000_000_000_000);
    Ok(Price {
        per_connection_micros: one("per_connection_micros", raw.per_connection_micros)?,
        per_mib_in_micros: one("per_mib_in_micros", raw.per_mib_in_micros)?,
        per_mib_out_micros: one("per_mib_out_micros", raw.per_mib_out_micros)?,
        per_request_micros: one("per_request_micros", raw.per_request_micros)?,
        per_mtok_in_micros: one("per_mtok_in_micros", raw.per_mtok_in_micros)?,
        per_mtok_out_micros: one("per_mtok_out_micros", raw.per_mtok_out_micros)?,
        per_gpu_hour_micros: one("per_gpu_hour_micros", raw.per_gpu_hour_micros)?,
    })
}

fn agent(
    raw: RawAgent,
    hostname: impl FnOnce() -> io::Result<String>,
) -> Result<AgentSection, ConfigError> {
    let node_id = match raw.node_id {
        Some(id) if is_node_id(&id) => id,
        Some(id) => {
            return Err(invalid(
                "agent.node_id",
                format!("{id:?} is not a valid node id; {NODE_ID_RULE}"),
            ));
        }
        None => node_id_from_hostname(hostname)?,
    };
    let interval_ms = int(
        "agent.stats_interval_ms",
        raw.stats_interval_ms,
        DEFAULT_STATS_INTERVAL_MS,
        100..=60_000,
    )?;
    Ok(AgentSection {
        node_id,
        log_format: raw.log_format.unwrap_or(LogFormat::Text),
        stats_interval: Duration::from_millis(interval_ms),
        node_key: absolute(
            "agent.node_key",
            raw.node_key.clone(),
            "/var/lib/portcullis/node.key",
        )?,
    })
}

const NODE_ID_RULE: &str = "use 1-64 characters from A-Z, a-z, 0-9, '.', '_' and '-'";

fn node_id_from_hostname(
    hostname: impl FnOnce() -> io::Result<String>,
) -> Result<String, ConfigError> {
    let name = hostname().map_err(|e| {
        invalid(
            "agent.node_id",
            format!("not set, and the hostname cannot be read ({e}); set node_id"),
        )
    })?;
    let name = name.trim();
    if is_node_id(name) {
        return Ok(name.to_owned());
    }
    Err(invalid(
        "agent.node_id",
        format!(
            "not set, and the hostname {name:?} is not a valid node id; set node_id and {NODE_ID_RULE}"
        ),
    ))
}

fn is_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn kernel(raw: RawKernel) -> Result<KernelSection, ConfigError> {
    Ok(KernelSection {
        interfaces: interfaces(raw.interfaces)?,
        xdp_mode: raw.xdp_mode.unwrap_or(XdpMode::Auto),
        egress: raw.egress.unwrap_or(true),
        pin_dir: absolute("kernel.pin_dir", raw.pin_dir, DEFAULT_PIN_DIR)?,
        bpffs: absolute("kernel.bpffs", raw.bpffs, DEFAULT_BPFFS)?,
        max_flows: int(
            "kernel.max_flows",
            raw.max_flows,
            DEFAULT_MAX_FLOWS,
            1_024..=4_194_304,
        )?,
        max_admissions: int(
            "kernel.max_admissions",
            raw.max_admissions,
            DEFAULT_MAX_ADMISSIONS,
            16..=1_048_576,
        )?,
        max_knock_sources: int(
            "kernel.max_knock_sources",
            raw.max_knock_sources,
            DEFAULT_MAX_KNOCK_SOURCES,
            16..=1_048_576,
        )?,
        events_per_sec: int(
            "kernel.events_per_sec",
            raw.events_per_sec,
            DEFAULT_EVENTS_PER_SEC,
            0..=100_000,
        )?,
        ephemeral_pins: raw.ephemeral_pins.unwrap_or(false),
    })
}

fn interfaces(raw: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let names = raw.ok_or_else(|| {
        invalid(
            "kernel.interfaces",
            "missing; list the network interfaces to guard, e.g. interfaces = [\"eth0\"]",
        )
    })?;
    if names.is_empty() {
        return Err(invalid(
            "kernel.interfaces",
            "the list is empty; name at least one network interface, e.g. [\"eth0\"]",
        ));
    }
    for (i, name) in names.iter().enumerate() {
        let field = format!("kernel.interfaces[{i}]");
        if !is_ifname(name) {
            return Err(invalid(
                field,
                format!(
                    "{name:?} is not a valid interface name; use a name as `ip link` shows it \
                     (1-15 bytes, no '/', ':' or whitespace, not \".\" or \"..\")"
                ),
            ));
        }
        if let Some(first) = names[..i].iter().position(|n| n == name) {
            return Err(invalid(
                field,
                format!(
                    "{name:?} is already listed as kernel.interfaces[{first}]; list each interface once"
                ),
            ));
        }
    }
    Ok(names)
}

/// The kernel's `dev_valid_name()`: 1-15 bytes (IFNAMSIZ with its NUL), not
/// "." or "..", no '/', ':' or whitespace. Control characters are refused
/// too: a NUL would silently cut the name short.
fn is_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| matches!(c, '/' | ':') || c.is_whitespace() || c.is_control())
}

fn absolute(field: &str, raw: Option<String>, default: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(raw.unwrap_or_else(|| default.to_owned()));
    if path.is_absolute() {
        return Ok(path);
    }
    Err(invalid(
        field,
        format!(
            "{:?} is a relative path; use an absolute path such as {default:?}",
            path.display().to_string()
        ),
    ))
}

fn knock(raw: &RawKnock) -> Result<KnockSection, ConfigError> {
    let default = KnockSection::default();
    let port = int("knock.port", raw.port, default.port, 0..=65_535)?;
    // With knocking off (port 0) the rates are unused, so 0 is fine for them.
    let min = i64::from(port != 0);
    Ok(KnockSection {
        port,
        per_source_per_sec: int(
            "knock.per_source_per_sec",
            raw.per_source_per_sec,
            default.per_source_per_sec,
            min..=MAX_EVENT_RATE,
        )?,
        per_source_burst: int(
            "knock.per_source_burst",
            raw.per_source_burst,
            default.per_source_burst,
            min..=U32_MAX,
        )?,
        global_per_sec: int(
            "knock.global_per_sec",
            raw.global_per_sec,
            default.global_per_sec,
            min..=MAX_EVENT_RATE,
        )?,
        global_burst: int(
            "knock.global_burst",
            raw.global_burst,
            default.global_burst,
            min..=U32_MAX,
        )?,
        window: Duration::from_secs(int(
            "knock.window_secs",
            raw.window_secs,
            default.window.as_secs(),
            1..=300,
        )?),
        max_ttl: Duration::from_secs(int(
            "knock.max_ttl_secs",
            raw.max_ttl_secs,
            default.max_ttl.as_secs(),
            1..=86_400,
        )?),
        reply: raw.reply.unwrap_or(default.reply),
    })
}

/// `[tokens]`: the identity provider whose access tokens admit clients.
fn tokens(raw: &RawTokens) -> Result<TokensSection, ConfigError> {
    let text = |key: &str, value: &Option<String>, fix: &str| -> Result<String, ConfigError> {
        let field = format!("tokens.{key}");
        match value {
            Some(v) if !v.trim().is_empty() => Ok(v.clone()),
            Some(_) => Err(invalid(field, format!("is empty; {fix}"))),
            None => Err(invalid(field, format!("missing; {fix}"))),
        }
    };
    let jwks = text(
        "jwks_file",
        &raw.jwks_file,
        "name the JWKS file with the identity provider's public keys",
    )?;
    // "" turns tenants off: a single-tenant deployment says so explicitly.
    let tenant_claim = match raw.tenant_claim.as_deref() {
        None => Some("tenant".to_owned()),
        Some("") => None,
        Some(c) if c.trim() != c || c.len() > 64 => {
            return Err(invalid(
                "tokens.tenant_claim",
                format!(
                    "{c:?} is not a claim name; use 1-64 characters without surrounding \
                     spaces, or \"\" for a deployment without tenants"
                ),
            ));
        }
        Some(c) => Some(c.to_owned()),
    };
    let default_tenant = match raw.default_tenant.as_deref() {
        None => None,
        Some(t) if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) => {
            return Err(invalid(
                "tokens.default_tenant",
                "must be 1-256 characters without control characters (or leave it out to refuse tokens without a tenant)",
            ));
        }
        Some(_) if tenant_claim.is_none() => {
            return Err(invalid(
                "tokens.default_tenant",
                "is set while tokens.tenant_claim = \"\" turns tenants off; remove one of them",
            ));
        }
        Some(t) => Some(t.to_owned()),
    };
    Ok(TokensSection {
        jwks_file: absolute("tokens.jwks_file", Some(jwks), "/etc/portcullis/jwks.json")?,
        issuer: text(
            "issuer",
            &raw.issuer,
            "set the exact `iss` your identity provider puts in tokens",
        )?,
        audience: text(
            "audience",
            &raw.audience,
            "set the `aud` value tokens for this node carry",
        )?,
        // RFC 8725 §3.10 / RFC 7519 §4.1.4: leeway for clock skew, kept small.
        leeway: Duration::from_secs(int("tokens.leeway_secs", raw.leeway_secs, 30, 0..=300)?),
        max_lifetime: Duration::from_secs(int(
            "tokens.max_lifetime_secs",
            raw.max_lifetime_secs,
            3600,
            60..=86_400,
        )?),
        tenant_claim,
        default_tenant,
        require_client_id: raw.require_client_id.unwrap_or(true),
        require_typ: raw.require_typ.unwrap_or(true),
        allow_hs256: raw.allow_hs256.unwrap_or(false),
        revocations_file: raw
            .revocations_file
            .clone()
            .map(|p| {
                absolute(
                    "tokens.revocations_file",
                    Some(p),
                    "/var/lib/portcullis/revocations",
                )
            })
            .transpose()?,
    })
}

/// Resolves one limits table over `base`: `[limits]` over the built-in
/// defaults, or an identity's overrides over `[limits]`. `section` prefixes
/// the field paths.
fn limits(section: &str, raw: &RawLimits, base: &Limits) -> Result<Limits, ConfigError> {
    let field = |key: &str| format!("{section}.{key}");
    let resolved = Limits {
        conn_per_sec: int(
            &field("conn_per_sec"),
            raw.conn_per_sec,
            base.conn_per_sec,
            0..=MAX_EVENT_RATE,
        )?,
        conn_burst: int(
            &field("conn_burst"),
            raw.conn_burst,
            base.conn_burst,
            0..=U32_MAX,
        )?,
        bytes_per_sec: int(
            &field("bytes_per_sec"),
            raw.bytes_per_sec,
            base.bytes_per_sec,
            0..=MAX_BYTE_RATE,
        )?,
        bytes_burst: int(
            &field("bytes_burst"),
            raw.bytes_burst,
            base.bytes_burst,
            0..=i64::MAX,
        )?,
        egress_bytes_per_sec: int(
            &field("egress_bytes_per_sec"),
            raw.egress_bytes_per_sec,
            base.egress_bytes_per_sec,
            0..=MAX_BYTE_RATE,
        )?,
        egress_bytes_burst: int(
            &field("egress_bytes_burst"),
            raw.egress_bytes_burst,
            base.egress_bytes_burst,
            0..=i64::MAX,
        )?,
        max_flows: int(
            &field("max_flows"),
            raw.max_flows,
            base.max_flows,
            0..=4_194_304,
        )?,
    };
    let bursts = [
        (
            "conn",
            u64::from(resolved.conn_per_sec),
            u64::from(resolved.conn_burst),
            raw.conn_burst,
        ),
        (
            "bytes",
            resolved.bytes_per_sec,
            resolved.bytes_burst,
            raw.bytes_burst,
        ),
        (
            "egress_bytes",
            resolved.egress_bytes_per_sec,
            resolved.egress_bytes_burst,
            raw.egress_bytes_burst,
        ),
    ];
    for (kind, rate, burst, written) in bursts {
        if rate != 0 && burst == 0 {
            // An identity may inherit the zero burst from [limits]: say so,
            // or the user looks for a 0 that is not in the identity's table.
            let origin = if written.is_some() {
                ""
            } else {
                " (inherited from [limits])"
            };
            return Err(invalid(
                field(&format!("{kind}_burst")),
                format!(
                    "is 0{origin} while {kind}_per_sec is {rate}; a non-zero rate needs a burst \
                     of at least 1 (or set {kind}_per_sec = 0 for unlimited)"
                ),
            ));
        }
    }
    Ok(resolved)
}

fn identities(
    raw: &BTreeMap<String, RawLimits>,
    base: &Limits,
) -> Result<BTreeMap<String, Limits>, ConfigError> {
    raw.iter()
        .map(|(name, overrides)| {
            let section = format!("identities.{name}");
            check_name(&section, name, "identity")?;
            Ok((name.clone(), limits(&section, overrides, base)?))
        })
        .collect()
}

fn services(raw: &[RawService], knock: &KnockSection) -> Result<Vec<Service>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "services",
            "none defined; add at least one [[services]] table with a name and a port",
        ));
    }
    if raw.len() > MAX_SERVICES as usize {
        return Err(invalid(
            "services",
            format!(
                "{} services defined; at most {MAX_SERVICES} are supported",
                raw.len()
            ),
        ));
    }
    // The kernel counts usage in one small column per service.
    if raw.len() > MAX_USAGE_SERVICES as usize {
        return Err(invalid(
            "services",
            format!(
                "{} services defined; usage is accounted for at most {MAX_USAGE_SERVICES} per node; merge services or split them over nodes",
                raw.len()
            ),
        ));
    }
    let mut services = Vec::with_capacity(raw.len());
    for (i, raw) in raw.iter().enumerate() {
        let service = service(i, raw)?;
        check_service_is_new(i, &service, &services)?;
        check_not_knock_port(i, &service, knock)?;
        services.push(service);
    }
    Ok(services)
}

pub(super) fn service(i: usize, raw: &RawService) -> Result<Service, ConfigError> {
    let field = |key: &str| format!("services[{i}].{key}");
    let name = required(
        &field("name"),
        raw.name.clone(),
        "name the service, e.g. name = \"llm\"",
    )?;
    check_name(&field("name"), &name, "service")?;
    let port = required(
        &field("port"),
        raw.port,
        "set the port the service listens on (1-65535)",
    )?;
    let address = raw
        .address
        .as_deref()
        .map(|text| ip(&field("address"), text))
        .transpose()?;
    Ok(Service {
        id: service_id(&name),
        name,
        protocol: raw.protocol.unwrap_or(Protocol::Tcp),
        port: port_number(&field("port"), port)?,
        address,
        action: raw.action.unwrap_or(Action::Invoke),
        model: ModelAttrs {
            tenant: attr(&field("tenant"), &raw.tenant, "")?,
            version: attr(&field("version"), &raw.version, "1")?,
            sensitivity: attr(&field("sensitivity"), &raw.sensitivity, "internal")?,
            cost_tier: attr(&field("cost_tier"), &raw.cost_tier, "standard")?,
        },
        price: price(&field("price"), &raw.price)?,
        max_sources_per_identity: int(
            &field("max_sources_per_identity"),
            raw.max_sources_per_identity,
            super::DEFAULT_MAX_SOURCES_PER_IDENTITY,
            1..=1_048_576,
        )?,
        mode: raw.mode.unwrap_or_default(),
    })
}

/// Rejects a service that repeats an earlier one's name, id or
/// (protocol, port, address): the kernel tables have room for only one.
pub(super) fn check_service_is_new(
    i: usize,
    new: &Service,
    earlier: &[Service],
) -> Result<(), ConfigError> {
    for (j, old) in earlier.iter().enumerate() {
        if old.name == new.name {
            return Err(invalid(
                format!("services[{i}].name"),
                format!(
                    "{:?} is already the name of services[{j}]; give each service its own name",
                    new.name
                ),
            ));
        }
        if old.id == new.id {
            return Err(invalid(
                format!("services[{i}].name"),
                format!(
                    "{:?} hashes to the same service id as {:?} (services[{j}]); rename one of them",
                    new.name, old.name
                ),
            ));
        }
        if (old.protocol, old.port, old.address) == (new.protocol, new.port, new.address) {
            let on = new
                .address
                .map_or("any address".to_owned(), |a| a.to_string());
            return Err(invalid(
                format!("services[{i}].port"),
                format!(
                    "{} port {} on {on} is already protected by services[{j}] ({:?}); \
                     remove one, or change its port or address",
                    new.protocol, new.port, old.name
                ),
            ));
        }
    }
    Ok(())
}

/// Knock datagrams are UDP to knock.port; a UDP service there would receive
/// them, and the kernel could not tell knocks from service traffic.
pub(super) fn check_not_knock_port(
    i: usize,
    service: &Service,
    knock: &KnockSection,
) -> Result<(), ConfigError> {
    if knock.enabled() && service.protocol == Protocol::Udp && service.port == knock.port {
        return Err(invalid(
            format!("services[{i}].port"),
            format!(
                "udp port {} is the knock port (knock.port); use another port, or move knock.port",
                service.port
            ),
        ));
    }
    Ok(())
}

fn admissions(
    raw: &[RawAdmission],
    services: &[Service],
) -> Result<Vec<StaticAdmission>, ConfigError> {
    let mut admissions: Vec<StaticAdmission> = Vec::with_capacity(raw.len());
    for (i, raw) in raw.iter().enumerate() {
        let new = admission(i, raw, services)?;
        // Same kernel key (source, service, source port): the second would
        // silently overwrite the first.
        let same = |old: &StaticAdmission| {
            (old.source, &old.service, old.source_port)
                == (new.source, &new.service, new.source_port)
        };
        if let Some(j) = admissions.iter().position(same) {
            return Err(invalid(
                format!("admissions[{i}]"),
                format!(
                    "admits the same source, service and source_port as admissions[{j}]; remove one"
                ),
            ));
        }
        admissions.push(new);
    }
    Ok(admissions)
}

fn admission(
    i: usize,
    raw: &RawAdmission,
    services: &[Service],
) -> Result<StaticAdmission, ConfigError> {
    let field = |key: &str| format!("admissions[{i}].{key}");
    let identity = required(
        &field("identity"),
        raw.identity.clone(),
        "name the identity to admit, e.g. identity = \"alice\"",
    )?;
    check_name(&field("identity"), &identity, "identity")?;
    let source = required(
        &field("source"),
        raw.source.as_deref(),
        "give the client's address, e.g. source = \"10.1.0.2\"",
    )?;
    let service = required(
        &field("service"),
        raw.service.clone(),
        "name a [[services]] entry",
    )?;
    if !services.iter().any(|s| s.name == service) {
        let known: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        return Err(invalid(
            field("service"),
            format!(
                "no [[services]] entry is named {service:?}; use one of: {}",
                known.join(", ")
            ),
        ));
    }
    let ttl_secs = required(
        &field("ttl_secs"),
        raw.ttl_secs,
        "set the admission's lifetime in seconds (1-31536000)",
    )?;
    Ok(StaticAdmission {
        identity,
        source: ip(&field("source"), source)?,
        service,
        ttl: Duration::from_secs(int(
            &field("ttl_secs"),
            Some(ttl_secs),
            0,
            1..=MAX_TTL_SECS,
        )?),
        source_port: int(&field("source_port"), raw.source_port, 0, 0..=65_535)?,
    })
}

/// Identities live in a fixed-size kernel array: at least those the config
/// names (overrides and static admissions) must fit in it.
fn check_identity_slots(
    identities: &BTreeMap<String, Limits>,
    admissions: &[StaticAdmission],
) -> Result<(), ConfigError> {
    let mut names: BTreeSet<&str> = identities.keys().map(String::as_str).collect();
    names.extend(admissions.iter().map(|a| a.identity.as_str()));
    if names.len() <= MAX_IDENTITIES as usize {
        return Ok(());
    }
    Err(invalid(
        "identities",
        format!(
            "{} identities are named in [identities] and [[admissions]]; the kernel has {MAX_IDENTITIES} slots, name fewer",
            names.len()
        ),
    ))
}

/// Service and identity names: 1-64 characters a-z 0-9 _ -, starting with a
/// letter, so they are safe in map keys, metric labels and Cedar entity ids.
fn check_name(field: &str, name: &str, kind: &str) -> Result<(), ConfigError> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if valid {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "{name:?} is not a valid {kind} name; use 1-64 characters from a-z, 0-9, '_' and '-', \
             starting with a letter"
        ),
    ))
}

/// Parses an address. IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes plain
/// IPv4: the kernel stores both forms alike, so duplicate checks must too.
fn ip(field: &str, text: &str) -> Result<IpAddr, ConfigError> {
    text.parse::<IpAddr>()
        .map(|a| a.to_canonical())
        .map_err(|_| {
            invalid(
                field,
                format!(
                    "{text:?} is not an IP address; write one IPv4 or IPv6 address such as \
                 \"10.1.0.1\" or \"fd00::1\" (no port, no prefix length)"
                ),
            )
        })
}

fn port_number(field: &str, value: i64) -> Result<u16, ConfigError> {
    u16::try_from(value)
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| invalid(field, format!("{value} is not a valid port; use 1-65535")))
}

/// An optional integer key: `default` when absent, else it must lie in `range`
/// (which callers keep inside `T`'s range).
fn int<T: TryFrom<i64>>(
    field: &str,
    value: Option<i64>,
    default: T,
    range: RangeInclusive<i64>,
) -> Result<T, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    range
        .contains(&value)
        .then(|| T::try_from(value).ok())
        .flatten()
        .ok_or_else(|| {
            invalid(
                field,
                format!(
                    "{value} is out of range; use {}-{}",
                    range.start(),
                    range.end()
                ),
            )
        })
}

/// A short free-text attribute for policies: at most 64 printable
/// characters, so entity data stays small and loggable.
fn attr(field: &str, value: &Option<String>, default: &str) -> Result<String, ConfigError> {
    let v = value.clone().unwrap_or_else(|| default.to_owned());
    if v.len() > 64 || v.chars().any(|c| c.is_control()) {
        return Err(invalid(
            field,
            format!("{v:?} is not a valid attribute; use at most 64 printable characters"),
        ));
    }
    Ok(v)
}

fn required<T>(field: &str, value: Option<T>, fix: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| invalid(field, format!("missing; {fix}")))
}

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}
