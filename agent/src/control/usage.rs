//! `ReportUsage`: what a model server says it served an identity (requests,
//! tokens, GPU time), checked, then priced by the service's table into the
//! identity's spend through the node's one accountant
//! (`agent/src/accounting.rs`), which persists the ledger before the call
//! returns. The next policy decision sees the new spend and forecast.

use std::{collections::VecDeque, sync::Mutex, time::SystemTime};

use portcullis_proto::v1;
use tonic::Status;

use super::{Node, listing};
use crate::{accounting::Counters, identity::IdentityName};

/// Largest figures one report may carry. A model server reports per
/// request or per batch; anything above these is a bug or an attack, and
/// is refused rather than charged.
pub const MAX_REQUESTS: u64 = 1_000_000;
pub const MAX_TOKENS: u64 = 1_000_000_000;
/// 10^10 ms: about 116 GPU-days in one report.
pub const MAX_GPU_MS: u64 = 10_000_000_000;
const MAX_REPORT_ID: usize = 128;
/// Report ids remembered for retries (not across restarts).
const REMEMBERED_IDS: usize = 65_536;

/// The last report ids charged, oldest first.
#[derive(Default)]
pub struct SeenReports {
    inner: Mutex<(std::collections::HashSet<String>, VecDeque<String>)>,
}

impl SeenReports {
    fn contains(&self, id: &str) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .contains(id)
    }

    fn insert(&self, id: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *g;
        if set.insert(id.to_string()) {
            order.push_back(id.to_string());
            if order.len() > REMEMBERED_IDS
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
    }
}

/// The request's usage, each figure within its bound; nothing at all is
/// refused too (a report of nothing is a caller's bug).
fn usage(r: &v1::ReportUsageRequest) -> Result<Counters, Status> {
    for (field, v, max) in [
        ("requests", r.requests, MAX_REQUESTS),
        ("tokens_in", r.tokens_in, MAX_TOKENS),
        ("tokens_out", r.tokens_out, MAX_TOKENS),
        ("gpu_ms", r.gpu_ms, MAX_GPU_MS),
    ] {
        if v > max {
            return Err(Status::invalid_argument(format!(
                "{field} {v} is over the {max} one report may carry; report per request or per batch"
            )));
        }
    }
    let u = Counters {
        requests: r.requests,
        tokens_in: r.tokens_in,
        tokens_out: r.tokens_out,
        gpu_ms: r.gpu_ms,
        ..Counters::default()
    };
    if !u.has_traffic() {
        return Err(Status::invalid_argument(
            "the report is empty; give at least one of requests, tokens_in, tokens_out, gpu_ms",
        ));
    }
    Ok(u)
}

pub fn report(
    node: &Node,
    seen: &SeenReports,
    r: &v1::ReportUsageRequest,
    now: SystemTime,
) -> Result<v1::ReportUsageReply, Status> {
    let Some(who) = &r.identity else {
        return Err(Status::invalid_argument(
            "identity is missing; give the tenant (if any) and subject of the token the request was served for",
        ));
    };
    if who.subject.is_empty() {
        return Err(Status::invalid_argument(
            "identity.subject is empty; give the token's subject (and its tenant, if it has one)",
        ));
    }
    if r.report_id.len() > MAX_REPORT_ID || r.report_id.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "report_id must be at most {MAX_REPORT_ID} printable characters"
        )));
    }
    let cfg = node.cfg();
    let service = cfg
        .service(&r.service)
        .ok_or_else(|| listing::unknown_service(&cfg, &r.service))?;
    let usage = usage(r)?;
    let tenant = (!who.tenant.is_empty()).then_some(who.tenant.as_str());
    let name = IdentityName::new(tenant, &who.subject).display();
    let currency = node.cfg().accounting.currency.clone();
    let mut acct = node.accountant();
    if !acct.knows(&name) {
        return Err(Status::not_found(format!(
            "identity {name} has no admission or spend on this node; report usage to the node that admitted it"
        )));
    }
    if !r.report_id.is_empty() && seen.contains(&r.report_id) {
        let s = acct.spend(&name);
        return Ok(v1::ReportUsageReply {
            cost_micros: 0,
            currency,
            month_micros: s.month_micros,
            day_micros: s.day_micros,
            forecast_month_micros: s.forecast_month_micros,
            duplicate: true,
            identity: name,
        });
    }
    let charged = acct
        .report_usage(now, &name, tenant.unwrap_or(""), service.id, &usage)
        .map_err(|e| Status::unavailable(format!("usage not recorded: {e}")))?;
    let Some((cost, s)) = charged else {
        return Err(listing::unknown_service(&node.cfg(), &r.service));
    };
    // Remembered under the accountant's lock: a retry racing the first
    // attempt waits for it and then finds its id.
    if !r.report_id.is_empty() {
        seen.insert(&r.report_id);
    }
    drop(acct);
    tracing::info!(
        event = "usage_reported",
        identity = %name,
        service = %service.name,
        requests = r.requests,
        tokens_in = r.tokens_in,
        tokens_out = r.tokens_out,
        gpu_ms = r.gpu_ms,
        cost_micros = cost,
        "usage reported"
    );
    Ok(v1::ReportUsageReply {
        cost_micros: cost,
        currency,
        month_micros: s.month_micros,
        day_micros: s.day_micros,
        forecast_month_micros: s.forecast_month_micros,
        duplicate: false,
        identity: name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_bounded_and_a_report_of_nothing_is_refused() {
        let ok = v1::ReportUsageRequest {
            tokens_out: 10,
            ..Default::default()
        };
        assert_eq!(usage(&ok).unwrap().tokens_out, 10);
        let empty = v1::ReportUsageRequest::default();
        assert!(usage(&empty).unwrap_err().message().contains("empty"));
        for (f, r) in [
            (
                "requests",
                v1::ReportUsageRequest {
                    requests: MAX_REQUESTS + 1,
                    ..Default::default()
                },
            ),
            (
                "tokens_in",
                v1::ReportUsageRequest {
                    tokens_in: u64::MAX,
                    ..Default::default()
                },
            ),
            (
                "gpu_ms",
                v1::ReportUsageRequest {
                    gpu_ms: MAX_GPU_MS + 1,
                    ..Default::default()
                },
            ),
        ] {
            let e = usage(&r).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(f), "{}", e.message());
        }
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let s = SeenReports::default();
        for i in 0..REMEMBERED_IDS + 10 {
            s.insert(&i.to_string());
        }
        assert!(!s.contains("0"), "the oldest are forgotten");
        assert!(s.contains(&(REMEMBERED_IDS + 9).to_string()));
        let g = s.inner.lock().unwrap();
        assert_eq!(g.0.len(), REMEMBERED_IDS);
        assert_eq!(g.1.len(), REMEMBERED_IDS);
    }
}
