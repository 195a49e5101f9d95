//! The OCSF mapping: one JSON record per audit event.
//!
//! Every record is an OCSF 1.x event ([`OCSF_VERSION`]) and a deterministic
//! function of the event's canonical bytes alone (no receive time, no
//! collector version), so `portcullis audit verify` can recompute it from
//! `portcullis.raw` and compare it field by field with the line on disk.
//!
//! Classes:
//!
//! | event | OCSF class | activity |
//! |---|---|---|
//! | `AdmissionGranted` | Authentication (3002) | Logon (1), status Success |
//! | `AdmissionDenied` | Authentication (3002) | Logon (1), status Failure |
//! | `DropSummary` | Network Activity (4001) | Refuse (5) |
//! | `ControlCall` | API Activity (6003) | Create/Read/Update/Delete by method, else Other |
//! | `Lifecycle` | Application Lifecycle (6002) | Start (3) / Stop (4) |
//! | collector findings | Detection Finding (2004) | Create (1) |
//! | `Checkpoint`, `CostReport`, `Revocation`, `PolicyChange`, `Gap`, `SpoolPressure` | Portcullis Audit ([`PORTCULLIS_CLASS_UID`]) | see [`PortcullisActivity`] |
//!
//! The custom class "Portcullis Audit" belongs to a private (unregistered)
//! OCSF extension named `portcullis` with extension uid
//! [`PORTCULLIS_EXTENSION_UID`], in the Application Activity category (6):
//! by OCSF's rule (class uid = extension uid times 100000, plus category
//! uid times 1000, plus the class id), its uid is 900 * 100000 + 6 * 1000 +
//! 1 = 90006001. It has the Base Event attributes only; the event's
//! fields are in the `portcullis` object.
//!
//! Every record, whatever its class, carries one attribute outside the core
//! schema, `portcullis` (the `portcullis` extension's attribute):
//!
//! - `record`: `"event"` (an agent's event) or `"finding"` (the collector's);
//! - `mapping`: [`MAPPING_VERSION`], the version of this mapping;
//! - for events: `node_id`, `seq`, `prev_hash` and `hash` (lower-case hex
//!   SHA-256), `raw` (standard base64 of the canonical bytes: the evidence),
//!   and `event`, the decoded event as JSON (bytes fields in hex, enums by
//!   name, 64-bit integers as JSON numbers);
//! - for findings: `finding` (kind, node, seq, message) and, when a received
//!   event is the evidence, its `hash` and `evidence_raw`.
//!
//! Finding records are written by the collector at the time it notices, so
//! their `time` is the collector's clock; they are not recomputed by
//! `audit verify`.

use std::net::IpAddr;

use base64::Engine as _;
use portcullis_proto::v1::{
    AdmissionMethod, ControlCall, DropSummary, Event, Lifecycle, event::Body, lifecycle::Phase,
};
use prost::Message as _;
use serde_json::{Map, Value, json};

use crate::audit::chain::{event_hash, hex};
use crate::audit::verify::{Finding, Severity};

/// The OCSF schema version the records follow.
pub const OCSF_VERSION: &str = "1.7.0";
/// The version of this mapping (`portcullis.mapping`); bumped whenever a
/// record for the same bytes would change.
pub const MAPPING_VERSION: u64 = 1;
/// The private OCSF extension's uid.
pub const PORTCULLIS_EXTENSION_UID: u64 = 900;
/// "Portcullis Audit": the custom class for portcullis-specific events.
pub const PORTCULLIS_CLASS_UID: u64 = PORTCULLIS_EXTENSION_UID * 100_000 + 6 * 1000 + 1;
/// `metadata.log_name` of event records.
pub const EVENT_LOG_NAME: &str = "portcullis.audit";
/// `metadata.log_name` of the collector's findings.
pub const FINDING_LOG_NAME: &str = "portcullis.collector";

const PRODUCT: &str = "portcullis";
const VENDOR: &str = "portcullis";

/// Activities of the Portcullis Audit class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortcullisActivity {
    Checkpoint = 1,
    CostReport = 2,
    Revocation = 3,
    PolicyChange = 4,
    Gap = 5,
    SpoolPressure = 6,
    KeySetChange = 7,
    Other = 99,
}

