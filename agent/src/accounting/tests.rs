use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use portcullis_common::IdentityStats;

use super::*;
use crate::{
    config::{Config, identity_key, service_id},
    identity::IdentityName,
    loader::maps::Usage,
};
use portcullis_trail::time::days_from_civil;

const MIB: u64 = 1 << 20;
const DAY: i64 = 86_400;
const INST: &str = "boot-a/17";

/// llm: 1000 per connection, 2,000,000 per MiB in, 4,000,000 per MiB out;
/// embed: 10 per connection only.
fn config(ledger: &Path) -> Config {
    config_with(ledger, "")
}

/// [`config`] with more tables (budgets).
fn config_with(ledger: &Path, extra: &str) -> Config {
    Config::from_toml_str(&format!(
        r#"
[kernel]
interfaces = ["eth0"]

[[services]]
name = "llm"
port = 8000
price = {{ per_connection_micros = 1000, per_mib_in_micros = 2000000, per_mib_out_micros = 4000000 }}

[[services]]
name = "embed"
port = 8001
price = {{ per_connection_micros = 10 }}

[accounting]
ledger = "{}"
currency = "EUR"
{extra}
"#,
        ledger.display()
    ))
    .unwrap()
}

struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "portcullis-acct-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn ledger(&self) -> PathBuf {
        self.0.join("state").join("ledger.json")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn llm() -> u32 {
    service_id("llm")
}
fn embed() -> u32 {
    service_id("embed")
}

/// 2026-11-24T12:00:00Z plus `secs`.
fn at(secs: i64) -> SystemTime {
    let base = days_from_civil(2026, 11, 24) * DAY + 12 * 3_600;
    UNIX_EPOCH + Duration::from_secs((base + secs) as u64)
}

fn row(slot: u32, identity: &str, service: u32, conns: u64, bin: u64, bout: u64) -> Usage {
    Usage {
        slot,
        identity_key: identity_key(identity),
        service,
        stats: IdentityStats {
            connections: conns,
            packets_in: conns,
            bytes_in: bin,
            packets_out: conns,
            bytes_out: bout,
            dropped: 0,
        },
    }
}

fn open(dir: &Dir) -> Accountant {
    let cfg = config(&dir.ledger());
    let mut a = Accountant::open(&cfg, SpendBook::new()).unwrap();
    a.know("alice", "acme");
    a.know("bob", "acme");
    a.know("carol", "");
    a
}

fn month(a: &Accountant, who: &str) -> u64 {
    a.spend(who).month_micros
}

#[test]
fn deltas_become_cost_by_the_price_table() {
    let dir = Dir::new();
    let mut a = open(&dir);
    let s = a
        .tick(at(0), INST, &[row(1, "alice", llm(), 2, 3 * MIB, MIB)])
        .unwrap();
    // 2 * 1000 + 3 * 2,000,000 + 1 * 4,000,000
    assert_eq!(s.cost_micros, 10_002_000);
    // Cumulative counters: only the growth is charged.
    let s = a
        .tick(
            at(1),
            INST,
            &[
                row(1, "alice", llm(), 3, 3 * MIB, MIB),
                row(1, "alice", embed(), 5, 100, 100),
            ],
        )
        .unwrap();
    assert_eq!(s.cost_micros, 1_000 + 50);
    assert_eq!(month(&a, "alice"), 10_003_050);
    assert_eq!(a.spend("alice").day_micros, 10_003_050);
    assert_eq!(a.tenant_spend("acme").month_micros, 10_003_050);
    // Nothing new: nothing charged.
    let s = a
        .tick(
            at(2),
            INST,
            &[
                row(1, "alice", llm(), 3, 3 * MIB, MIB),
                row(1, "alice", embed(), 5, 100, 100),
            ],
        )
        .unwrap();
    assert_eq!(s, TickSummary::default());
}

