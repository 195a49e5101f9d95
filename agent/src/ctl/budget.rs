//! `portcullis ctl budget` (list, set, remove, approve) and `ctl spend`:
//! arguments, the call, and the tables (docs/cost-control.md).

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use portcullis_proto::v1::{self, budget_request::Op, control_client::ControlClient};
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::{
    server,
    show::{print_json, table},
};

#[derive(Subcommand)]
pub enum BudgetCall {
    /// The budgets in force, their meters and the approvals.
    List,
    /// Add or replace a budget (operator); kept across restarts.
    Set(SetArgs),
    /// Remove a budget set with `set` (operator).
    Remove {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Let one identity go past its budgets until an amount or a time,
    /// whichever comes first (operator; audited).
    Approve(ApproveArgs),
}

#[derive(Args)]
pub struct SetArgs {
    #[arg(value_name = "NAME")]
    name: String,
    /// An identity (`TENANT/SUBJECT` or `SUBJECT`), or `*` for each one.
    #[arg(long, conflicts_with = "tenant")]
    identity: Option<String>,
    /// A tenant, or `*` for each one.
    #[arg(long)]
    tenant: Option<String>,
    /// A service (alone, or with the identity or tenant).
    #[arg(long)]
    service: Option<String>,
    /// day, month (UTC calendar), 7d or 30d (rolling).
    #[arg(long)]
    period: String,
    /// Micro-units of the price table's currency (1 unit = 1000000).
    #[arg(long, allow_hyphen_values = true)]
    amount: i64,
    /// A threshold, `PERCENT:ACTION` with ACTION warn, throttle or deny;
    /// repeatable, by rising percent. Default: 80:warn and 100:deny.
    #[arg(long = "at", value_name = "PERCENT:ACTION", value_parser = threshold)]
    at: Vec<(i64, String)>,
    /// Percent of its limits a throttled identity keeps (default 10).
    #[arg(long, default_value_t = 0)]
    throttle_percent: i64,
}

#[derive(Args)]
pub struct ApproveArgs {
    #[arg(long)]
    identity: String,
    /// Micro-units it may spend past its budgets.
    #[arg(long, allow_hyphen_values = true)]
    amount: i64,
    /// When it ends: `YYYY-MM-DDTHH:MM:SSZ`, or from now `+30m`, `+8h`,
    /// `+2d`.
    #[arg(long)]
    until: String,
    #[arg(long, default_value = "")]
    reason: String,
}

fn threshold(s: &str) -> Result<(i64, String), String> {
    let (p, a) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: give PERCENT:ACTION, e.g. 80:warn"))?;
    let p = p
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?}: {p:?} is not a whole percent"))?;
    Ok((p, a.to_string()))
}

/// `--until` as Unix seconds.
fn until(s: &str, now: i64) -> anyhow::Result<i64> {
    if let Some(rel) = s.strip_prefix('+') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: i64 = n
            .parse()
            .with_context(|| format!("--until {s:?}: give +30m, +8h or +2d"))?;
        let secs = match unit {
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => bail!("--until {s:?}: the unit is m, h or d"),
        };
        return Ok(now.saturating_add(n.saturating_mul(secs)));
    }
    portcullis_trail::time::parse_utc(s).with_context(|| {
        format!("--until {s:?}: give YYYY-MM-DDTHH:MM:SSZ (UTC) or +30m, +8h, +2d")
    })
}

fn micros(v: u64) -> String {
    format!("{}.{:06}", v / 1_000_000, v % 1_000_000)
}

pub async fn budget(
    c: &mut ControlClient<Channel>,
    call: BudgetCall,
    json: bool,
) -> anyhow::Result<()> {
    let op = match call {
        BudgetCall::List => Op::List(v1::Empty {}),
        BudgetCall::Set(a) => Op::Set(v1::BudgetSpec {
            name: a.name,
            identity: a.identity.unwrap_or_default(),
            tenant: a.tenant.unwrap_or_default(),
            service: a.service.unwrap_or_default(),
            period: a.period,
            amount_micros: a.amount,
            thresholds: if a.at.is_empty() {
                vec![(80, "warn".to_string()), (100, "deny".to_string())]
            } else {
                a.at
            }
            .into_iter()
            .map(|(percent, action)| v1::ThresholdSpec { percent, action })
            .collect(),
            throttle_percent: a.throttle_percent,
        }),
        BudgetCall::Remove { name } => Op::Remove(name),
        BudgetCall::Approve(a) => Op::Approve(v1::ApproveSpec {
            until_unix_secs: until(
                &a.until,
                portcullis_trail::time::unix_secs(std::time::SystemTime::now()),
            )?,
            identity: a.identity,
            amount_micros: a.amount,
            reason: a.reason,
        }),
    };
    let r = c
        .budget(v1::BudgetRequest { op: Some(op) })
        .await
        .map_err(server)?
        .into_inner();
    show_budgets(&r, json);
    Ok(())
}

