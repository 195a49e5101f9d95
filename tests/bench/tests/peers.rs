//! `portcullis-bench peers` runs end to end, briefly, and reports every
//! part: the flood rows with the admitted client's goodput, knock to open
//! with fwknop really run, and the scale table. It asserts that each
//! figure was measured, not what it is: speed belongs to the benchmark
//! report, not to a test.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis-bench"))
        .arg("peers")
        .args(args)
        .output()
        .expect("run portcullis-bench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "peers {args:?} failed: {stdout}\n{stderr}"
    );
    stdout
}

/// The cells of the table row starting with `| {name} |`.
fn row(report: &str, name: &str) -> Vec<String> {
    let line = report
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{report}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

fn number(cell: &str) -> f64 {
    cell.trim_end_matches(['x', '%'])
        .parse()
        .unwrap_or_else(|_| panic!("{cell:?} is not a figure"))
}

#[test]
fn every_part_of_the_peers_benchmark_measures_what_it_reports() {
    let chart = std::env::temp_dir().join(format!("pcl-peers-{}.svg", std::process::id()));
    let report = run(&[
        "flood",
        "knock",
        "scale",
        "--secs",
        "1",
        "--windows",
        "1",
        "--only",
        "portcullis",
        "--only",
        "iptables",
        "--goodput-kpps",
        "200",
        "--trials",
        "10",
        "--chart",
        chart.to_str().unwrap(),
    ]);
    // Flood: both configurations ran, dropped at a non-zero rate, and
    // the admitted client moved data with and without the flood.
    for name in [
        "portcullis (port-wide service, no admissions)",
        "iptables raw + ipset",
    ] {
        let cells: Vec<Vec<String>> = report
            .lines()
            .filter(|l| l.starts_with(&format!("| {name} |")))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect();
        assert_eq!(cells.len(), 2, "a flood row and a goodput row for {name}");
        assert!(
            number(&cells[0][2]) > 0.0,
            "{name}: no packet reached the node"
        );
        assert!(number(&cells[0][4]) > 0.0, "{name}: no CPU per packet");
        assert!(
            number(&cells[1][1]) > 0.0,
            "{name}: no goodput without the flood"
        );
        assert!(
            number(&cells[1][2]) > 0.0,
            "{name}: no goodput under the flood"
        );
    }
    // Knock to open: every client measured, fwknop really ran.
    for name in [
        "portcullis, client library (knock: send to verified reply)",
        "portcullis knock, CLI (knock: the process)",
        "fwknop SPA, UDP server mode (knock: the client process)",
    ] {
        let r = row(&report, name);
        assert!(
            number(&r[3]) > 0.0 && number(&r[4]) >= number(&r[3]),
            "{name}: {r:?}"
        );
    }
    assert!(
        report.contains("fwknop / portcullis library, to open: p50"),
        "{report}"
    );
    assert!(
        report.contains("portcullis on the node, knock in"),
        "{report}"
    );
    // Scale: the three fills, each with connects measured.
    for fill in ["10", "10000", "1000000"] {
        assert!(number(&row(&report, fill)[1]) > 0.0, "{report}");
    }
    let svg = std::fs::read_to_string(&chart).expect("the chart was written");
    let _ = std::fs::remove_file(&chart);
    assert!(
        svg.starts_with("<svg") && svg.contains("fwknop SPA"),
        "{svg}"
    );
}