impl PortcullisActivity {
    pub fn name(self) -> &'static str {
        match self {
            PortcullisActivity::Checkpoint => "Checkpoint",
            PortcullisActivity::CostReport => "Cost Report",
            PortcullisActivity::Revocation => "Revocation",
            PortcullisActivity::PolicyChange => "Policy Change",
            PortcullisActivity::Gap => "Gap",
            PortcullisActivity::SpoolPressure => "Spool Pressure",
            PortcullisActivity::KeySetChange => "Key Set Change",
            PortcullisActivity::Other => "Other",
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Base64 decoding for `portcullis.raw`.
pub fn decode_raw(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(s)
}

/// The record for one event, from its canonical bytes.
pub fn event_record(canonical: &[u8]) -> Result<Value, prost::DecodeError> {
    event_record_trusted(canonical, None)
}

/// [`event_record`] of a node the collector trusts as `trust` (only
/// `"tofu"` shows in the record).
pub fn event_record_trusted(
    canonical: &[u8],
    trust: Option<&str>,
) -> Result<Value, prost::DecodeError> {
    let ev = Event::decode(canonical)?;
    Ok(event_record_of(&ev, canonical, trust))
}

/// The record for `ev`, whose canonical encoding is `canonical`, as a JSON
/// value: the line [`write_event_record`] writes, parsed.
pub fn event_record_of(ev: &Event, canonical: &[u8], trust: Option<&str>) -> Value {
    let mut line = Vec::with_capacity(4096);
    write_event_record(ev, canonical, &event_hash(canonical), trust, &mut line);
    // The writer emits valid JSON (escaped strings, integers only).
    serde_json::from_slice(&line).expect("the OCSF writer emits valid JSON")
}

/// Appends the record for `ev` (canonical encoding `canonical`, whose
/// SHA-256 is `hash`) to `out` as one JSON object, without a newline.
/// `trust`: `Some("tofu")` for a node trusted on first use only, which every
/// record of it then says (`portcullis.trust`).
///
/// This is the mapping: [`event_record`] (what `audit verify` compares
/// with) is this output parsed. Keys are written in a fixed order, so the
/// same bytes always give the same line.
pub fn write_event_record(
    ev: &Event,
    canonical: &[u8],
    hash: &[u8; 32],
    trust: Option<&str>,
    out: &mut Vec<u8>,
) {
    let time_ms = ev.time_unix_ns.div_euclid(1_000_000);
    let class = classify(ev);
    let j = &mut Json::new(out);
    j.obj();
    j.k("class_uid").u(class.class_uid);
    j.k("class_name").s(class.class_name);
    j.k("category_uid").u(class.category_uid);
    j.k("category_name").s(class.category_name);
    j.k("activity_id").u(class.activity_id);
    j.k("activity_name").s(class.activity_name);
    j.k("type_uid").u(class.class_uid * 100 + class.activity_id);
    j.k("type_name")
        .s_parts(&[class.class_name, ": ", class.activity_name]);
    j.k("time").i(time_ms);
    j.k("severity_id").u(class.severity_id);
    j.k("severity").s(severity_name(class.severity_id));
    if let Some((id, detail)) = class.status {
        j.k("status_id").u(id);
        j.k("status").s(if id == 1 { "Success" } else { "Failure" });
        if !detail.is_empty() {
            j.k("status_detail").s(detail);
        }
    }
    j.k("message").s(&class.message);
    j.k("metadata").obj();
    j.k("version").s(OCSF_VERSION);
    j.k("product").obj();
    j.k("name").s(PRODUCT);
    j.k("vendor_name").s(VENDOR);
    j.end();
    j.k("uid").s_node_seq(&ev.node_id, ev.seq);
    j.k("sequence").u(ev.seq);
    j.k("log_name").s(EVENT_LOG_NAME);
    j.end();
    write_attrs(j, &class.attrs);
    j.k("portcullis").obj();
    j.k("record").s("event");
    j.k("mapping").u(MAPPING_VERSION);
    if let Some(t) = trust {
        j.k("trust").s(t);
    }
    j.k("node_id").s(&ev.node_id);
    j.k("seq").u(ev.seq);
    j.k("prev_hash").hex(&ev.prev_hash);
    j.k("hash").hex(hash);
    j.k("raw").b64(canonical);
    j.k("event");
    write_event_json(j, ev);
    j.end();
    j.end();
}

fn severity_name(id: u64) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        5 => "Critical",
        6 => "Fatal",
        99 => "Other",
        _ => "Unknown",
    }
}

struct Class<'a> {
    class_uid: u64,
    class_name: &'static str,
    category_uid: u64,
    category_name: &'static str,
    activity_id: u64,
    activity_name: &'static str,
    severity_id: u64,
    /// (status_id, status_detail)
    status: Option<(u64, &'a str)>,
    message: String,
    attrs: Attrs<'a>,
}

/// The class-specific attributes of a record (after `metadata`).
enum Attrs<'a> {
    None,
    /// Authentication (granted or denied admissions).
    Auth {
        identity: &'a str,
        tenant: &'a str,
        service: &'a str,
        model_version: &'a str,
        source: &'a str,
        source_port: u32,
        method: i32,
        jti_sha256: &'a [u8],
        /// Granted admissions: the session's expiration time.
        expires_unix_ms: Option<i64>,
    },
    Drop {
        s: &'a DropSummary,
        total: u64,
        start_ms: i64,
        end_ms: i64,
    },
    Control(&'a ControlCall),
    Lifecycle(&'a Lifecycle),
}

fn custom<'a>(activity: PortcullisActivity, severity_id: u64, message: String) -> Class<'a> {
    Class {
        class_uid: PORTCULLIS_CLASS_UID,
        class_name: "Portcullis Audit",
        category_uid: 6,
        category_name: "Application Activity",
        activity_id: activity as u64,
        activity_name: activity.name(),
        severity_id,
        status: None,
        message,
        attrs: Attrs::None,
    }
}

fn method_name(m: i32) -> &'static str {
    match AdmissionMethod::try_from(m) {
        Ok(AdmissionMethod::Knock) => "knock",
        Ok(AdmissionMethod::Static) => "static",
        Ok(AdmissionMethod::Control) => "control",
        _ => "unspecified",
    }
}

fn is_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

