//! How `portcullis ctl` prints replies: aligned tables for people, one
//! JSON document (or one per line for `watch`) for programs.

use portcullis_proto::v1::{self, event::Body};
use prost::Message;
use serde_json::{Value, json};

pub(super) fn print_json(v: &Value) {
    println!("{v}");
}

/// Prints rows as columns padded to their widest cell.
pub(super) fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn tables_json(t: &[v1::TableFill]) -> Value {
    t.iter()
        .map(
            |t| json!({"map": t.map, "entries": t.entries, "capacity": t.capacity, "knob": t.knob}),
        )
        .collect()
}

pub fn status(r: &v1::StatusReply, json: bool) {
    if json {
        return print_json(&json!({
            "version": r.version, "node_id": r.node_id, "origin": r.origin,
            "interfaces": r.interfaces, "attach_mode": r.attach_mode,
            "policy_version": r.policy_version, "tables": tables_json(&r.tables),
            "spool_events": r.spool_events, "spool_bytes": r.spool_bytes,
            "sealed_seq": r.sealed_seq, "acked_seq": r.acked_seq,
            "collector_lag_secs": r.collector_lag_secs,
            "pin_durability": r.pin_durability, "live_admissions": r.live_admissions,
            "live_flows": r.live_flows, "caller": r.caller, "roles": r.roles,
            "shadow_services": r.shadow_services,
        }));
    }
    println!("node {} (portcullis {})", r.node_id, r.version);
    println!(
        "programs {} on {} ({})",
        r.origin,
        r.interfaces.join(", "),
        r.attach_mode
    );
    println!("pins {}", r.pin_durability);
    println!("policy {}", r.policy_version);
    if !r.shadow_services.is_empty() {
        println!(
            "shadow mode (not enforcing) {}",
            r.shadow_services.join(", ")
        );
    }
    println!("admissions {}  flows {}", r.live_admissions, r.live_flows);
    println!(
        "audit sealed {}  acknowledged {}  unacknowledged {} events / {} bytes  collector lag {} s",
        r.sealed_seq, r.acked_seq, r.spool_events, r.spool_bytes, r.collector_lag_secs
    );
    println!("caller {} roles {}", r.caller, r.roles.join(","));
    let rows: Vec<Vec<String>> = r
        .tables
        .iter()
        .map(|t| {
            vec![
                t.map.clone(),
                t.entries.to_string(),
                t.capacity.to_string(),
                t.knob.clone(),
            ]
        })
        .collect();
    table(&["TABLE", "ENTRIES", "CAPACITY", "RAISE"], &rows);
}

pub fn admitted(r: &v1::AdmitReply, json: bool) {
    if json {
        return print_json(&json!({
            "identity": r.identity, "tenant": r.tenant, "service": r.service,
            "source": r.source, "expires_unix_ms": r.expires_unix_ms,
            "policies": r.policies, "policy_version": r.policy_version,
        }));
    }
    let id = if r.tenant.is_empty() {
        r.identity.clone()
    } else {
        format!("{}/{}", r.tenant, r.identity)
    };
    println!(
        "admitted {id} from {} to {} until {} (policies {})",
        r.source,
        r.service,
        r.expires_unix_ms,
        r.policies.join(",")
    );
}

pub fn revoked(r: &v1::RevokeReply, json: bool) {
    if json {
        return print_json(&json!({
            "admissions_removed": r.admissions_removed,
            "flows_removed": r.flows_removed,
            "identities": r.identities,
        }));
    }
    println!(
        "revoked: {} admissions, {} flows removed{}",
        r.admissions_removed,
        r.flows_removed,
        if r.identities.is_empty() {
            String::new()
        } else {
            format!("; identities {}", r.identities.join(", "))
        }
    );
}

