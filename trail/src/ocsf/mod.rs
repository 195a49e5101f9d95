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
//! | `Detection` | Detection Finding (2004) | Create (1) when an episode opens, Close (3) when it ends |
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
use portcullis_proto::v1::Event;
use prost::Message as _;
use serde_json::{Map, Value, json};

use crate::chain::event_hash;
use crate::hex::hex;
use crate::verify::{Finding, Severity};

mod classes;
mod event_json;
mod json;

use classes::{classify, write_attrs};
use event_json::write_event_json;
use json::Json;

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
    Budget = 8,
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
            PortcullisActivity::Budget => "Budget",
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
mod tests;