fn write_attrs(j: &mut Json<'_>, attrs: &Attrs<'_>) {
    match *attrs {
        Attrs::None => {}
        Attrs::Auth {
            identity,
            tenant,
            service,
            model_version,
            source,
            source_port,
            method,
            jti_sha256,
            expires_unix_ms,
        } => {
            j.k("user").obj();
            if identity.is_empty() {
                // OCSF's User needs a name, uid or account.
                j.k("name").s("unknown");
                j.k("type_id").u(0);
                j.k("type").s("Unknown");
            } else {
                j.k("name").s(identity);
                j.k("uid").s(identity);
            }
            if !tenant.is_empty() {
                j.k("org").obj();
                j.k("name").s(tenant);
                j.end();
            }
            j.end();
            j.k("src_endpoint").obj();
            if is_ip(source) {
                j.k("ip").s(source);
            } else if !source.is_empty() {
                j.k("name").s(source);
            }
            if source_port != 0 {
                j.k("port").u(source_port.into());
            }
            j.end();
            j.k("dst_endpoint").obj();
            j.k("svc_name").s(service);
            j.end();
            j.k("service").obj();
            j.k("name").s(service);
            if !model_version.is_empty() {
                j.k("version").s(model_version);
            }
            j.end();
            let (proto_id, proto) = match AdmissionMethod::try_from(method) {
                // A knock carries an OAuth 2.0 access token (RFC 9068).
                Ok(AdmissionMethod::Knock) => (6, "OAUTH 2.0"),
                _ => (99, method_name(method)),
            };
            j.k("auth_protocol_id").u(proto_id);
            j.k("auth_protocol").s(proto);
            j.k("is_remote").b(true);
            if !jti_sha256.is_empty() || expires_unix_ms.is_some() {
                j.k("session").obj();
                if !jti_sha256.is_empty() {
                    j.k("uid").hex(jti_sha256);
                }
                if let Some(t) = expires_unix_ms {
                    j.k("expiration_time").i(t);
                }
                j.end();
            }
        }
        Attrs::Drop {
            s,
            total,
            start_ms,
            end_ms,
        } => {
            j.k("start_time").i(start_ms);
            j.k("end_time").i(end_ms);
            j.k("count").u(total);
            j.k("traffic").obj();
            j.k("packets").u(total);
            j.end();
            if let Some(top) = s.top_sources.first()
                && is_ip(&top.source)
            {
                j.k("src_endpoint").obj();
                j.k("ip").s(&top.source);
                j.end();
            }
            let mut ips = s.top_sources.iter().filter(|t| is_ip(&t.source)).peekable();
            if ips.peek().is_some() {
                j.k("observables").arr();
                for t in ips {
                    j.obj();
                    j.k("name").s("src_endpoint.ip");
                    j.k("type_id").u(2);
                    j.k("type").s("IP Address");
                    j.k("value").s(&t.source);
                    j.end();
                }
                j.end_arr();
            }
        }
        Attrs::Control(c) => {
            j.k("actor").obj();
            j.k("user").obj();
            j.k("name").s(&c.caller);
            if !c.role.is_empty() {
                j.k("groups").arr();
                j.obj();
                j.k("name").s(&c.role);
                j.end();
                j.end_arr();
            }
            j.end();
            j.end();
            j.k("api").obj();
            j.k("operation").s(&c.method);
            j.k("service").obj();
            j.k("name").s("portcullis.v1.Control");
            j.end();
            j.end();
            j.k("src_endpoint").obj();
            j.k("name").s(&c.caller);
            j.end();
        }
        Attrs::Lifecycle(l) => {
            j.k("app").obj();
            j.k("name").s(PRODUCT);
            j.k("vendor_name").s(VENDOR);
            if !l.agent_version.is_empty() {
                j.k("version").s(&l.agent_version);
            }
            j.end();
        }
    }
}