pub fn usage(r: &v1::ReportUsageReply, json: bool) {
    if json {
        return print_json(&json!({
            "identity": r.identity,
            "cost_micros": r.cost_micros,
            "currency": r.currency,
            "month_micros": r.month_micros,
            "day_micros": r.day_micros,
            "forecast_month_micros": r.forecast_month_micros,
            "duplicate": r.duplicate,
        }));
    }
    if r.duplicate {
        println!("already charged (same report id): nothing charged again");
    } else {
        println!("charged {} {} micro-units", r.identity, r.cost_micros);
    }
    println!(
        "spend: month {} day {} forecast {} ({} micro-units)",
        r.month_micros, r.day_micros, r.forecast_month_micros, r.currency
    );
}

pub fn admissions(rows: &[v1::AdmissionInfo], json: bool) {
    if json {
        let v: Vec<Value> = rows
            .iter()
            .map(|a| json!({"identity": a.identity, "service": a.service, "source": a.source,
                "source_port": a.source_port, "expires_in_ms": a.expires_in_ms, "one_use": a.one_use}))
            .collect();
        return print_json(&Value::from(v));
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|a| {
            vec![
                a.identity.clone(),
                a.service.clone(),
                a.source.clone(),
                if a.source_port == 0 {
                    "*".into()
                } else {
                    a.source_port.to_string()
                },
                format!("{}s", a.expires_in_ms / 1000),
            ]
        })
        .collect();
    table(
        &["IDENTITY", "SERVICE", "SOURCE", "PORT", "EXPIRES IN"],
        &rows,
    );
}

pub fn flows(rows: &[v1::FlowInfo], json: bool) {
    if json {
        let v: Vec<Value> = rows
            .iter()
            .map(|f| {
                json!({"identity": f.identity, "service": f.service, "source": f.source,
                "source_port": f.source_port, "destination": f.destination,
                "destination_port": f.destination_port, "protocol": f.protocol})
            })
            .collect();
        return print_json(&Value::from(v));
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|f| {
            vec![
                f.identity.clone(),
                f.service.clone(),
                format!("{}:{}", f.source, f.source_port),
                format!("{}:{}", f.destination, f.destination_port),
                f.protocol.clone(),
            ]
        })
        .collect();
    table(
        &["IDENTITY", "SERVICE", "SOURCE", "DESTINATION", "PROTO"],
        &rows,
    );
}

