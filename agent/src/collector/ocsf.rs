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
use portcullis_proto::v1::{AdmissionMethod, Event, event::Body, lifecycle::Phase};
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
    let ev = Event::decode(canonical)?;
    Ok(event_record_of(&ev, canonical))
}

/// The record for `ev`, whose canonical encoding is `canonical`.
pub fn event_record_of(ev: &Event, canonical: &[u8]) -> Value {
    let time_ms = ev.time_unix_ns.div_euclid(1_000_000);
    let class = classify(ev);
    let mut r = Map::new();
    r.insert("class_uid".into(), json!(class.class_uid));
    r.insert("class_name".into(), json!(class.class_name));
    r.insert("category_uid".into(), json!(class.category_uid));
    r.insert("category_name".into(), json!(class.category_name));
    r.insert("activity_id".into(), json!(class.activity_id));
    r.insert("activity_name".into(), json!(class.activity_name));
    r.insert(
        "type_uid".into(),
        json!(class.class_uid * 100 + class.activity_id),
    );
    r.insert(
        "type_name".into(),
        json!(format!("{}: {}", class.class_name, class.activity_name)),
    );
    r.insert("time".into(), json!(time_ms));
    r.insert("severity_id".into(), json!(class.severity_id));
    r.insert("severity".into(), json!(severity_name(class.severity_id)));
    if let Some((id, detail)) = &class.status {
        r.insert("status_id".into(), json!(id));
        r.insert(
            "status".into(),
            json!(if *id == 1 { "Success" } else { "Failure" }),
        );
        if !detail.is_empty() {
            r.insert("status_detail".into(), json!(detail));
        }
    }
    r.insert("message".into(), json!(class.message));
    r.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": {"name": PRODUCT, "vendor_name": VENDOR},
            "uid": format!("{}/{}", ev.node_id, ev.seq),
            "sequence": ev.seq,
            "log_name": EVENT_LOG_NAME,
        }),
    );
    for (k, v) in class.attrs {
        r.insert(k.into(), v);
    }
    r.insert(
        "portcullis".into(),
        json!({
            "record": "event",
            "mapping": MAPPING_VERSION,
            "node_id": ev.node_id,
            "seq": ev.seq,
            "prev_hash": hex(&ev.prev_hash),
            "hash": hex(&event_hash(canonical)),
            "raw": b64(canonical),
            "event": event_json(ev),
        }),
    );
    Value::Object(r)
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