fn classify(ev: &Event) -> Class<'_> {
    let Some(body) = &ev.body else {
        return custom(PortcullisActivity::Other, 1, "event without a body".into());
    };
    match body {
        Body::AdmissionGranted(g) => Class {
            class_uid: 3002,
            class_name: "Authentication",
            category_uid: 3,
            category_name: "Identity & Access Management",
            activity_id: 1,
            activity_name: "Logon",
            severity_id: 1,
            status: Some((1, "")),
            message: format!(
                "admission granted: {} to {} ({}) from {} by {}; policies [{}]",
                g.identity,
                g.service,
                g.action,
                g.source,
                method_name(g.method),
                g.policies.join(", ")
            ),
            attrs: Attrs::Auth {
                identity: &g.identity,
                tenant: &g.tenant,
                service: &g.service,
                model_version: &g.model_version,
                source: &g.source,
                source_port: g.source_port,
                method: g.method,
                jti_sha256: &g.jti_sha256,
                expires_unix_ms: Some(g.expires_unix_ms),
            },
        },
        Body::AdmissionDenied(d) => Class {
            class_uid: 3002,
            class_name: "Authentication",
            category_uid: 3,
            category_name: "Identity & Access Management",
            activity_id: 1,
            activity_name: "Logon",
            severity_id: 2,
            status: Some((2, &d.reason)),
            message: format!(
                "admission denied ({}): {} to {} from {} by {}{}",
                d.reason,
                if d.identity.is_empty() {
                    "unknown identity"
                } else {
                    &d.identity
                },
                d.service,
                d.source,
                method_name(d.method),
                if d.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.detail)
                }
            ),
            attrs: Attrs::Auth {
                identity: &d.identity,
                tenant: &d.tenant,
                service: &d.service,
                model_version: &d.model_version,
                source: &d.source,
                source_port: d.source_port,
                method: d.method,
                jti_sha256: &d.jti_sha256,
                expires_unix_ms: None,
            },
        },
        Body::DropSummary(s) => {
            let total: u64 = s.reasons.iter().map(|r| r.packets).sum();
            let start_ms = s.interval_start_unix_ns.div_euclid(1_000_000);
            let end_ms = start_ms.saturating_add((s.interval_ns / 1_000_000) as i64);
            let reasons: Vec<String> = s
                .reasons
                .iter()
                .map(|r| format!("{} {}", r.reason, r.packets))
                .collect();
            Class {
                class_uid: 4001,
                class_name: "Network Activity",
                category_uid: 4,
                category_name: "Network Activity",
                activity_id: 5,
                activity_name: "Refuse",
                severity_id: 1,
                status: None,
                message: format!(
                    "dropped {total} packets in {} ms: {}",
                    s.interval_ns / 1_000_000,
                    reasons.join(", ")
                ),
                attrs: Attrs::Drop {
                    s,
                    total,
                    start_ms,
                    end_ms,
                },
            }
        }
        Body::ControlCall(c) => {
            let m = c.method.to_ascii_lowercase();
            let (activity_id, activity_name) = if m.starts_with("admit") || m.starts_with("create")
            {
                (1, "Create")
            } else if m.starts_with("list")
                || m.starts_with("get")
                || m.starts_with("stats")
                || m.starts_with("watch")
                || m.starts_with("validate")
                || m.starts_with("usage")
            {
                (2, "Read")
            } else if m.starts_with("apply") || m.starts_with("set") || m.starts_with("update") {
                (3, "Update")
            } else if m.starts_with("revoke") || m.starts_with("delete") {
                (4, "Delete")
            } else {
                (99, "Other")
            };
            let ok = c.allowed && c.outcome == "ok";
            Class {
                class_uid: 6003,
                class_name: "API Activity",
                category_uid: 6,
                category_name: "Application Activity",
                activity_id,
                activity_name,
                severity_id: if c.allowed { 1 } else { 3 },
                status: Some((if ok { 1 } else { 2 }, &c.outcome)),
                message: format!(
                    "control call {} by {} ({}): {}",
                    c.method,
                    c.caller,
                    if c.allowed { "allowed" } else { "refused" },
                    c.outcome
                ),
                attrs: Attrs::Control(c),
            }
        }
        Body::Lifecycle(l) => {
            let started = l.phase == Phase::Started as i32;
            let (activity_id, activity_name) = if started {
                (3, "Start")
            } else if l.phase == Phase::Stopping as i32 {
                (4, "Stop")
            } else {
                (99, "Other")
            };
            Class {
                class_uid: 6002,
                class_name: "Application Lifecycle",
                category_uid: 6,
                category_name: "Application Activity",
                activity_id,
                activity_name,
                severity_id: 1,
                status: Some((1, "")),
                message: format!(
                    "agent {} on node {} ({}); key {}, recovered seq {}",
                    activity_name.to_lowercase(),
                    ev.node_id,
                    l.reason,
                    l.key_id,
                    l.recovered_seq
                ),
                attrs: Attrs::Lifecycle(l),
            }
        }
        Body::Checkpoint(c) => custom(
            PortcullisActivity::Checkpoint,
            1,
            format!(
                "checkpoint at seq {} signed by key {} ({} events since the last)",
                ev.seq, c.key_id, c.events_since_last
            ),
        ),
        Body::CostReport(c) => {
            let total: u64 = c.lines.iter().map(|l| l.cost_micros).sum();
            custom(
                PortcullisActivity::CostReport,
                1,
                format!(
                    "cost report: {} lines, {} {} micro-units in {} ms",
                    c.lines.len(),
                    total,
                    c.currency,
                    c.interval_ns / 1_000_000
                ),
            )
        }
        Body::Revocation(r) => custom(
            PortcullisActivity::Revocation,
            2,
            format!(
                "revoked {} {} ({}): {} admissions removed",
                r.target_kind, r.target, r.reason, r.admissions_removed
            ),
        ),
        Body::PolicyChange(p) => custom(
            PortcullisActivity::PolicyChange,
            if p.accepted { 1 } else { 3 },
            if p.accepted {
                format!(
                    "policy set {} -> {} ({} policies)",
                    p.old_version, p.new_version, p.policies
                )
            } else {
                format!("policy set rejected, {} stays: {}", p.old_version, p.error)
            },
        ),
        Body::Gap(g) => custom(
            PortcullisActivity::Gap,
            3,
            format!(
                "agent dropped events {}..={} unsent ({})",
                g.first_seq, g.last_seq, g.reason
            ),
        ),
        Body::KeySetChange(k) => custom(
            PortcullisActivity::KeySetChange,
            if !k.accepted {
                3
            } else if k.refused.is_empty() {
                1
            } else {
                2
            },
            if k.accepted {
                let refused: Vec<String> = k
                    .refused
                    .iter()
                    .map(|r| format!("#{} kid {:?}: {}", r.index, r.kid, r.reason))
                    .collect();
                format!(
                    "token keys {} loaded: {} in use, {} refused{}{}",
                    k.path,
                    k.keys,
                    k.refused.len(),
                    if refused.is_empty() { "" } else { ": " },
                    refused.join("; ")
                )
            } else {
                format!(
                    "token keys {} rejected, the previous {} keys stay: {}",
                    k.path, k.keys, k.error
                )
            },
        ),
        Body::SpoolPressure(s) => custom(
            PortcullisActivity::SpoolPressure,
            if s.full { 3 } else { 1 },
            format!(
                "spool {} ({} of {} bytes, on_full {}, {} admissions refused)",
                if s.full { "full" } else { "below its bound" },
                s.bytes_used,
                s.bytes_limit,
                s.on_full,
                s.refused_admissions
            ),
        ),
    }
}

