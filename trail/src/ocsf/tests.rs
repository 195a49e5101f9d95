use super::*;
use portcullis_proto::v1::{
    AdmissionDenied, AdmissionGranted, Checkpoint, ControlCall, CostLine, CostReport, DropSummary,
    Gap, Lifecycle, PolicyChange, ReasonCount, Revocation, SourceCount, SpoolPressure, event::Body,
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
        for open in [true, false] {
            v.push(ev(
                35,
                t,
                Body::Detection(portcullis_proto::v1::Detection {
                    kind: "flood".into(),
                    subject: s.clone(),
                    open,
                    rate: 4000,
                    threshold: 1000,
                    started_unix_ms: t / 1_000_000,
                    duration_ms: if open { 0 } else { 3000 },
                    total: if open { 0 } else { 9000 },
                    detail: s.clone(),
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
                            requests: 9,
                            tokens_in: 10,
                            tokens_out: u64::MAX,
                            gpu_ms: 11,
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
