//! What a scrape shows: every figure read fresh from the running agent
//! (the kernel's counters and tables, the knock service's counters, the
//! audit trail's state, cost reported) into a Prometheus registry, encoded
//! with `prometheus-client`. Reading only: a scrape changes nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use portcullis_common::{Reason, SHADOW_COUNTERS};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{config::ServiceMode, daemon::node::Node, loader::KernelError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    /// "true": a shadow-mode service passed it instead.
    shadow: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    kind: String,
    subject: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

/// OpenMetrics text as the Prometheus text format 0.0.4: there a counter's
/// `HELP` and `TYPE` name its sample (`x_total`), not its family (`x`),
/// and there is no `# EOF` or `# UNIT`. Sample lines are the same.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The metrics text of `node` now.
pub fn render(node: &Node) -> Result<String, KernelError> {
    let mut reg = Registry::with_prefix("portcullis");
    let (counts, tables, admissions, flows) = node.enforcer.observe(|m| {
        let flows = m.flow_count() as u32;
        Ok::<_, KernelError>((
            m.reason_counts()?,
            m.occupancy(Some(flows))?,
            m.admissions().len(),
            flows,
        ))
    })?;

    let drops = Family::<DropLabels, Counter>::default();
    for r in Reason::ALL.iter().filter(|r| r.is_drop()) {
        for (offset, shadow) in [(0, "false"), (SHADOW_COUNTERS, "true")] {
            drops
                .get_or_create(&DropLabels {
                    reason: r.name().to_string(),
                    shadow: shadow.to_string(),
                })
                .inc_by(counts[(offset + *r as u32) as usize]);
        }
    }
    reg.register(
        "drops",
        "Packets the kernel dropped, by reason; shadow=\"true\": a shadow-mode service's packets it would have dropped and passed",
        drops,
    );
    reg.register(
        "passed_packets",
        "Packets passed to protected services under an admission",
        counter(counts[Reason::Passed as usize]),
    );
    reg.register(
        "knock_datagrams_passed",
        "Knock datagrams the kernel passed to the agent",
        counter(counts[Reason::KnockPassed as usize]),
    );

    let refusals = Family::<ReasonLabel, Counter>::default();
    let mut granted = 0;
    if let Some(k) = &node.knocks {
        for (reason, n) in k.service.counters().snapshot() {
            refusals
                .get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                })
                .inc_by(n);
        }
        granted = k.service.counters().granted.load(Ordering::Relaxed);
    }
    reg.register(
        "admissions_granted",
        "Admissions granted by knock or Admit call",
        counter(granted),
    );
    reg.register(
        "admission_refusals",
        "Knocks and Admit calls refused, by reason",
        refusals,
    );
    reg.register(
        "live_admissions",
        "Admissions in the kernel",
        gauge(admissions as u64),
    );
    reg.register("live_flows", "Flows in the kernel", gauge(u64::from(flows)));

    let entries = Family::<MapLabel, Gauge>::default();
    let capacity = Family::<MapLabel, Gauge>::default();
    let fill = Family::<MapLabel, Gauge<f64, AtomicU64>>::default();
    for t in &tables {
        let l = MapLabel {
            map: t.map.to_string(),
        };
        entries.get_or_create(&l).set(i64::from(t.entries));
        capacity.get_or_create(&l).set(i64::from(t.capacity));
        let ratio = if t.capacity == 0 {
            0.0
        } else {
            f64::from(t.entries) / f64::from(t.capacity)
        };
        fill.get_or_create(&l).set(ratio);
    }
    reg.register(
        "table_entries",
        "Entries in each bounded kernel table",
        entries,
    );
    reg.register(
        "table_capacity",
        "Capacity of each bounded kernel table",
        capacity,
    );
    reg.register(
        "table_fill_ratio",
        "Entries over capacity, per kernel table",
        fill,
    );

    let a = node.auditor.stats();
    reg.register(
        "audit_spool_bytes",
        "Bytes of audit spool segments",
        gauge(a.spool_bytes),
    );
    reg.register(
        "audit_unacknowledged_events",
        "Audit events sealed and not yet acknowledged by the collector (delivery lag)",
        gauge(a.sealed_seq.saturating_sub(a.acked_seq)),
    );
    reg.register(
        "audit_sealed_seq",
        "Highest audit sequence number sealed",
        gauge(a.sealed_seq),
    );
    reg.register(
        "audit_acknowledged_seq",
        "Highest audit sequence number the collector acknowledged",
        gauge(a.acked_seq),
    );

    let reloads = Family::<ResultLabel, Counter>::default();
    let version = Family::<VersionLabel, Gauge>::default();
    match &node.knocks {
        Some(k) => {
            for (result, n) in [
                ("accepted", &k.policy_reloads),
                ("rejected", &k.policy_rejects),
            ] {
                reloads
                    .get_or_create(&ResultLabel {
                        result: result.to_string(),
                    })
                    .inc_by(n.load(Ordering::Relaxed));
            }
            let v = k
                .service
                .admitter()
                .policies()
                .current()
                .version()
                .to_string();
            version.get_or_create(&VersionLabel { version: v }).set(1);
        }
        None => {
            let v = crate::policy::PolicySet::default_set()
                .version()
                .to_string();
            version.get_or_create(&VersionLabel { version: v }).set(1);
        }
    }
    reg.register(
        "policy_reloads",
        "Policy directory edits, accepted or rejected",
        reloads,
    );
    reg.register(
        "policy_info",
        "The policy set in force (its version as a label)",
        version,
    );

    let shadow = Family::<ServiceLabel, Gauge>::default();
    for s in &node.cfg().services {
        let on = node.enforcer.mode(s.id) == ServiceMode::Shadow;
        shadow
            .get_or_create(&ServiceLabel {
                service: s.name.clone(),
            })
            .set(i64::from(on));
    }
    reg.register(
        "service_shadow_mode",
        "1 while a service is in shadow mode",
        shadow,
    );

    let costs = node.costs.snapshot();
    let by_tenant = Family::<TenantLabel, Counter>::default();
    for (tenant, v) in &costs.by_tenant {
        by_tenant
            .get_or_create(&TenantLabel {
                tenant: tenant.clone(),
            })
            .inc_by(*v);
    }
    let by_service = Family::<ServiceLabel, Counter>::default();
    for (service, v) in &costs.by_service {
        by_service
            .get_or_create(&ServiceLabel {
                service: service.clone(),
            })
            .inc_by(*v);
    }
    reg.register(
        "tenant_cost_micros",
        "Cost reported since the agent started, per tenant, in micro-units of accounting.currency",
        by_tenant,
    );
    reg.register(
        "service_cost_micros",
        "Cost reported since the agent started, per service, in micro-units of accounting.currency",
        by_service,
    );

    let mut findings = node
        .findings
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // The extraction guard's episodes are detections too.
    {
        let b = node.budget_state.lock().unwrap_or_else(|p| p.into_inner());
        findings.open.extend(
            b.capped_identities
                .iter()
                .map(|i| ("extraction".to_string(), i.clone())),
        );
        findings
            .opened
            .insert("extraction".to_string(), b.extraction_opened);
    }
    super::budgets::register(&mut reg, node);
    let open = Family::<FindingLabels, Gauge>::default();
    for (kind, subject) in &findings.open {
        open.get_or_create(&FindingLabels {
            kind: kind.clone(),
            subject: subject.clone(),
        })
        .set(1);
    }
    let opened = Family::<KindLabel, Counter>::default();
    for (kind, n) in &findings.opened {
        opened
            .get_or_create(&KindLabel { kind: kind.clone() })
            .inc_by(*n);
    }
    reg.register(
        "detection_open",
        "1 while a detection episode (flood, refusal_storm, spool_stall, extraction) is open",
        open,
    );
    reg.register(
        "detections",
        "Detection episodes opened since start, per kind",
        opened,
    );

    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_in_the_text_format() {
        let om = "# HELP x_drops Dropped.\n# TYPE x_drops counter\nx_drops_total{a=\"b\"} 3\n\
                  # HELP x_live Live.\n# TYPE x_live gauge\nx_live 1\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP x_drops_total Dropped.\n# TYPE x_drops_total counter\nx_drops_total{a=\"b\"} 3\n\
             # HELP x_live Live.\n# TYPE x_live gauge\nx_live 1\n"
        );
    }
}