/// Writes the decoded event as JSON: the envelope and the body under its
/// field name. Bytes are lower-case hex, enums their names.
fn write_event_json(j: &mut Json<'_>, ev: &Event) {
    j.obj();
    j.k("seq").u(ev.seq);
    j.k("time_unix_ns").i(ev.time_unix_ns);
    j.k("node_id").s(&ev.node_id);
    j.k("prev_hash").hex(&ev.prev_hash);
    j.k("monotonic_ns").u(ev.monotonic_ns);
    match &ev.body {
        None => {
            j.k("body").null();
        }
        Some(Body::Lifecycle(l)) => {
            j.k("lifecycle").obj();
            j.k("phase");
            match Phase::try_from(l.phase) {
                Ok(p) => j.s(p.as_str_name()),
                Err(_) => j.s(&l.phase.to_string()),
            }
            j.k("agent_version").s(&l.agent_version);
            j.k("public_key").hex(&l.public_key);
            j.k("key_id").s(&l.key_id);
            j.k("reason").s(&l.reason);
            j.k("recovered_seq").u(l.recovered_seq);
            j.k("recovered_torn_bytes").u(l.recovered_torn_bytes);
            j.k("policy_version").s(&l.policy_version);
            j.k("ephemeral_pins").b(l.ephemeral_pins);
            j.k("pin_durability").s(&l.pin_durability);
            j.end();
        }
        Some(Body::AdmissionGranted(g)) => {
            j.k("admission_granted").obj();
            j.k("identity").s(&g.identity);
            j.k("tenant").s(&g.tenant);
            j.k("service").s(&g.service);
            j.k("model_version").s(&g.model_version);
            j.k("source").s(&g.source);
            j.k("source_port").u(g.source_port.into());
            j.k("method");
            method_enum(j, g.method);
            j.k("policies").strs(&g.policies);
            j.k("policy_version").s(&g.policy_version);
            j.k("jti_sha256").hex(&g.jti_sha256);
            j.k("expires_unix_ms").i(g.expires_unix_ms);
            j.k("action").s(&g.action);
            j.k("identity_name").s(&g.identity_name);
            j.end();
        }
        Some(Body::AdmissionDenied(d)) => {
            j.k("admission_denied").obj();
            j.k("identity").s(&d.identity);
            j.k("tenant").s(&d.tenant);
            j.k("service").s(&d.service);
            j.k("model_version").s(&d.model_version);
            j.k("source").s(&d.source);
            j.k("source_port").u(d.source_port.into());
            j.k("method");
            method_enum(j, d.method);
            j.k("policies").strs(&d.policies);
            j.k("policy_version").s(&d.policy_version);
            j.k("jti_sha256").hex(&d.jti_sha256);
            j.k("reason").s(&d.reason);
            j.k("detail").s(&d.detail);
            j.k("action").s(&d.action);
            j.k("identity_name").s(&d.identity_name);
            j.end();
        }
        Some(Body::Revocation(r)) => {
            j.k("revocation").obj();
            j.k("target_kind").s(&r.target_kind);
            j.k("target").s(&r.target);
            j.k("reason").s(&r.reason);
            j.k("admissions_removed").u(r.admissions_removed.into());
            j.k("identities").strs(&r.identities);
            j.end();
        }
        Some(Body::PolicyChange(p)) => {
            j.k("policy_change").obj();
            j.k("old_version").s(&p.old_version);
            j.k("new_version").s(&p.new_version);
            j.k("policies").u(p.policies.into());
            j.k("accepted").b(p.accepted);
            j.k("error").s(&p.error);
            j.end();
        }
        Some(Body::DropSummary(s)) => {
            j.k("drop_summary").obj();
            j.k("interval_start_unix_ns").i(s.interval_start_unix_ns);
            j.k("interval_ns").u(s.interval_ns);
            j.k("reasons").arr();
            for r in &s.reasons {
                j.obj();
                j.k("reason").s(&r.reason);
                j.k("packets").u(r.packets);
                j.end();
            }
            j.end_arr();
            j.k("top_sources").arr();
            for t in &s.top_sources {
                j.obj();
                j.k("source").s(&t.source);
                j.k("sampled").u(t.sampled);
                j.k("top_reason").s(&t.top_reason);
                j.end();
            }
            j.end_arr();
            j.k("sampled").u(s.sampled);
            j.k("kernel_totals").arr();
            for r in &s.kernel_totals {
                j.obj();
                j.k("reason").s(&r.reason);
                j.k("packets").u(r.packets);
                j.end();
            }
            j.end_arr();
            j.k("counters_instance").s(&s.counters_instance);
            j.k("since_restart").b(s.since_restart);
            j.k("tables").arr();
            for t in &s.tables {
                j.obj();
                j.k("map").s(&t.map);
                j.k("entries").u(t.entries.into());
                j.k("capacity").u(t.capacity.into());
                j.k("knob").s(&t.knob);
                j.end();
            }
            j.end_arr();
            j.end();
        }
        Some(Body::CostReport(c)) => {
            j.k("cost_report").obj();
            j.k("interval_start_unix_ns").i(c.interval_start_unix_ns);
            j.k("interval_ns").u(c.interval_ns);
            j.k("currency").s(&c.currency);
            j.k("lines").arr();
            for l in &c.lines {
                j.obj();
                j.k("identity").s(&l.identity);
                j.k("tenant").s(&l.tenant);
                j.k("service").s(&l.service);
                j.k("connections").u(l.connections);
                j.k("packets_in").u(l.packets_in);
                j.k("bytes_in").u(l.bytes_in);
                j.k("packets_out").u(l.packets_out);
                j.k("bytes_out").u(l.bytes_out);
                j.k("cost_micros").u(l.cost_micros);
                j.k("identity_month_micros").u(l.identity_month_micros);
                j.k("identity_day_micros").u(l.identity_day_micros);
                j.k("tenant_month_micros").u(l.tenant_month_micros);
                j.end();
            }
            j.end_arr();
            j.k("month").s(&c.month);
            j.k("day").s(&c.day);
            j.end();
        }
        Some(Body::ControlCall(c)) => {
            j.k("control_call").obj();
            j.k("caller").s(&c.caller);
            j.k("role").s(&c.role);
            j.k("method").s(&c.method);
            j.k("request").s(&c.request);
            j.k("allowed").b(c.allowed);
            j.k("outcome").s(&c.outcome);
            j.end();
        }
        Some(Body::Checkpoint(c)) => {
            j.k("checkpoint").obj();
            j.k("signature").hex(&c.signature);
            j.k("key_id").s(&c.key_id);
            j.k("events_since_last").u(c.events_since_last);
            j.end();
        }
        Some(Body::Gap(g)) => {
            j.k("gap").obj();
            j.k("first_seq").u(g.first_seq);
            j.k("last_seq").u(g.last_seq);
            j.k("reason").s(&g.reason);
            j.end();
        }
        Some(Body::KeySetChange(k)) => {
            j.k("key_set_change").obj();
            j.k("path").s(&k.path);
            j.k("keys").u(k.keys.into());
            j.k("refused").arr();
            for r in &k.refused {
                j.obj();
                j.k("kid").s(&r.kid);
                j.k("index").u(r.index.into());
                j.k("reason").s(&r.reason);
                j.end();
            }
            j.end_arr();
            j.k("accepted").b(k.accepted);
            j.k("error").s(&k.error);
            j.end();
        }
        Some(Body::SpoolPressure(s)) => {
            j.k("spool_pressure").obj();
            j.k("full").b(s.full);
            j.k("bytes_used").u(s.bytes_used);
            j.k("bytes_limit").u(s.bytes_limit);
            j.k("refused_admissions").u(s.refused_admissions);
            j.k("on_full").s(&s.on_full);
            j.end();
        }
    }
    j.end();
}

/// An enum by name, or its number (as a string) when unknown.
fn method_enum(j: &mut Json<'_>, m: i32) {
    match AdmissionMethod::try_from(m) {
        Ok(v) => j.s(v.as_str_name()),
        Err(_) => j.s(&m.to_string()),
    }
}