struct Class {
    class_uid: u64,
    class_name: &'static str,
    category_uid: u64,
    category_name: &'static str,
    activity_id: u64,
    activity_name: &'static str,
    severity_id: u64,
    /// (status_id, status_detail)
    status: Option<(u64, String)>,
    message: String,
    attrs: Vec<(&'static str, Value)>,
}

fn custom(activity: PortcullisActivity, severity_id: u64, message: String) -> Class {
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
        attrs: Vec::new(),
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

/// Authentication attributes shared by granted and denied admissions.
#[allow(clippy::too_many_arguments)]
fn auth_attrs(
    identity: &str,
    tenant: &str,
    service: &str,
    model_version: &str,
    source: &str,
    source_port: u32,
    method: i32,
    jti_sha256: &[u8],
) -> Vec<(&'static str, Value)> {
    let mut user = Map::new();
    if identity.is_empty() {
        // OCSF's User needs a name, uid or account.
        user.insert("name".into(), json!("unknown"));
        user.insert("type_id".into(), json!(0));
        user.insert("type".into(), json!("Unknown"));
    } else {
        user.insert("name".into(), json!(identity));
        user.insert("uid".into(), json!(identity));
    }
    if !tenant.is_empty() {
        user.insert("org".into(), json!({"name": tenant}));
    }
    let mut src = Map::new();
    if source.parse::<IpAddr>().is_ok() {
        src.insert("ip".into(), json!(source));
    } else if !source.is_empty() {
        src.insert("name".into(), json!(source));
    }
    if source_port != 0 {
        src.insert("port".into(), json!(source_port));
    }
    let mut svc = Map::new();
    svc.insert("name".into(), json!(service));
    if !model_version.is_empty() {
        svc.insert("version".into(), json!(model_version));
    }
    let (proto_id, proto) = match AdmissionMethod::try_from(method) {
        // A knock carries an OAuth 2.0 access token (RFC 9068).
        Ok(AdmissionMethod::Knock) => (6, "OAUTH 2.0"),
        _ => (99, method_name(method)),
    };
    let mut attrs = vec![
        ("user", Value::Object(user)),
        ("src_endpoint", Value::Object(src)),
        ("dst_endpoint", json!({"svc_name": service})),
        ("service", Value::Object(svc)),
        ("auth_protocol_id", json!(proto_id)),
        ("auth_protocol", json!(proto)),
        ("is_remote", json!(true)),
    ];
    if !jti_sha256.is_empty() {
        attrs.push(("session", json!({"uid": hex(jti_sha256)})));
    }
    attrs
}

fn classify(ev: &Event) -> Class {
    let Some(body) = &ev.body else {
        return custom(PortcullisActivity::Other, 1, "event without a body".into());
    };
    match body {
        Body::AdmissionGranted(g) => {
            let mut attrs = auth_attrs(
                &g.identity,
                &g.tenant,
                &g.service,
                &g.model_version,
                &g.source,
                g.source_port,
                g.method,
                &g.jti_sha256,
            );
            if let Some((_, Value::Object(s))) = attrs.iter_mut().find(|(k, _)| *k == "session") {
                s.insert("expiration_time".into(), json!(g.expires_unix_ms));
            } else {
                attrs.push(("session", json!({"expiration_time": g.expires_unix_ms})));
            }
            Class {
                class_uid: 3002,
                class_name: "Authentication",
                category_uid: 3,
                category_name: "Identity & Access Management",
                activity_id: 1,
                activity_name: "Logon",
                severity_id: 1,
                status: Some((1, String::new())),
                message: format!(
                    "admission granted: {} to {} ({}) from {} by {}; policies [{}]",
                    g.identity,
                    g.service,
                    g.action,
                    g.source,
                    method_name(g.method),
                    g.policies.join(", ")
                ),
                attrs,
            }
        }
        Body::AdmissionDenied(d) => Class {
            class_uid: 3002,
            class_name: "Authentication",
            category_uid: 3,
            category_name: "Identity & Access Management",
            activity_id: 1,
            activity_name: "Logon",
            severity_id: 2,
            status: Some((2, d.reason.clone())),
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
            attrs: auth_attrs(
                &d.identity,
                &d.tenant,
                &d.service,
                &d.model_version,
                &d.source,
                d.source_port,
                d.method,
                &d.jti_sha256,
            ),
        },
        Body::DropSummary(s) => {
            let total: u64 = s.reasons.iter().map(|r| r.packets).sum();
            let start_ms = s.interval_start_unix_ns.div_euclid(1_000_000);
            let end_ms = start_ms.saturating_add((s.interval_ns / 1_000_000) as i64);
            let mut attrs = vec![
                ("start_time", json!(start_ms)),
                ("end_time", json!(end_ms)),
                ("count", json!(total)),
                ("traffic", json!({"packets": total})),
            ];
            if let Some(top) = s.top_sources.first()
                && top.source.parse::<IpAddr>().is_ok()
            {
                attrs.push(("src_endpoint", json!({"ip": top.source})));
            }
            let obs: Vec<Value> = s
                .top_sources
                .iter()
                .filter(|t| t.source.parse::<IpAddr>().is_ok())
                .map(|t| json!({"name": "src_endpoint.ip", "type_id": 2, "type": "IP Address", "value": t.source}))
                .collect();
            if !obs.is_empty() {
                attrs.push(("observables", Value::Array(obs)));
            }
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
                attrs,
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
            let mut user = Map::new();
            user.insert("name".into(), json!(c.caller));
            if !c.role.is_empty() {
                user.insert("groups".into(), json!([{"name": c.role}]));
            }
            Class {
                class_uid: 6003,
                class_name: "API Activity",
                category_uid: 6,
                category_name: "Application Activity",
                activity_id,
                activity_name,
                severity_id: if c.allowed { 1 } else { 3 },
                status: Some((if ok { 1 } else { 2 }, c.outcome.clone())),
                message: format!(
                    "control call {} by {} ({}): {}",
                    c.method,
                    c.caller,
                    if c.allowed { "allowed" } else { "refused" },
                    c.outcome
                ),
                attrs: vec![
                    ("actor", json!({"user": Value::Object(user)})),
                    (
                        "api",
                        json!({"operation": c.method, "service": {"name": "portcullis.v1.Control"}}),
                    ),
                    ("src_endpoint", json!({"name": c.caller})),
                ],
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
            let mut app = Map::new();
            app.insert("name".into(), json!(PRODUCT));
            app.insert("vendor_name".into(), json!(VENDOR));
            if !l.agent_version.is_empty() {
                app.insert("version".into(), json!(l.agent_version));
            }
            Class {
                class_uid: 6002,
                class_name: "Application Lifecycle",
                category_uid: 6,
                category_name: "Application Activity",
                activity_id,
                activity_name,
                severity_id: 1,
                status: Some((1, String::new())),
                message: format!(
                    "agent {} on node {} ({}); key {}, recovered seq {}",
                    activity_name.to_lowercase(),
                    ev.node_id,
                    l.reason,
                    l.key_id,
                    l.recovered_seq
                ),
                attrs: vec![("app", Value::Object(app))],
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

/// The decoded event as JSON: the envelope and the body under its field
/// name. Bytes are lower-case hex, enums their names.
pub fn event_json(ev: &Event) -> Value {
    let mut m = Map::new();
    m.insert("seq".into(), json!(ev.seq));
    m.insert("time_unix_ns".into(), json!(ev.time_unix_ns));
    m.insert("node_id".into(), json!(ev.node_id));
    m.insert("prev_hash".into(), json!(hex(&ev.prev_hash)));
    m.insert("monotonic_ns".into(), json!(ev.monotonic_ns));
    let (name, body) = match &ev.body {
        None => ("body", Value::Null),
        Some(Body::Lifecycle(l)) => (
            "lifecycle",
            json!({
                "phase": Phase::try_from(l.phase).map_or_else(|_| l.phase.to_string(), |p| p.as_str_name().to_owned()),
                "agent_version": l.agent_version,
                "public_key": hex(&l.public_key),
                "key_id": l.key_id,
                "reason": l.reason,
                "recovered_seq": l.recovered_seq,
                "recovered_torn_bytes": l.recovered_torn_bytes,
                "policy_version": l.policy_version,
            }),
        ),
        Some(Body::AdmissionGranted(g)) => (
            "admission_granted",
            json!({
                "identity": g.identity,
                "tenant": g.tenant,
                "service": g.service,
                "model_version": g.model_version,
                "source": g.source,
                "source_port": g.source_port,
                "method": method_enum(g.method),
                "policies": g.policies,
                "policy_version": g.policy_version,
                "jti_sha256": hex(&g.jti_sha256),
                "expires_unix_ms": g.expires_unix_ms,
                "action": g.action,
            }),
        ),
        Some(Body::AdmissionDenied(d)) => (
            "admission_denied",
            json!({
                "identity": d.identity,
                "tenant": d.tenant,
                "service": d.service,
                "model_version": d.model_version,
                "source": d.source,
                "source_port": d.source_port,
                "method": method_enum(d.method),
                "policies": d.policies,
                "policy_version": d.policy_version,
                "jti_sha256": hex(&d.jti_sha256),
                "reason": d.reason,
                "detail": d.detail,
                "action": d.action,
            }),
        ),
        Some(Body::Revocation(r)) => (
            "revocation",
            json!({
                "target_kind": r.target_kind,
                "target": r.target,
                "reason": r.reason,
                "admissions_removed": r.admissions_removed,
                "identities": r.identities,
            }),
        ),
        Some(Body::PolicyChange(p)) => (
            "policy_change",
            json!({
                "old_version": p.old_version,
                "new_version": p.new_version,
                "policies": p.policies,
                "accepted": p.accepted,
                "error": p.error,
            }),
        ),
        Some(Body::DropSummary(s)) => (
            "drop_summary",
            json!({
                "interval_start_unix_ns": s.interval_start_unix_ns,
                "interval_ns": s.interval_ns,
                "reasons": s.reasons.iter().map(|r| json!({"reason": r.reason, "packets": r.packets})).collect::<Vec<_>>(),
                "top_sources": s.top_sources.iter().map(|t| json!({"source": t.source, "sampled": t.sampled, "top_reason": t.top_reason})).collect::<Vec<_>>(),
                "sampled": s.sampled,
            }),
        ),
        Some(Body::CostReport(c)) => (
            "cost_report",
            json!({
                "interval_start_unix_ns": c.interval_start_unix_ns,
                "interval_ns": c.interval_ns,
                "currency": c.currency,
                "lines": c.lines.iter().map(|l| json!({
                    "identity": l.identity,
                    "tenant": l.tenant,
                    "service": l.service,
                    "connections": l.connections,
                    "packets_in": l.packets_in,
                    "bytes_in": l.bytes_in,
                    "packets_out": l.packets_out,
                    "bytes_out": l.bytes_out,
                    "cost_micros": l.cost_micros,
                    "identity_month_micros": l.identity_month_micros,
                    "identity_day_micros": l.identity_day_micros,
                    "tenant_month_micros": l.tenant_month_micros,
                })).collect::<Vec<_>>(),
                "month": c.month,
                "day": c.day,
            }),
        ),
        Some(Body::ControlCall(c)) => (
            "control_call",
            json!({
                "caller": c.caller,
                "role": c.role,
                "method": c.method,
                "request": c.request,
                "allowed": c.allowed,
                "outcome": c.outcome,
            }),
        ),
        Some(Body::Checkpoint(c)) => (
            "checkpoint",
            json!({
                "signature": hex(&c.signature),
                "key_id": c.key_id,
                "events_since_last": c.events_since_last,
            }),
        ),
        Some(Body::Gap(g)) => (
            "gap",
            json!({"first_seq": g.first_seq, "last_seq": g.last_seq, "reason": g.reason}),
        ),
        Some(Body::SpoolPressure(s)) => (
            "spool_pressure",
            json!({
                "full": s.full,
                "bytes_used": s.bytes_used,
                "bytes_limit": s.bytes_limit,
                "refused_admissions": s.refused_admissions,
                "on_full": s.on_full,
            }),
        ),
    };
    m.insert(name.into(), body);
    Value::Object(m)
}

fn method_enum(m: i32) -> String {
    AdmissionMethod::try_from(m).map_or_else(|_| m.to_string(), |v| v.as_str_name().to_owned())
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