#[test]
fn slot_reuse_and_counter_reset_never_go_negative_or_double_count() {
    let dir = Dir::new();
    let mut a = open(&dir);
    a.tick(at(0), INST, &[row(5, "alice", embed(), 100, 0, 0)])
        .unwrap();
    assert_eq!(month(&a, "alice"), 1_000);
    // Slot 5 freed and given to bob: the agent zeroed its rows, so bob's
    // counters start from zero even though they are below alice's.
    a.tick(at(1), INST, &[row(5, "bob", embed(), 7, 0, 0)])
        .unwrap();
    assert_eq!(month(&a, "bob"), 70);
    assert_eq!(month(&a, "alice"), 1_000);
    // Bob's counters going up past alice's old value: only his growth.
    a.tick(at(2), INST, &[row(5, "bob", embed(), 150, 0, 0)])
        .unwrap();
    assert_eq!(month(&a, "bob"), 1_500);
    // A counter going down (reset): what it holds now is new usage.
    a.tick(at(3), INST, &[row(5, "bob", embed(), 3, 0, 0)])
        .unwrap();
    assert_eq!(month(&a, "bob"), 1_530);
    // The slot disappears (freed) and comes back to alice, zeroed.
    a.tick(at(4), INST, &[]).unwrap();
    a.tick(at(5), INST, &[row(5, "alice", embed(), 2, 0, 0)])
        .unwrap();
    assert_eq!(month(&a, "alice"), 1_020);
    assert_eq!(month(&a, "bob"), 1_530);
}

#[test]
fn restart_with_adopted_counters_neither_forgets_nor_double_counts() {
    let dir = Dir::new();
    let mut a = open(&dir);
    a.tick(at(0), INST, &[row(1, "alice", llm(), 1, MIB, 0)])
        .unwrap();
    let before = month(&a, "alice");
    assert_eq!(before, 2_001_000);
    drop(a);
    // Restart, maps adopted (same instance), traffic continued meanwhile.
    let mut a = open(&dir);
    assert_eq!(month(&a, "alice"), before, "spend loaded from the ledger");
    a.tick(at(10), INST, &[row(1, "alice", llm(), 2, 2 * MIB, 0)])
        .unwrap();
    assert_eq!(month(&a, "alice"), before + 2_001_000);
    // Same counters again after another restart: nothing more.
    drop(a);
    let mut a = open(&dir);
    a.tick(at(11), INST, &[row(1, "alice", llm(), 2, 2 * MIB, 0)])
        .unwrap();
    assert_eq!(month(&a, "alice"), before + 2_001_000);
}

#[test]
fn fresh_counters_after_restart_start_from_zero() {
    let dir = Dir::new();
    let mut a = open(&dir);
    a.tick(at(0), INST, &[row(1, "alice", llm(), 1, 0, 0)])
        .unwrap();
    drop(a);
    // The maps were created afresh: another instance. Its counters are
    // all new usage, even where they exceed the old baseline.
    let mut a = open(&dir);
    a.tick(at(5), "boot-a/99", &[row(1, "alice", llm(), 3, 0, 0)])
        .unwrap();
    assert_eq!(month(&a, "alice"), 4_000);
}

#[test]
fn remainders_carry_so_small_ticks_cost_what_one_big_tick_does() {
    let dir = Dir::new();
    let mut small = open(&dir);
    // 1000 ticks of 1000 bytes in and 333 out each.
    for i in 1..=1000u64 {
        small
            .tick(
                at(i as i64),
                INST,
                &[row(1, "alice", llm(), 0, i * 1000, i * 333)],
            )
            .unwrap();
    }
    let dir2 = Dir::new();
    let mut big = open(&dir2);
    big.tick(
        at(1000),
        INST,
        &[row(1, "alice", llm(), 0, 1_000_000, 333_000)],
    )
    .unwrap();
    let want = ((1_000_000u128 * 2_000_000) >> 20) + ((333_000u128 * 4_000_000) >> 20);
    assert_eq!(u128::from(month(&big, "alice")), want);
    assert_eq!(month(&small, "alice"), month(&big, "alice"));
    // Carries survive a restart too.
    drop(small);
    let mut small = open(&dir);
    small
        .tick(
            at(2000),
            INST,
            &[row(1, "alice", llm(), 0, MIB + 1_000_000, 333_000)],
        )
        .unwrap();
    assert_eq!(u128::from(month(&small, "alice")), want + 2_000_000);
}