/// Bytes that need escaping in a JSON string (0: none; else the letter of
/// a short escape, or `u` for `\u00XX`), as serde_json escapes them.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// A compact JSON writer appending to a byte buffer: `k(key)` then one
/// value; objects and arrays nest with `obj`/`end` and `arr`/`end_arr`.
/// Keys are trusted literals (written unescaped).
struct Json<'a> {
    out: &'a mut Vec<u8>,
    /// A value was just completed at this level: the next needs a comma.
    comma: bool,
}

impl<'a> Json<'a> {
    fn new(out: &'a mut Vec<u8>) -> Json<'a> {
        Json { out, comma: false }
    }

    fn sep(&mut self) {
        if self.comma {
            self.out.push(b',');
        }
    }

    fn k(&mut self, key: &str) -> &mut Self {
        self.sep();
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.comma = false;
        self
    }

    fn obj(&mut self) {
        self.sep();
        self.out.push(b'{');
        self.comma = false;
    }

    fn end(&mut self) {
        self.out.push(b'}');
        self.comma = true;
    }

    fn arr(&mut self) {
        self.sep();
        self.out.push(b'[');
        self.comma = false;
    }

    fn end_arr(&mut self) {
        self.out.push(b']');
        self.comma = true;
    }

    fn null(&mut self) {
        self.sep();
        self.out.extend_from_slice(b"null");
        self.comma = true;
    }

    fn b(&mut self, v: bool) {
        self.sep();
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        self.comma = true;
    }

    fn digits(&mut self, mut v: u64) {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.out.extend_from_slice(&tmp[i..]);
    }

    fn u(&mut self, v: u64) {
        self.sep();
        self.digits(v);
        self.comma = true;
    }

    fn i(&mut self, v: i64) {
        self.sep();
        if v < 0 {
            self.out.push(b'-');
        }
        self.digits(v.unsigned_abs());
        self.comma = true;
    }

    /// The inside of a string (no quotes), escaped.
    fn escaped(&mut self, s: &str) {
        let bytes = s.as_bytes();
        let mut start = 0;
        for (i, &c) in bytes.iter().enumerate() {
            let e = ESCAPE[c as usize];
            if e == 0 {
                continue;
            }
            self.out.extend_from_slice(&bytes[start..i]);
            if e == b'u' {
                self.out.extend_from_slice(b"\\u00");
                self.out.push(HEX_DIGITS[(c >> 4) as usize]);
                self.out.push(HEX_DIGITS[(c & 0xf) as usize]);
            } else {
                self.out.extend_from_slice(&[b'\\', e]);
            }
            start = i + 1;
        }
        self.out.extend_from_slice(&bytes[start..]);
    }

    fn s(&mut self, s: &str) {
        self.s_parts(&[s]);
    }

    /// One string made of `parts`.
    fn s_parts(&mut self, parts: &[&str]) {
        self.sep();
        self.out.push(b'"');
        for p in parts {
            self.escaped(p);
        }
        self.out.push(b'"');
        self.comma = true;
    }

    /// `"NODE/SEQ"`.
    fn s_node_seq(&mut self, node: &str, seq: u64) {
        self.sep();
        self.out.push(b'"');
        self.escaped(node);
        self.out.push(b'/');
        self.digits(seq);
        self.out.push(b'"');
        self.comma = true;
    }

    fn strs(&mut self, v: &[String]) {
        self.arr();
        for s in v {
            self.s(s);
        }
        self.end_arr();
    }

    /// Lower-case hex, as a string.
    fn hex(&mut self, bytes: &[u8]) {
        self.sep();
        self.out.reserve(bytes.len() * 2 + 2);
        self.out.push(b'"');
        for &b in bytes {
            self.out.push(HEX_DIGITS[(b >> 4) as usize]);
            self.out.push(HEX_DIGITS[(b & 0xf) as usize]);
        }
        self.out.push(b'"');
        self.comma = true;
    }

    /// Standard base64 (padded), as a string.
    fn b64(&mut self, bytes: &[u8]) {
        self.sep();
        self.out.push(b'"');
        let at = self.out.len();
        let n = base64::encoded_len(bytes.len(), true).expect("a batch event is far below usize");
        self.out.resize(at + n, 0);
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(bytes, &mut self.out[at..])
            .expect("sized by encoded_len");
        self.out.truncate(at + written);
        self.out.push(b'"');
        self.comma = true;
    }
}

/// A Detection Finding (2004) for something the collector noticed.
/// `time_ms` is the collector's clock; `peer` the connection's address;
/// `evidence` the received bytes the finding is about, if any.
pub fn finding_record(
    f: &Finding,
    time_ms: i64,
    peer: Option<IpAddr>,
    evidence: Option<&[u8]>,
) -> Value {
    let severity_id = match f.kind.severity() {
        Severity::Error => 4,
        Severity::Warning => 2,
        Severity::Info => 1,
    };
    let uid = format!("{}/{}/{}", f.node_id, f.seq, f.kind);
    let mut r = Map::new();
    r.insert("class_uid".into(), json!(2004));
    r.insert("class_name".into(), json!("Detection Finding"));
    r.insert("category_uid".into(), json!(2));
    r.insert("category_name".into(), json!("Findings"));
    r.insert("activity_id".into(), json!(1));
    r.insert("activity_name".into(), json!("Create"));
    r.insert("type_uid".into(), json!(200401));
    r.insert("type_name".into(), json!("Detection Finding: Create"));
    r.insert("time".into(), json!(time_ms));
    r.insert("severity_id".into(), json!(severity_id));
    r.insert("severity".into(), json!(severity_name(severity_id)));
    r.insert("status_id".into(), json!(1));
    r.insert("status".into(), json!("New"));
    r.insert("message".into(), json!(f.to_string()));
    r.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": {"name": PRODUCT, "vendor_name": VENDOR},
            "uid": uid,
            "log_name": FINDING_LOG_NAME,
        }),
    );
    r.insert(
        "finding_info".into(),
        json!({
            "uid": uid,
            "title": format!("portcullis audit chain: {}", f.kind),
            "desc": f.message,
            "types": [f.kind.as_str()],
        }),
    );
    if let Some(ip) = peer {
        r.insert(
            "evidences".into(),
            json!([{"src_endpoint": {"ip": ip.to_string()}}]),
        );
    }
    let mut p = Map::new();
    p.insert("record".into(), json!("finding"));
    p.insert("mapping".into(), json!(MAPPING_VERSION));
    p.insert(
        "finding".into(),
        json!({
            "kind": f.kind.as_str(),
            "node_id": f.node_id,
            "seq": f.seq,
            "message": f.message,
        }),
    );
    if let Some(bytes) = evidence {
        p.insert("hash".into(), json!(hex(&event_hash(bytes))));
        p.insert("evidence_raw".into(), json!(b64(bytes)));
    }
    r.insert("portcullis".into(), Value::Object(p));
    Value::Object(r)
}

