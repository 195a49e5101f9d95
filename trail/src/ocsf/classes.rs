//! The OCSF class of each event: class, activity, severity, status, the
//! message, and the class's own attributes (`trail/src/ocsf/mod.rs` has
//! the table).

use std::net::IpAddr;

use portcullis_proto::v1::{
    AdmissionMethod, ControlCall, Detection, DropSummary, Event, Lifecycle, event::Body,
    lifecycle::Phase,
};

use super::{PORTCULLIS_CLASS_UID, PRODUCT, PortcullisActivity, VENDOR, json::Json};

pub(super) struct Class<'a> {
    pub(super) class_uid: u64,
    pub(super) class_name: &'static str,
    pub(super) category_uid: u64,
    pub(super) category_name: &'static str,
    pub(super) activity_id: u64,
    pub(super) activity_name: &'static str,
    pub(super) severity_id: u64,
    /// (status_id, status_detail)
    pub(super) status: Option<(u64, &'a str)>,
    pub(super) message: String,
    pub(super) attrs: Attrs<'a>,
}

/// The class-specific attributes of a record (after `metadata`).
pub(super) enum Attrs<'a> {
    None,
    /// Authentication (granted or denied admissions).
    Auth {
        a: AdmissionView<'a>,
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
    /// A Detection Finding: the episode's identity (node, kind, subject,
    /// start) is the finding's uid, so its open and close records pair up.
    Finding {
        d: &'a Detection,
        uid: String,
    },
}

/// The fields `AdmissionGranted` and `AdmissionDenied` share
/// (`proto/portcullis/v1/audit.proto`), borrowed from either.
pub(super) struct AdmissionView<'a> {
    pub(super) identity: &'a str,
    pub(super) tenant: &'a str,
    pub(super) service: &'a str,
    pub(super) model_version: &'a str,
    pub(super) source: &'a str,
    pub(super) source_port: u32,
    pub(super) method: i32,
    pub(super) policies: &'a [String],
    pub(super) policy_version: &'a str,
    pub(super) jti_sha256: &'a [u8],
    pub(super) action: &'a str,
    pub(super) identity_name: &'a str,
}

/// An [`AdmissionView`] of a granted or denied admission event.
macro_rules! admission_view {
    ($m:expr) => {
        $crate::ocsf::classes::AdmissionView {
            identity: &$m.identity,
            tenant: &$m.tenant,
            service: &$m.service,
            model_version: &$m.model_version,
            source: &$m.source,
            source_port: $m.source_port,
            method: $m.method,
            policies: &$m.policies,
            policy_version: &$m.policy_version,
            jti_sha256: &$m.jti_sha256,
            action: &$m.action,
            identity_name: &$m.identity_name,
        }
    };
}
pub(super) use admission_view;

/// An admission as OCSF Authentication (3002), Logon (1).
fn auth<'a>(
    severity_id: u64,
    status: (u64, &'a str),
    message: String,
    attrs: Attrs<'a>,
) -> Class<'a> {
    Class {
        class_uid: 3002,
        class_name: "Authentication",
        category_uid: 3,
        category_name: "Identity & Access Management",
        activity_id: 1,
        activity_name: "Logon",
        severity_id,
        status: Some(status),
        message,
        attrs,
    }
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

pub(super) fn write_attrs(j: &mut Json<'_>, attrs: &Attrs<'_>) {
    match *attrs {
        Attrs::None => {}
        Attrs::Auth {
            ref a,
            expires_unix_ms,
        } => {
            let AdmissionView {
                identity,
                tenant,
                service,
                model_version,
                source,
                source_port,
                method,
                jti_sha256,
                ..
            } = *a;
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
        Attrs::Finding { d, ref uid } => {
            j.k("finding_info").obj();
            j.k("uid").s(uid.as_str());
            j.k("title")
                .s_parts(&["portcullis ", &d.kind, ": ", &d.subject]);
            j.k("types").arr();
            j.s(&d.kind);
            j.end_arr();
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

pub(super) fn classify(ev: &Event) -> Class<'_> {
    let Some(body) = &ev.body else {
        return custom(PortcullisActivity::Other, 1, "event without a body".into());
    };
    match body {
        Body::AdmissionGranted(g) => auth(
            1,
            (1, ""),
            format!(
                "admission granted: {} to {} ({}) from {} by {}; policies [{}]",
                g.identity,
                g.service,
                g.action,
                g.source,
                method_name(g.method),
                g.policies.join(", ")
            ),
            Attrs::Auth {
                a: admission_view!(g),
                expires_unix_ms: Some(g.expires_unix_ms),
            },
        ),
        Body::AdmissionDenied(d) => auth(
            2,
            (2, &d.reason),
            format!(
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
            Attrs::Auth {
                a: admission_view!(d),
                expires_unix_ms: None,
            },
        ),
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
            } else if m.contains(".set") || m.contains(".apply") {
                // A write named under its call: `Services.SetMode`.
                (3, "Update")
            } else if m.starts_with("list")
                || m.starts_with("get")
                || m.starts_with("stats")
                || m.starts_with("watch")
                || m.starts_with("validate")
                || m.starts_with("usage")
                || m.starts_with("status")
                || m.starts_with("services")
                || m.starts_with("policy")
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
        Body::Detection(d) => {
            let (activity_id, activity_name) = if d.open { (1, "Create") } else { (3, "Close") };
            let message = if d.open {
                format!(
                    "{} at {}: {}/s over the threshold of {}/s{}{}",
                    d.kind,
                    d.subject,
                    d.rate,
                    d.threshold,
                    if d.detail.is_empty() { "" } else { "; " },
                    d.detail
                )
            } else {
                format!(
                    "{} at {} ended after {} ms: peak {}/s, {} in all",
                    d.kind, d.subject, d.duration_ms, d.rate, d.total
                )
            };
            Class {
                class_uid: 2004,
                class_name: "Detection Finding",
                category_uid: 2,
                category_name: "Findings",
                activity_id,
                activity_name,
                severity_id: if d.open { 3 } else { 1 },
                status: None,
                message,
                attrs: Attrs::Finding {
                    d,
                    uid: format!(
                        "{}/{}/{}/{}",
                        ev.node_id, d.kind, d.subject, d.started_unix_ms
                    ),
                },
            }
        }
        Body::Budget(b) => custom(
            PortcullisActivity::Budget,
            match b.action.as_str() {
                "deny" => 4,
                "throttle" => 3,
                "warn" => 2,
                _ => 1,
            },
            match b.kind.as_str() {
                "threshold" => format!(
                    "budget {} ({}) {} -> {}: spent {}, forecast {} of {} micro-units per {}",
                    b.budget,
                    if b.key.is_empty() { &b.scope } else { &b.key },
                    if b.previous.is_empty() {
                        "none"
                    } else {
                        &b.previous
                    },
                    if b.action.is_empty() {
                        "none"
                    } else {
                        &b.action
                    },
                    b.spent_micros,
                    b.forecast_micros,
                    b.amount_micros,
                    b.period
                ),
                "approval" | "approval_ended" => format!(
                    "{} for {}: {} of {} micro-units used{}{}",
                    b.kind,
                    b.identity,
                    b.used_micros,
                    b.amount_micros,
                    if b.detail.is_empty() { "" } else { "; " },
                    b.detail
                ),
                _ => format!("budget {} {} ({}): {}", b.budget, b.kind, b.scope, b.detail),
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