#[test]
fn day_and_month_roll_over_at_utc_boundaries() {
    let dir = Dir::new();
    let mut a = open(&dir);
    let day_left = 12 * 3_600; // at(0) is noon
    a.tick(at(0), INST, &[row(1, "alice", embed(), 10, 0, 0)])
        .unwrap();
    a.tick(
        at(day_left - 1),
        INST,
        &[row(1, "alice", embed(), 20, 0, 0)],
    )
    .unwrap();
    assert_eq!(a.periods().1, "2026-11-24");
    assert_eq!(a.spend("alice").day_micros, 200);
    // Midnight: a new day, same month.
    a.tick(at(day_left), INST, &[row(1, "alice", embed(), 25, 0, 0)])
        .unwrap();
    assert_eq!(a.periods().1, "2026-11-25");
    let s = a.spend("alice");
    assert_eq!((s.month_micros, s.day_micros), (250, 50));
    assert_eq!(a.tenant_spend("acme").day_micros, 50);
    // 2026-12-01T00:00:00Z: a new month.
    let dec = day_left + 6 * DAY;
    a.tick(at(dec - 1), INST, &[row(1, "alice", embed(), 30, 0, 0)])
        .unwrap();
    assert_eq!(a.periods().0, "2026-11");
    assert_eq!(month(&a, "alice"), 300);
    a.tick(at(dec), INST, &[row(1, "alice", embed(), 31, 0, 0)])
        .unwrap();
    assert_eq!(a.periods(), ("2026-12", "2026-12-01", at_secs(dec)));
    let s = a.spend("alice");
    assert_eq!((s.month_micros, s.day_micros), (10, 10));
    assert_eq!(a.tenant_spend("acme").month_micros, 10);
    // The report says which periods the to-date figures are for.
    let r = a.take_report(at(dec)).unwrap();
    assert_eq!(
        (r.month.as_str(), r.day.as_str()),
        ("2026-12", "2026-12-01")
    );
}

fn at_secs(secs: i64) -> i64 {
    at(secs).duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn clock_stepped_back_does_not_reopen_a_period() {
    let dir = Dir::new();
    let mut a = open(&dir);
    let midnight = 12 * 3_600;
    a.tick(
        at(midnight + 5),
        INST,
        &[row(1, "alice", embed(), 10, 0, 0)],
    )
    .unwrap();
    assert_eq!(a.periods().1, "2026-11-25");
    // The wall clock steps back into the previous day: still the 25th,
    // the day is not reset, and nothing is charged twice.
    a.tick(at(100), INST, &[row(1, "alice", embed(), 12, 0, 0)])
        .unwrap();
    assert_eq!(a.periods().1, "2026-11-25");
    assert_eq!(a.spend("alice").day_micros, 120);
    // Back across a month too, and across a restart.
    drop(a);
    let mut a = open(&dir);
    a.tick(at(-40 * DAY), INST, &[row(1, "alice", embed(), 13, 0, 0)])
        .unwrap();
    assert_eq!(a.periods().0, "2026-11");
    assert_eq!(a.periods().1, "2026-11-25");
    let s = a.spend("alice");
    assert_eq!((s.month_micros, s.day_micros), (130, 130));
    // Once the clock is right again, the day rolls over normally.
    a.tick(
        at(midnight + DAY),
        INST,
        &[row(1, "alice", embed(), 14, 0, 0)],
    )
    .unwrap();
    assert_eq!(a.periods().1, "2026-11-26");
    assert_eq!(a.spend("alice").day_micros, 10);
}

#[test]
fn corrupt_ledger_is_a_startup_error_naming_file_and_fix() {
    let dir = Dir::new();
    let path = dir.ledger();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    for bad in ["{ not json", "{\"version\": 99}", ""] {
        std::fs::write(&path, bad).unwrap();
        let err = match Accountant::open(&config(&path), SpendBook::new()) {
            Ok(_) => panic!("accepted {bad:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("move it aside"), "{err}");
        // Not silently reset.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), bad);
    }
    // A good ledger with a wrong format version names the version.
    let mut a = {
        std::fs::remove_file(&path).unwrap();
        open(&dir)
    };
    a.tick(at(0), INST, &[row(1, "alice", embed(), 1, 0, 0)])
        .unwrap();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"version\": 1", "\"version\": 7");
    std::fs::write(&path, text).unwrap();
    let err = Accountant::open(&config(&path), SpendBook::new())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("version 7"), "{err}");
}

#[test]
fn ledger_is_written_atomically_and_reads_back() {
    let dir = Dir::new();
    let mut a = open(&dir);
    a.tick(at(0), INST, &[row(1, "alice", llm(), 1, 12_345, 0)])
        .unwrap();
    let path = dir.ledger();
    assert!(path.exists());
    assert!(!path.with_file_name("ledger.json.tmp").exists());
    // Spend names identities and tenants: owner only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(
        v["identities"]["alice"]["month_micros"],
        serde_json::json!(1_000 + ((12_345u64 * 2_000_000) >> 20))
    );
    assert_eq!(v["counters"], serde_json::json!(INST));
}

