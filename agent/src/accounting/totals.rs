//! Cost reported since the agent started, summed per tenant and per
//! service: what the metrics endpoint exposes as counters. Fed from each
//! cost report once it is in the audit trail, so the metrics never show
//! cost the trail does not.

use std::{collections::BTreeMap, sync::Mutex};

use portcullis_proto::v1::CostReport;

#[derive(Default)]
pub struct CostTotals {
    inner: Mutex<Sums>,
}

#[derive(Default, Clone)]
pub struct Sums {
    pub by_tenant: BTreeMap<String, u64>,
    pub by_service: BTreeMap<String, u64>,
}

impl CostTotals {
    /// Adds a recorded report's lines.
    pub fn add(&self, report: &CostReport) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for l in &report.lines {
            let t = s.by_tenant.entry(l.tenant.clone()).or_default();
            *t = t.saturating_add(l.cost_micros);
            let v = s.by_service.entry(l.service.clone()).or_default();
            *v = v.saturating_add(l.cost_micros);
        }
    }

    pub fn snapshot(&self) -> Sums {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use portcullis_proto::v1::CostLine;

    use super::*;

    #[test]
    fn reports_add_up_per_tenant_and_service() {
        let t = CostTotals::default();
        let line = |tenant: &str, service: &str, cost| CostLine {
            tenant: tenant.into(),
            service: service.into(),
            cost_micros: cost,
            ..Default::default()
        };
        t.add(&CostReport {
            lines: vec![line("acme", "llm", 5), line("beta", "llm", 7)],
            ..Default::default()
        });
        t.add(&CostReport {
            lines: vec![line("acme", "embed", 1)],
            ..Default::default()
        });
        let s = t.snapshot();
        assert_eq!(s.by_tenant["acme"], 6);
        assert_eq!(s.by_tenant["beta"], 7);
        assert_eq!(s.by_service["llm"], 12);
        assert_eq!(s.by_service["embed"], 1);
    }
}