/// The first place two JSON values differ, as a JSON path (`$.a.b[2]`),
/// with both values there; `None` when equal.
pub fn first_difference(found: &Value, expected: &Value) -> Option<(String, Value, Value)> {
    fn walk(path: &mut String, a: &Value, b: &Value) -> Option<(String, Value, Value)> {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                for (k, vb) in y {
                    let len = path.len();
                    path.push('.');
                    path.push_str(k);
                    let r = match x.get(k) {
                        None => Some((path.clone(), Value::Null, vb.clone())),
                        Some(va) => walk(path, va, vb),
                    };
                    if r.is_some() {
                        return r;
                    }
                    path.truncate(len);
                }
                for (k, va) in x {
                    if !y.contains_key(k) {
                        return Some((format!("{path}.{k}"), va.clone(), Value::Null));
                    }
                }
                None
            }
            (Value::Array(x), Value::Array(y)) => {
                for i in 0..x.len().max(y.len()) {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    let r = match (x.get(i), y.get(i)) {
                        (Some(va), Some(vb)) => walk(path, va, vb),
                        (va, vb) => Some((
                            path.clone(),
                            va.cloned().unwrap_or(Value::Null),
                            vb.cloned().unwrap_or(Value::Null),
                        )),
                    };
                    if r.is_some() {
                        return r;
                    }
                    path.truncate(len);
                }
                None
            }
            _ if a == b => None,
            _ => Some((path.clone(), a.clone(), b.clone())),
        }
    }
    walk(&mut "$".to_owned(), found, expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_proto::v1::{
        AdmissionDenied, AdmissionGranted, Checkpoint, ControlCall, CostLine, CostReport,
        DropSummary, Gap, Lifecycle, PolicyChange, ReasonCount, Revocation, SourceCount,
        SpoolPressure,
    };

    const TRICKY: &str = "q\"uo\\te \u{1} \n\t\r\u{8}\u{c}\u{1f}\u{7f} é 雪 😀 </script>";

    fn ev(seq: u64, time_unix_ns: i64, body: Body) -> Event {
        Event {
            seq,
            time_unix_ns,
            node_id: "node-1".into(),
            prev_hash: (0..32u8).collect(),
            monotonic_ns: 12_345,
            body: Some(body),
        }
    }

    /// Events of every kind, with empty, odd and extreme values.
    pub(super) fn samples() -> Vec<Event> {
        let mut v = Vec::new();
        for (t, s) in [(1_800_000_000_123_456_789i64, ""), (-1_500_000, TRICKY)] {
            let s = s.to_owned();
            for phase in [0, 1, 2, 7] {
                v.push(ev(
                    1,
                    t,
                    Body::Lifecycle(Lifecycle {
                        phase,
                        agent_version: if phase == 1 {
                            "0.1.0".into()
                        } else {
                            s.clone()
                        },
                        public_key: vec![0xab; 32],
                        key_id: "0011223344556677".into(),
                        reason: s.clone(),
                        recovered_seq: u64::MAX,
                        recovered_torn_bytes: 3,
                        policy_version: s.clone(),
                        ephemeral_pins: phase == 2,
                        pin_durability: s.clone(),
                    }),
                ));
            }
            for (i, (src, port, method, jti)) in [
                ("10.0.0.7", 443u32, 1i32, vec![7u8; 32]),
                ("2001:db8::1", 0, 2, vec![]),
                ("not-an-ip", 1, 3, vec![0xff]),
                ("", 0, 9, vec![]),
            ]
            .into_iter()
            .enumerate()
            {
                let who = if i == 3 {
                    String::new()
                } else {
                    format!("user{i}{s}")
                };
                let tenant = if i % 2 == 0 { s.clone() } else { "acme".into() };
                v.push(ev(
                    2 + i as u64,
                    t,
                    Body::AdmissionGranted(AdmissionGranted {
                        identity: who.clone(),
                        tenant: tenant.clone(),
                        service: format!("llm{s}"),
                        model_version: if i == 1 { String::new() } else { "v3".into() },
                        source: src.into(),
                        source_port: port,
                        method,
                        policies: (0..i).map(|k| format!("p{k}{s}")).collect(),
                        policy_version: "pv".into(),
                        jti_sha256: jti.clone(),
                        expires_unix_ms: if i == 2 { -5 } else { 1_800_000_300_000 },
                        action: s.clone(),
                        identity_name: format!("{s}/x%2Fy"),
                    }),
                ));
                v.push(ev(
                    20 + i as u64,
                    t,
                    Body::AdmissionDenied(AdmissionDenied {
                        identity: who,
                        tenant,
                        service: "svc".into(),
                        model_version: s.clone(),
                        source: src.into(),
                        source_port: port,
                        method,
                        policies: (0..i).map(|k| format!("p{k}")).collect(),
                        policy_version: s.clone(),
                        jti_sha256: jti,
                        reason: if i == 0 {
                            String::new()
                        } else {
                            format!("bad{s}")
                        },
                        detail: if i == 1 { String::new() } else { s.clone() },
                        action: "a".into(),
                        identity_name: s.clone(),
                    }),
                ));
            }
            v.push(ev(
                30,
                t,
                Body::Revocation(Revocation {
                    target_kind: "jti".into(),
                    target: s.clone(),
                    reason: "r".into(),
                    admissions_removed: 4_000_000_000,
                    identities: vec![s.clone(), "x".into()],
                }),
            ));
            for accepted in [true, false] {
                v.push(ev(
                    31,
                    t,
                    Body::PolicyChange(PolicyChange {
                        old_version: s.clone(),
                        new_version: "n".into(),
                        policies: 3,
                        accepted,
                        error: s.clone(),
                    }),
                ));
            }
            for (accepted, n) in [(true, 0u32), (true, 2), (false, 1)] {
                v.push(ev(
                    34,
                    t,
                    Body::KeySetChange(portcullis_proto::v1::KeySetChange {
                        path: s.clone(),
                        keys: 3,
                        refused: (0..n)
                            .map(|k| portcullis_proto::v1::RefusedKey {
                                kid: format!("k{k}{s}"),
                                index: k,
                                reason: s.clone(),
                            })
                            .collect(),
                        accepted,
                        error: if accepted { String::new() } else { s.clone() },
                    }),
                ));
            }
            for n in [0usize, 1, 3] {
                v.push(ev(
                    32,
                    t,
                    Body::DropSummary(DropSummary {
                        interval_start_unix_ns: t,
                        interval_ns: 10_000_000_000,
                        reasons: (0..n)
                            .map(|k| ReasonCount {
                                reason: format!("r{k}{s}"),
                                packets: k as u64 * 1000,
                            })
                            .collect(),
                        top_sources: (0..n)
                            .map(|k| SourceCount {
                                source: if k == 1 {
                                    "nope".into()
                                } else {
                                    format!("10.1.2.{k}")
                                },
                                sampled: k as u64,
                                top_reason: s.clone(),
                            })
                            .collect(),
                        sampled: 77,
                        kernel_totals: (0..n)
                            .map(|k| ReasonCount {
                                reason: format!("t{k}"),
                                packets: u64::MAX - k as u64,
                            })
                            .collect(),
                        counters_instance: s.clone(),
                        since_restart: n == 1,
                        tables: (0..n)
                            .map(|k| portcullis_proto::v1::TableFill {
                                map: format!("PCL_{k}{s}"),
                                entries: k as u32,
                                capacity: 16_384,
                                knob: s.clone(),
                            })
                            .collect(),
                    }),
                ));
            }
            for n in [0usize, 2] {
                v.push(ev(
                    33,
                    t,
                    Body::CostReport(CostReport {
                        interval_start_unix_ns: t,
                        interval_ns: 60_000_000_000,
                        currency: "EUR".into(),
                        lines: (0..n)
                            .map(|k| CostLine {
                                identity: format!("i{k}{s}"),
                                tenant: s.clone(),
                                service: "svc".into(),
                                connections: 1,
                                packets_in: 2,
                                bytes_in: 3,
                                packets_out: 4,
                                bytes_out: 5,
                                cost_micros: 600 + k as u64,
                                identity_month_micros: 7,
                                identity_day_micros: 8,
                                tenant_month_micros: u64::MAX,
                            })
                            .collect(),
                        month: "2026-11".into(),
                        day: s.clone(),
                    }),
                ));
            }
            for (m, allowed, outcome) in [
                ("AdmitKnock", true, "ok"),
                ("ListAdmissions", true, "ok"),
                ("GetX", false, "denied"),
                ("StatsY", true, "err"),
                ("WatchZ", true, "ok"),
                ("ValidatePolicy", true, "ok"),
                ("UsageQ", true, "ok"),
                ("ApplyPolicy", true, "ok"),
                ("SetX", true, "ok"),
                ("UpdateX", true, "ok"),
                ("RevokeX", true, "ok"),
                ("DeleteX", true, "ok"),
                ("createThing", true, "ok"),
                ("Frobnicate", true, ""),
                ("", false, ""),
            ] {
                v.push(ev(
                    34,
                    t,
                    Body::ControlCall(ControlCall {
                        caller: format!("cn={s}"),
                        role: if allowed {
                            "admin".into()
                        } else {
                            String::new()
                        },
                        method: m.into(),
                        request: s.clone(),
                        allowed,
                        outcome: outcome.into(),
                    }),
                ));
            }
            v.push(ev(
                35,
                t,
                Body::Checkpoint(Checkpoint {
                    signature: vec![0x5a; 64],
                    key_id: s.clone(),
                    events_since_last: 1000,
                }),
            ));
            v.push(ev(
                36,
                t,
                Body::Gap(Gap {
                    first_seq: 5,
                    last_seq: 9,
                    reason: s.clone(),
                }),
            ));
            for full in [true, false] {
                v.push(ev(
                    37,
                    t,
                    Body::SpoolPressure(SpoolPressure {
                        full,
                        bytes_used: 1,
                        bytes_limit: 2,
                        refused_admissions: 3,
                        on_full: s.clone(),
                    }),
                ));
            }
        }
        let mut odd = ev(u64::MAX, i64::MIN, Body::Gap(Gap::default()));
        odd.node_id = TRICKY.into();
        odd.prev_hash = vec![];
        v.push(odd);
        let mut none = ev(1, 0, Body::Gap(Gap::default()));
        none.body = None;
        v.push(none);
        v
    }

    /// The writer's line is exactly serde_json's serialization of what it
    /// parses to (escaping, numbers, key order), and parsing it gives
    /// `event_record`.
    #[test]
    fn written_lines_are_canonical_json() {
        for e in samples() {
            let bytes = e.encode_to_vec();
            let mut line = Vec::new();
            write_event_record(&e, &bytes, &event_hash(&bytes), None, &mut line);
            let v: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(String::from_utf8(line).unwrap(), v.to_string(), "{e:?}");
            assert_eq!(v, event_record(&bytes).unwrap());
            assert_eq!(v["portcullis"]["raw"], b64(&bytes));
            assert_eq!(v["portcullis"]["hash"], hex(&event_hash(&bytes)));
            assert_eq!(v["portcullis"]["prev_hash"], hex(&e.prev_hash));
        }
    }
}