fn counts_json(c: &[v1::ReasonCount]) -> Value {
    c.iter()
        .map(|r| (r.reason.clone(), Value::from(r.packets)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub fn stats(r: &v1::StatsReply, json: bool) {
    if json {
        let ids: Vec<Value> = r
            .identities
            .iter()
            .map(|i| {
                json!({"identity": i.identity, "connections": i.connections,
                "packets_in": i.packets_in, "bytes_in": i.bytes_in, "packets_out": i.packets_out,
                "bytes_out": i.bytes_out, "dropped": i.dropped, "month_micros": i.month_micros,
                "day_micros": i.day_micros})
            })
            .collect();
        return print_json(&json!({
            "drops": counts_json(&r.drops), "shadow_drops": counts_json(&r.shadow_drops),
            "refusals": counts_json(&r.refusals),
            "granted": r.granted, "identities": ids, "currency": r.currency,
        }));
    }
    let rows: Vec<Vec<String>> = r
        .drops
        .iter()
        .zip(&r.shadow_drops)
        .map(|(c, s)| {
            vec![
                c.reason.clone(),
                c.packets.to_string(),
                s.packets.to_string(),
            ]
        })
        .collect();
    table(&["KERNEL REASON", "PACKETS", "SHADOW (PASSED)"], &rows);
    println!();
    let mut rows: Vec<Vec<String>> = r
        .refusals
        .iter()
        .map(|c| vec![c.reason.clone(), c.packets.to_string()])
        .collect();
    rows.push(vec!["(granted)".into(), r.granted.to_string()]);
    table(&["KNOCK REFUSAL", "COUNT"], &rows);
    println!();
    let rows: Vec<Vec<String>> = r
        .identities
        .iter()
        .map(|i| {
            vec![
                i.identity.clone(),
                i.connections.to_string(),
                i.bytes_in.to_string(),
                i.bytes_out.to_string(),
                i.dropped.to_string(),
                format!("{:.6}", i.month_micros as f64 / 1e6),
            ]
        })
        .collect();
    let month = format!("MONTH {}", r.currency);
    table(
        &[
            "IDENTITY",
            "CONNS",
            "BYTES IN",
            "BYTES OUT",
            "DROPPED",
            &month,
        ],
        &rows,
    );
}

/// The services; after an add or remove (`edited`) also what was cut.
pub fn services(r: &v1::ServicesReply, json: bool, edited: bool) {
    if json {
        let v: Vec<Value> = r
            .services
            .iter()
            .map(|s| {
                json!({"name": s.name, "protocol": s.protocol, "port": s.port,
                "address": s.address, "action": s.action, "mode": s.mode, "model_version": s.model_version})
            })
            .collect();
        if edited {
            return print_json(&json!({"services": v,
                "admissions_removed": r.admissions_removed, "flows_removed": r.flows_removed}));
        }
        return print_json(&Value::from(v));
    }
    if edited && (r.admissions_removed > 0 || r.flows_removed > 0) {
        println!(
            "cut {} admissions and {} flows of the removed service",
            r.admissions_removed, r.flows_removed
        );
    }
    let rows: Vec<Vec<String>> = r
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{}/{}", s.protocol, s.port),
                if s.address.is_empty() {
                    "*".into()
                } else {
                    s.address.clone()
                },
                s.action.clone(),
                s.mode.clone(),
                s.model_version.clone(),
            ]
        })
        .collect();
    table(
        &["SERVICE", "PORT", "ADDRESS", "ACTION", "MODE", "MODEL"],
        &rows,
    );
}

pub fn policy(r: &v1::PolicyReply, json: bool) {
    if json {
        return print_json(&json!({
            "version": r.version, "policies": r.policies, "ids": r.ids,
            "valid": r.valid, "error": r.error,
        }));
    }
    if !r.valid {
        println!("invalid: {}", r.error);
        return;
    }
    println!("version {} ({} policies)", r.version, r.policies);
    for id in &r.ids {
        println!("  {id}");
    }
}

/// One watched event: its OCSF record (what the SIEM gets) with `--json`,
/// else one line.
pub fn watched(ev: &v1::WatchEvent, json: bool) {
    if json {
        match portcullis_trail::ocsf::event_record(&ev.event) {
            Ok(v) => print_json(&v),
            Err(e) => print_json(&json!({"seq": ev.seq, "undecodable": e.to_string()})),
        }
        return;
    }
    let line = match v1::Event::decode(ev.event.as_ref()) {
        Ok(e) => match e.body {
            Some(Body::AdmissionGranted(g)) => format!(
                "admission_granted {} {} from {}",
                g.identity_name, g.service, g.source
            ),
            Some(Body::AdmissionDenied(d)) => format!(
                "admission_denied {} {} from {}: {}",
                d.identity, d.service, d.source, d.reason
            ),
            Some(Body::Revocation(r)) => format!(
                "revocation {} {} ({} admissions): {}",
                r.target_kind, r.target, r.admissions_removed, r.reason
            ),
            Some(Body::ControlCall(c)) => format!(
                "control_call {} {} {}: {}",
                c.caller, c.method, c.request, c.outcome
            ),
            Some(Body::PolicyChange(p)) => format!(
                "policy_change {} -> {} accepted={}",
                p.old_version, p.new_version, p.accepted
            ),
            Some(Body::Lifecycle(l)) => format!("lifecycle {:?} {}", l.phase(), l.reason),
            Some(b) => format!("{b:?}")
                .split('(')
                .next()
                .unwrap_or("event")
                .to_lowercase(),
            None => "event".into(),
        },
        Err(e) => format!("undecodable event ({e})"),
    };
    println!("{} {line}", ev.seq);
}