fn show_budgets(r: &v1::BudgetReply, json: bool) {
    if json {
        let budgets: Vec<Value> = r
            .budgets
            .iter()
            .map(|b| {
                let s = b.spec.clone().unwrap_or_default();
                json!({
                    "name": s.name, "identity": s.identity, "tenant": s.tenant, "service": s.service,
                    "period": s.period, "amount_micros": s.amount_micros,
                    "thresholds": s.thresholds.iter().map(|t| json!({"percent": t.percent, "action": t.action})).collect::<Vec<_>>(),
                    "throttle_percent": s.throttle_percent, "origin": b.origin,
                    "meters": b.meters.iter().map(|m| json!({
                        "key": m.key, "spent_micros": m.spent_micros, "forecast_micros": m.forecast_micros,
                        "rate_micros_per_hour": m.rate_micros_per_hour, "forecast_percent": m.forecast_percent,
                        "action": m.action, "horizon_secs": m.horizon_secs,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let approvals: Vec<Value> = r
            .approvals
            .iter()
            .map(|a| json!({"identity": a.identity, "amount_micros": a.amount_micros, "used_micros": a.used_micros, "until_unix_secs": a.until_unix_secs, "by": a.by, "reason": a.reason}))
            .collect();
        print_json(
            &json!({"currency": r.currency, "budgets": budgets, "approvals": approvals, "replaced": r.replaced, "warnings": r.warnings}),
        );
        return;
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let mut rows = Vec::new();
    for b in &r.budgets {
        let s = b.spec.clone().unwrap_or_default();
        let scope = [
            ("identity", &s.identity),
            ("tenant", &s.tenant),
            ("service", &s.service),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
        let at = s
            .thresholds
            .iter()
            .map(|t| format!("{}:{}", t.percent, t.action))
            .collect::<Vec<_>>()
            .join(" ");
        let head = vec![
            s.name.clone(),
            scope,
            s.period.clone(),
            micros(u64::try_from(s.amount_micros).unwrap_or(0)),
            at,
            b.origin.clone(),
        ];
        if b.meters.is_empty() {
            rows.push(
                [
                    head.clone(),
                    vec!["".into(), micros(0), micros(0), "0%".into(), "".into()],
                ]
                .concat(),
            );
        }
        for m in &b.meters {
            rows.push(
                [
                    head.clone(),
                    vec![
                        m.key.clone(),
                        micros(m.spent_micros),
                        micros(m.forecast_micros),
                        format!("{}%", m.forecast_percent),
                        m.action.clone(),
                    ],
                ]
                .concat(),
            );
        }
    }
    table(
        &[
            "BUDGET",
            "SCOPE",
            "PERIOD",
            "AMOUNT",
            "THRESHOLDS",
            "FROM",
            "KEY",
            "SPENT",
            "FORECAST",
            "OF AMOUNT",
            "ACTION",
        ],
        &rows,
    );
    if !r.approvals.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = r
            .approvals
            .iter()
            .map(|a| {
                vec![
                    a.identity.clone(),
                    micros(a.used_micros),
                    micros(a.amount_micros),
                    portcullis_trail::time::format_utc(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(
                                u64::try_from(a.until_unix_secs).unwrap_or(0),
                            ),
                    ),
                    a.by.clone(),
                    a.reason.clone(),
                ]
            })
            .collect();
        table(&["APPROVED", "USED", "OF", "UNTIL", "BY", "REASON"], &rows);
    }
    println!("(amounts in {})", r.currency);
}

pub async fn spend(c: &mut ControlClient<Channel>, by: String, json: bool) -> anyhow::Result<()> {
    let r = c
        .spend(v1::SpendRequest { by })
        .await
        .map_err(server)?
        .into_inner();
    if json {
        let rows: Vec<Value> = r
            .rows
            .iter()
            .map(|s| json!({
                "name": s.name, "day_micros": s.day_micros, "month_micros": s.month_micros,
                "forecast_month_micros": s.forecast_month_micros, "rate_micros_per_hour": s.rate_micros_per_hour,
                "budget_action": s.budget_action, "budget": s.budget,
                "budget_forecast_percent": s.budget_forecast_percent, "approved": s.approved,
            }))
            .collect();
        print_json(
            &json!({"by": r.by, "currency": r.currency, "month": r.month, "day": r.day, "rows": rows}),
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                micros(s.day_micros),
                micros(s.month_micros),
                micros(s.forecast_month_micros),
                micros(s.rate_micros_per_hour),
                if s.budget.is_empty() {
                    String::new()
                } else {
                    format!("{} ({}%)", s.budget, s.budget_forecast_percent)
                },
                format!(
                    "{}{}",
                    s.budget_action,
                    if s.approved { " (approved)" } else { "" }
                ),
            ]
        })
        .collect();
    let by = r.by.to_uppercase();
    table(
        &[
            &by,
            &format!("DAY {}", r.day),
            &format!("MONTH {}", r.month),
            "FORECAST MONTH",
            "RATE/HOUR",
            "BUDGET",
            "ACTION",
        ],
        &rows,
    );
    println!("(amounts in {})", r.currency);
    Ok(())
}
