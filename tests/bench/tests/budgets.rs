//! `portcullis-bench budgets` runs briefly and reports every row of the
//! budget loop's cost, with budgets really evaluated (the benchmark
//! itself checks the meter count). It asserts that each figure was
//! measured, not what it is.

use std::process::Command;

#[test]
fn the_budget_loop_benchmark_measures_what_it_reports() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"))
        .args(["budgets", "--identities", "500", "--ticks", "3"])
        .output()
        .expect("run portcullis-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "budgets failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("500 active identities x 3 budgets (1100 meters)"),
        "{stdout}"
    );
    for row in [
        "| accounting tick without budgets (baseline) |",
        "| accounting tick with budgets (charge, evaluate, ledger write) |",
        "| verdicts for 500 live admissions |",
        "| budget loop in all |",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{stdout}"));
        let ms: f64 = line.split('|').nth(2).unwrap().trim().parse().unwrap();
        assert!(ms > 0.0, "{row} measured nothing: {line}");
    }
}
