//! Cost control in a scrape: each budget meter's spend, forecast and the
//! action in force, the approvals, and what the budget loop did
//! (`agent/src/daemon/budgets.rs`). Reading only.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{budget::Action, daemon::node::Node};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeterLabels {
    budget: String,
    /// The meter's scope key ("" for a budget with one meter).
    key: String,
    period: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

fn set(f: &Family<MeterLabels, Gauge>, l: &MeterLabels, v: u64) {
    f.get_or_create(l).set(i64::try_from(v).unwrap_or(i64::MAX));
}

pub fn register(reg: &mut Registry, node: &Node) {
    let view = node.book.budgets();
    let spent = Family::<MeterLabels, Gauge>::default();
    let forecast = Family::<MeterLabels, Gauge>::default();
    let amount = Family::<MeterLabels, Gauge>::default();
    let action = Family::<MeterLabels, Gauge>::default();
    for r in view.readings.values() {
        let l = MeterLabels {
            budget: r.budget.clone(),
            key: r.key.clone(),
            period: r.period.as_str().to_string(),
        };
        set(&spent, &l, r.spent_micros);
        set(&forecast, &l, r.forecast_micros);
        set(&amount, &l, r.amount_micros);
        set(
            &action,
            &l,
            match r.level.map(|t| t.action) {
                None => 0,
                Some(Action::Warn) => 1,
                Some(Action::Throttle) => 2,
                Some(Action::Deny) => 3,
            },
        );
    }
    reg.register(
        "budget_spent_micros",
        "Spend in the budget's period (rolling window or UTC day/month), per budget meter, micro-units",
        spent,
    );
    reg.register(
        "budget_forecast_micros",
        "Spend so far plus the recent rate to the period's end, per budget meter, micro-units",
        forecast,
    );
    reg.register(
        "budget_amount_micros",
        "The budget's amount, micro-units",
        amount,
    );
    reg.register(
        "budget_action",
        "Action in force per budget meter: 0 none, 1 warn, 2 throttle, 3 deny",
        action,
    );
    let approvals = Family::<IdentityLabel, Gauge>::default();
    for (identity, a) in &view.approvals {
        approvals
            .get_or_create(&IdentityLabel {
                identity: identity.clone(),
            })
            .set(i64::try_from(a.amount_micros.saturating_sub(a.used_micros)).unwrap_or(i64::MAX));
    }
    reg.register(
        "budget_approval_left_micros",
        "What an identity's approval still lets through, micro-units",
        approvals,
    );
    let s = node
        .budget_state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let g = |v: usize| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    let c = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    reg.register(
        "budget_throttled_identities",
        "Identities whose kernel rates a budget's throttle lowers now",
        g(s.throttled),
    );
    reg.register(
        "egress_capped_identities",
        "Identities whose egress the extraction guard caps now",
        g(s.capped),
    );
    reg.register(
        "budget_revocations",
        "Admissions revoked because a budget denies, since start",
        c(s.revoked),
    );
}
