//! `portcullis-bench budgets [--identities N] [--ticks N]`: the CPU the
//! agent's once-a-second cost control takes for N active identities with
//! three budgets each (each identity per UTC day, each identity over a
//! rolling 30 days, each tenant at the service per month), next to the
//! same accounting tick without budgets, measured in the same run.
//!
//! Driven through the code the daemon runs: `Accountant::tick` (charge
//! the kernel's counters, roll the periods, evaluate every meter, write
//! the ledger) and the budget loop's verdict for every live admission
//! (`BudgetView::verdict`). Every identity has new usage every second,
//! so every meter moves each tick: the worst case. The figure is the
//! thread's CPU time per tick, i.e. the share of one core the loop
//! takes at one tick a second. Benchmarks report; they do not fail.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use portcullis_agent::{
    accounting::{Accountant, SpendBook},
    config::{Config, identity_key, service_id},
    loader::maps::Usage,
};
use portcullis_common::IdentityStats;
use portcullis_testkit::TempDir;

use crate::support::number;

pub const USAGE: &str = "usage: portcullis-bench budgets [--identities N] [--ticks N]
  --identities N  active identities (default 10000)
  --ticks N       one-second ticks measured per configuration (default 20)";

const TENANTS: usize = 100;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer for the calling thread's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn config(ledger: &std::path::Path, budgets: bool) -> Result<Config> {
    let b = if budgets {
        r#"
[[budgets]]
name = "each-day"
identity = "*"
period = "day"
amount_micros = 50000000
thresholds = [{ percent = 80, action = "warn" }, { percent = 100, action = "throttle" }, { percent = 150, action = "deny" }]

[[budgets]]
name = "each-30d"
identity = "*"
period = "30d"
amount_micros = 1000000000
thresholds = [{ percent = 90, action = "warn" }, { percent = 100, action = "deny" }]

[[budgets]]
name = "tenant-llm"
tenant = "*"
service = "llm"
period = "month"
amount_micros = 10000000000
thresholds = [{ percent = 100, action = "throttle" }]
"#
    } else {
        ""
    };
    Config::from_toml_str(&format!(
        r#"
[kernel]
interfaces = ["bench0"]

[[services]]
name = "llm"
port = 8000
price = {{ per_connection_micros = 100, per_mib_in_micros = 2000, per_mib_out_micros = 8000 }}

[accounting]
ledger = "{}"
{b}
"#,
        ledger.display()
    ))
    .context("bench config")
}

fn name(i: usize) -> (String, String) {
    let tenant = format!("t{}", i % TENANTS);
    (format!("{tenant}/u{i}"), tenant)
}

/// One configuration: (CPU per tick of the accounting tick, of the
/// verdict pass, ledger bytes).
fn measure(n: usize, ticks: usize, budgets: bool) -> Result<(Vec<Duration>, Vec<Duration>, u64)> {
    let dir = TempDir::new("bench-budgets").context("temp dir")?;
    let ledger = dir.path().join("ledger.json");
    let cfg = config(&ledger, budgets)?;
    let book = SpendBook::new();
    let mut acct = Accountant::open(&cfg, book.clone())?;
    let names: Vec<(String, String)> = (0..n).map(name).collect();
    for (who, tenant) in &names {
        acct.know(who, tenant);
    }
    let svc = service_id("llm");
    let start = SystemTime::now();
    let rows = |tick: u64| -> Vec<Usage> {
        names
            .iter()
            .enumerate()
            .map(|(i, (who, _))| Usage {
                slot: i as u32 + 1,
                identity_key: identity_key(who),
                service: svc,
                stats: IdentityStats {
                    connections: tick,
                    packets_in: tick * 10,
                    bytes_in: tick * 40_000,
                    packets_out: tick * 20,
                    bytes_out: tick * 160_000,
                    dropped: 0,
                },
            })
            .collect()
    };
    // Tick 0 catches up (not a rate); then warm the meters once.
    acct.tick(start, "bench/1", &rows(1))?;
    acct.tick(start + Duration::from_secs(1), "bench/1", &rows(2))?;
    let mut tick_cpu = Vec::with_capacity(ticks);
    let mut verdict_cpu = Vec::with_capacity(ticks);
    for t in 0..ticks as u64 {
        let r = rows(t + 3);
        let at = start + Duration::from_secs(t + 2);
        let c0 = thread_cpu();
        acct.tick(at, "bench/1", &r)?;
        let c1 = thread_cpu();
        let view = book.budgets();
        let mut enforced = 0usize;
        for (who, tenant) in &names {
            if view.verdict(who, tenant, Some("llm")).enforced().is_some() {
                enforced += 1;
            }
        }
        let c2 = thread_cpu();
        std::hint::black_box(enforced);
        tick_cpu.push(c1 - c0);
        verdict_cpu.push(c2 - c1);
    }
    if budgets {
        let meters = book.budgets().readings.len();
        // Per identity two meters, per tenant one.
        if meters != 2 * n + TENANTS.min(n) {
            bail!(
                "{meters} meters evaluated, expected {}",
                2 * n + TENANTS.min(n)
            );
        }
    }
    let bytes = std::fs::metadata(&ledger).map(|m| m.len()).unwrap_or(0);
    Ok((tick_cpu, verdict_cpu, bytes))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub struct Figures {
    pub base_tick: Duration,
    pub tick: Duration,
    pub verdicts: Duration,
    pub base_ledger: u64,
    pub ledger: u64,
}

pub fn run(n: usize, ticks: usize) -> Result<Figures> {
    eprintln!("budgets: {n} identities, {ticks} ticks without budgets ...");
    let (base, _, base_ledger) = measure(n, ticks, false)?;
    eprintln!("budgets: {n} identities x 3 budgets, {ticks} ticks ...");
    let (with, verdicts, ledger) = measure(n, ticks, true)?;
    Ok(Figures {
        base_tick: median(base),
        tick: median(with),
        verdicts: median(verdicts),
        base_ledger,
        ledger,
    })
}

pub fn main(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut n = 10_000usize;
    let mut ticks = 20usize;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--identities" => n = number("--identities", args.next(), 1..=1_000_000)? as usize,
            "--ticks" => ticks = number("--ticks", args.next(), 1..=10_000)? as usize,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    let f = run(n, ticks)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let total = f.tick + f.verdicts;
    println!();
    println!(
        "cost control, once a second: {n} active identities x 3 budgets ({} meters), median of {ticks} ticks",
        2 * n + TENANTS.min(n)
    );
    println!();
    println!("| part | CPU ms per tick | share of one core |");
    println!("|---|---:|---:|");
    println!(
        "| accounting tick without budgets (baseline) | {:.2} | {:.1}% |",
        ms(f.base_tick),
        ms(f.base_tick) / 10.0
    );
    println!(
        "| accounting tick with budgets (charge, evaluate, ledger write) | {:.2} | {:.1}% |",
        ms(f.tick),
        ms(f.tick) / 10.0
    );
    println!(
        "| verdicts for {n} live admissions | {:.2} | {:.1}% |",
        ms(f.verdicts),
        ms(f.verdicts) / 10.0
    );
    println!(
        "| budget loop in all | {:.2} | {:.1}% ({:.2}x the baseline tick) |",
        ms(total),
        ms(total) / 10.0,
        total.as_secs_f64() / f.base_tick.as_secs_f64().max(1e-9)
    );
    println!();
    println!(
        "- ledger written each tick: {} KiB with budgets, {} KiB without",
        f.ledger / 1024,
        f.base_ledger / 1024
    );
    Ok(())
}