#[test]
fn forecast_is_spend_plus_recent_rate_over_the_rest_of_the_month() {
    let dir = Dir::new();
    let mut a = open(&dir);
    // First tick: catch-up, not a rate.
    a.tick(at(0), INST, &[row(1, "alice", embed(), 1_000, 0, 0)])
        .unwrap();
    let s = a.spend("alice");
    assert_eq!(s.forecast_month_micros, s.month_micros);
    // Then 10 connections (100 micro-units) per second for 100 seconds.
    for i in 1..=100u64 {
        a.tick(
            at(i as i64),
            INST,
            &[row(1, "alice", embed(), 1_000 + 10 * i, 0, 0)],
        )
        .unwrap();
    }
    let s = a.spend("alice");
    assert_eq!(s.month_micros, 10_000 + 10_000);
    let left = period::periods(at_secs(100)).month_left_secs;
    assert_eq!(s.forecast_month_micros, s.month_micros + 100 * left);
    // Tenant forecast the same way (alice is all of acme).
    assert_eq!(
        a.tenant_spend("acme").forecast_month_micros,
        s.forecast_month_micros
    );
    // Idle for longer than the window: the rate drops to zero.
    a.tick(
        at(100 + 600),
        INST,
        &[row(1, "alice", embed(), 2_000, 0, 0)],
    )
    .unwrap();
    let s = a.spend("alice");
    assert_eq!(s.forecast_month_micros, s.month_micros);
    // Saturates instead of overflowing.
    let dir_b = Dir::new();
    let mut b = open(&dir_b);
    b.tick(at(0), INST, &[]).unwrap();
    b.tick(
        at(1),
        INST,
        &[row(1, "carol", llm(), 0, u64::MAX, u64::MAX)],
    )
    .unwrap();
    assert_eq!(b.spend("carol").forecast_month_micros, u64::MAX);
}

#[test]
fn reports_accumulate_until_committed() {
    let dir = Dir::new();
    let mut a = open(&dir);
    a.tick(at(0), INST, &[row(1, "alice", llm(), 1, MIB, 0)])
        .unwrap();
    a.tick(
        at(1),
        INST,
        &[
            row(1, "alice", llm(), 2, MIB, 0),
            row(2, "carol", embed(), 4, 0, 0),
        ],
    )
    .unwrap();
    let r = a.take_report(at(2)).unwrap();
    assert_eq!(r.currency, "EUR");
    assert_eq!(r.interval_start_unix_ns, at_secs(0) * 1_000_000_000);
    assert_eq!(r.interval_ns, 2_000_000_000);
    assert_eq!(r.lines.len(), 2);
    let alice = r.lines.iter().find(|l| l.identity == "alice").unwrap();
    assert_eq!(
        (
            alice.service.as_str(),
            alice.tenant.as_str(),
            alice.connections,
            alice.bytes_in
        ),
        ("llm", "acme", 2, MIB)
    );
    assert_eq!(alice.cost_micros, 2_002_000);
    assert_eq!(alice.identity_month_micros, 2_002_000);
    assert_eq!(alice.tenant_month_micros, 2_002_000);
    // The spool refused it: restored, and the next report has it all.
    a.restore_report();
    a.tick(
        at(3),
        INST,
        &[
            row(1, "alice", llm(), 3, MIB, 0),
            row(2, "carol", embed(), 4, 0, 0),
        ],
    )
    .unwrap();
    let r = a.take_report(at(4)).unwrap();
    assert_eq!(r.interval_start_unix_ns, at_secs(0) * 1_000_000_000);
    let alice = r.lines.iter().find(|l| l.identity == "alice").unwrap();
    assert_eq!((alice.connections, alice.cost_micros), (3, 2_003_000));
    // Usage while a report is in flight goes to the next one.
    a.tick(
        at(5),
        INST,
        &[
            row(1, "alice", llm(), 4, MIB, 0),
            row(2, "carol", embed(), 4, 0, 0),
        ],
    )
    .unwrap();
    a.commit_report().unwrap();
    let r = a.take_report(at(6)).unwrap();
    assert_eq!(r.interval_start_unix_ns, at_secs(4) * 1_000_000_000);
    assert_eq!(r.lines.len(), 1);
    assert_eq!((r.lines[0].connections, r.lines[0].cost_micros), (1, 1_000));
    a.commit_report().unwrap();
    assert!(a.take_report(at(7)).is_none(), "nothing new");
    // Unreported usage survives a restart.
    a.tick(
        at(8),
        INST,
        &[
            row(1, "alice", llm(), 6, MIB, 0),
            row(2, "carol", embed(), 4, 0, 0),
        ],
    )
    .unwrap();
    drop(a);
    let mut a = open(&dir);
    let r = a.take_report(at(9)).unwrap();
    assert_eq!(r.lines[0].connections, 2);
}

