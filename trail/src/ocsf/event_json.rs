//! The decoded event as JSON, the `portcullis.event` member of every
//! event record: envelope and body, bytes in lower-case hex, enums by name,
//! 64-bit integers as JSON numbers.

use portcullis_proto::v1::{AdmissionMethod, Event, event::Body, lifecycle::Phase};

use super::{
    classes::{AdmissionView, admission_view},
    json::Json,
};

/// Writes the decoded event as JSON: the envelope and the body under its
/// field name. Bytes are lower-case hex, enums their names.
pub(super) fn write_event_json(j: &mut Json<'_>, ev: &Event) {
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
            let a = admission_view!(g);
            admission_head(j, &a);
            j.k("expires_unix_ms").i(g.expires_unix_ms);
            admission_tail(j, &a);
            j.end();
        }
        Some(Body::AdmissionDenied(d)) => {
            j.k("admission_denied").obj();
            let a = admission_view!(d);
            admission_head(j, &a);
            j.k("reason").s(&d.reason);
            j.k("detail").s(&d.detail);
            admission_tail(j, &a);
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
                j.k("requests").u(l.requests);
                j.k("tokens_in").u(l.tokens_in);
                j.k("tokens_out").u(l.tokens_out);
                j.k("gpu_ms").u(l.gpu_ms);
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
        Some(Body::Detection(d)) => {
            j.k("detection").obj();
            j.k("kind").s(&d.kind);
            j.k("subject").s(&d.subject);
            j.k("open").b(d.open);
            j.k("rate").u(d.rate);
            j.k("threshold").u(d.threshold);
            j.k("started_unix_ms").i(d.started_unix_ms);
            j.k("duration_ms").u(d.duration_ms);
            j.k("total").u(d.total);
            j.k("detail").s(&d.detail);
            j.end();
        }
        Some(Body::Budget(b)) => {
            j.k("budget").obj();
            j.k("kind").s(&b.kind);
            j.k("budget").s(&b.budget);
            j.k("scope").s(&b.scope);
            j.k("key").s(&b.key);
            j.k("period").s(&b.period);
            j.k("action").s(&b.action);
            j.k("previous").s(&b.previous);
            j.k("amount_micros").u(b.amount_micros);
            j.k("spent_micros").u(b.spent_micros);
            j.k("forecast_micros").u(b.forecast_micros);
            j.k("rate_micros_per_hour").u(b.rate_micros_per_hour);
            j.k("threshold_percent").u(b.threshold_percent.into());
            j.k("horizon_secs").u(b.horizon_secs);
            j.k("identity").s(&b.identity);
            j.k("until_unix_ms").i(b.until_unix_ms);
            j.k("used_micros").u(b.used_micros);
            j.k("by").s(&b.by);
            j.k("detail").s(&b.detail);
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

/// The fields both admission events start with, in `audit.proto` order.
fn admission_head(j: &mut Json<'_>, a: &AdmissionView<'_>) {
    j.k("identity").s(a.identity);
    j.k("tenant").s(a.tenant);
    j.k("service").s(a.service);
    j.k("model_version").s(a.model_version);
    j.k("source").s(a.source);
    j.k("source_port").u(a.source_port.into());
    j.k("method");
    method_enum(j, a.method);
    j.k("policies").strs(a.policies);
    j.k("policy_version").s(a.policy_version);
    j.k("jti_sha256").hex(a.jti_sha256);
}

/// The fields both admission events end with.
fn admission_tail(j: &mut Json<'_>, a: &AdmissionView<'_>) {
    j.k("action").s(a.action);
    j.k("identity_name").s(a.identity_name);
}