#[test]
fn spend_book_names_identities_and_feeds_policy() {
    let dir = Dir::new();
    let cfg = config(&dir.ledger());
    let book = SpendBook::new();
    let mut a = Accountant::open(&cfg, book.clone()).unwrap();
    // What the admitter asks while deciding a knock of dave@globex.
    let name = IdentityName::new(Some("globex"), "dave").display();
    assert_eq!(book.spend(&name, Some("globex")), (0, 0));
    a.tick(at(0), INST, &[row(3, &name, embed(), 0, 0, 0)])
        .unwrap();
    a.tick(at(1), INST, &[row(3, &name, embed(), 5, 0, 0)])
        .unwrap();
    let (month, forecast) = book.spend(&name, Some("globex"));
    assert_eq!(month, 50);
    assert!(forecast >= month);
    assert_eq!(book.tenant("globex").month_micros, 50);
    // An identity nobody named is reported by its key.
    a.tick(at(2), INST, &[row(4, "mallory", embed(), 1, 0, 0)])
        .unwrap();
    let r = a.take_report(at(3)).unwrap();
    let hex = format!("#{:016x}", identity_key("mallory"));
    assert!(r.lines.iter().any(|l| l.identity == hex), "{r:?}");
}

#[test]
fn reported_usage_is_charged_durably_reported_and_carries_fractions_across_restarts() {
    let dir = Dir::new();
    let path = dir.ledger();
    let cfg = Config::from_toml_str(&format!(
        r#"
[kernel]
interfaces = ["eth0"]

[[services]]
name = "llm"
port = 8000
price = {{ per_mtok_in_micros = 3, per_mtok_out_micros = 2000000, per_request_micros = 7 }}

[accounting]
ledger = "{}"
"#,
        path.display()
    ))
    .unwrap();
    let mut a = Accountant::open(&cfg, SpendBook::new()).unwrap();
    assert!(!a.knows("acme/alice"), "never seen");
    a.tick(at(0), INST, &[]).unwrap();
    let usage = |requests, tokens_in, tokens_out| Counters {
        requests,
        tokens_in,
        tokens_out,
        ..Counters::default()
    };
    // 500,000 tokens in at 3 per million: 1.5, charged 1, 0.5 carried.
    let (cost, spend) = a
        .report_usage(
            at(1),
            "acme/alice",
            "acme",
            llm(),
            &usage(1, 500_000, 1_000_000),
        )
        .unwrap()
        .unwrap();
    assert_eq!(cost, 7 + 1 + 2_000_000);
    assert_eq!(spend.month_micros, cost);
    assert!(
        spend.forecast_month_micros > cost,
        "the report counts as recent rate"
    );
    assert!(a.knows("acme/alice"));
    assert_eq!(a.tenant_spend("acme").month_micros, cost);
    assert!(
        a.report_usage(at(1), "acme/alice", "acme", 12345, &usage(1, 0, 0))
            .unwrap()
            .is_none(),
        "a service with no price table charges nothing"
    );
    // Durable before the reply: a restart finds the spend and the carry.
    drop(a);
    let mut a = Accountant::open(&cfg, SpendBook::new()).unwrap();
    assert_eq!(a.spend("acme/alice").month_micros, 2_000_008);
    let (cost, _) = a
        .report_usage(at(2), "acme/alice", "acme", llm(), &usage(0, 500_000, 0))
        .unwrap()
        .unwrap();
    assert_eq!(cost, 2, "1.5 + the carried 0.5");
    // The cost report carries what was reported, summed.
    let r = a.take_report(at(3)).expect("a report");
    let l = &r.lines[0];
    assert_eq!(
        (l.requests, l.tokens_in, l.tokens_out),
        (1, 1_000_000, 1_000_000)
    );
    assert_eq!(l.cost_micros, 2_000_010);
    assert_eq!(l.identity_month_micros, 2_000_010);
}

/// The spend of budget `name`'s meter `key` as of the last evaluation.
fn meter(a: &Accountant, name: &str, key: &str) -> Option<u64> {
    a.spend_book()
        .budgets()
        .readings
        .get(&(name.to_string(), key.to_string()))
        .map(|r| r.spent_micros)
}

#[test]
fn a_budget_period_rolls_over_exactly_once_also_across_restarts() {
    let dir = Dir::new();
    let budgets = r#"
[[budgets]]
name = "daily"
identity = "*"
period = "day"
amount_micros = 1000000
thresholds = [{ percent = 80, action = "warn" }]
"#;
    let open_b = || {
        let mut a =
            Accountant::open(&config_with(&dir.ledger(), budgets), SpendBook::new()).unwrap();
        a.know("alice", "acme");
        a
    };
    let day_left = 12 * 3_600; // at(0) is noon
    let mut a = open_b();
    a.tick(
        at(day_left - 10),
        INST,
        &[row(1, "alice", embed(), 10, 0, 0)],
    )
    .unwrap();
    assert_eq!(meter(&a, "daily", "alice"), Some(100));
    // The agent stops before midnight and starts after it.
    drop(a);
    let mut a = open_b();
    a.tick(
        at(day_left + 5),
        INST,
        &[row(1, "alice", embed(), 15, 0, 0)],
    )
    .unwrap();
    assert_eq!(
        meter(&a, "daily", "alice"),
        Some(50),
        "the new day starts from zero"
    );
    // Restarted again the same day: not reset a second time.
    drop(a);
    let mut a = open_b();
    a.tick(
        at(day_left + 10),
        INST,
        &[row(1, "alice", embed(), 20, 0, 0)],
    )
    .unwrap();
    assert_eq!(meter(&a, "daily", "alice"), Some(100));
    // A wall clock stepped back before midnight neither reopens
    // yesterday nor resets today.
    a.tick(
        at(day_left - 100),
        INST,
        &[row(1, "alice", embed(), 25, 0, 0)],
    )
    .unwrap();
    assert_eq!(meter(&a, "daily", "alice"), Some(150));
    let list = a.budget_list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].1, budgets::Origin::Config);
    // The recent rate the forecast gates on survives a restart too.
    let forecast = |a: &Accountant| {
        a.spend_book().budgets().readings[&("daily".to_string(), "alice".to_string())]
            .forecast_micros
    };
    let before = forecast(&a);
    assert!(before > 150, "a recent rate: {before}");
    drop(a);
    let a = open_b();
    assert_eq!(forecast(&a), before);
}

#[test]
fn run_time_budgets_and_approvals_are_kept_in_the_ledger() {
    let dir = Dir::new();
    let mut a = open(&dir);
    a.tick(at(0), INST, &[row(1, "alice", embed(), 10, 0, 0)])
        .unwrap();
    let d = crate::budget::BudgetDraft {
        name: "alice-day".into(),
        identity: Some("alice".into()),
        period: "day".into(),
        amount_micros: 1_000,
        thresholds: vec![(100, "deny".into())],
        ..Default::default()
    };
    let (b, replaced) = a.set_budget(&d).unwrap();
    assert!(!replaced);
    assert_eq!(b.amount_micros, 1_000);
    // A name the config owns is refused, as is an unknown identity's
    // approval or one with no amount.
    assert!(a.remove_budget("nope").is_err());
    let until = at(3_600).duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(a.approve(at(1), "mallory", 5, until, "t", "").is_err());
    assert!(a.approve(at(1), "alice", 0, until, "t", "").is_err());
    assert!(
        a.approve(at(1), "alice", 5, 10, "t", "").is_err(),
        "in the past"
    );
    a.approve(at(1), "alice", 500, until, "t", "why").unwrap();
    drop(a);
    let a = open(&dir);
    let list = a.budget_list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].0, b);
    assert_eq!(list[0].1, budgets::Origin::Control);
    let view = a.spend_book().budgets();
    assert_eq!(view.approvals["alice"].amount_micros, 500);
    assert_eq!(view.approvals["alice"].reason, "why");
}
