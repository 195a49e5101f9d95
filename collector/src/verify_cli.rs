//! `portcullis audit verify`: the command around [`evidence`](crate::evidence).
//!
//! Exit codes: 0 the trail verified (warnings may be printed), 1 problems
//! were found (the first is printed first), 2 the inputs could not be read
//! or the arguments are wrong.

use std::{path::PathBuf, process::ExitCode};

use serde_json::{Value, json};

use crate::evidence::{Issue, Report, VerifyOptions, verify_files};
use portcullis_trail::verify::{Severity, Trust};

/// Prints the report as `portcullis audit verify` does; true when clean.
pub fn print_report(r: &Report, out: &mut impl std::io::Write) -> std::io::Result<bool> {
    if let Some(first) = r.problems.first() {
        writeln!(out, "FIRST PROBLEM: {}", text(first))?;
    }
    for p in r.problems.iter().skip(1) {
        writeln!(out, "problem: {}", text(p))?;
    }
    for w in &r.warnings {
        let label = if w.severity == Severity::Info {
            "note"
        } else {
            "warning"
        };
        writeln!(out, "{label}: {}", text(w))?;
    }
    for n in &r.nodes {
        let cp = n
            .last_checkpoint
            .map_or_else(|| "none".to_owned(), |s| format!("seq {s}"));
        writeln!(
            out,
            "node {}: seqs {}..={}, {} events, {} checkpoints, signed head {cp}, {} after it unsigned, {} corroborated, acknowledged by the collector through {}, key from {}{}",
            n.node_id,
            n.first_seq,
            n.last_seq,
            n.events,
            n.checkpoints,
            n.unsigned,
            n.corroborated,
            n.acknowledged.map_or_else(
                || "(no collector directory given)".to_owned(),
                |s| format!("seq {s}")
            ),
            n.key_source,
            if n.declared_gaps.is_empty() {
                String::new()
            } else {
                format!(", declared gaps {:?}", n.declared_gaps)
            }
        )?;
    }
    let clean = r.is_clean();
    writeln!(
        out,
        "{}: {} records, {} nodes, {} problems, {} warnings",
        if clean { "OK" } else { "FAILED" },
        r.records,
        r.nodes.len(),
        r.problems.len(),
        r.warnings.len()
    )?;
    Ok(clean)
}

fn text(i: &Issue) -> String {
    if i.at.unit == "input" {
        format!("{}: {}", i.kind, i.message)
    } else {
        i.to_string()
    }
}

fn issue_json(i: &Issue) -> Value {
    let mut v = json!({
        "kind": i.kind,
        "severity": match i.severity {
            Severity::Error => "problem",
            Severity::Warning => "warning",
            Severity::Info => "note",
        },
        "message": i.message,
    });
    if i.at.unit != "input" {
        v["file"] = json!(i.at.file.display().to_string());
        v[i.at.unit] = json!(i.at.line);
    }
    v
}

/// The report as one JSON document (`--json`).
pub fn report_json(r: &Report) -> Value {
    json!({
        "ok": r.is_clean(),
        "records": r.records,
        "problems": r.problems.iter().map(issue_json).collect::<Vec<_>>(),
        "warnings": r.warnings.iter().map(issue_json).collect::<Vec<_>>(),
        "nodes": r.nodes.iter().map(|n| json!({
            "node_id": n.node_id,
            "first_seq": n.first_seq,
            "last_seq": n.last_seq,
            "events": n.events,
            "checkpoints": n.checkpoints,
            "signed_head": n.last_checkpoint,
            "unsigned": n.unsigned,
            "declared_gaps": n.declared_gaps.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
            "corroborated": n.corroborated,
            "acknowledged": n.acknowledged,
            "key_source": n.key_source,
        })).collect::<Vec<_>>(),
    })
}

/// `portcullis audit` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum AuditAction {
    /// Verify collector output and agent spool segments: chains, signatures,
    /// that every record matches its event's bytes, and, given a
    /// collector's output directory, that nothing the collector
    /// acknowledged is missing. Exit status: 0 verified, 1 problems found,
    /// 2 inputs unreadable.
    Verify {
        /// Collector output directories or files, agent spool directories
        /// or segments, in order.
        #[arg(value_name = "PATH", required = true)]
        files: Vec<PathBuf>,
        /// Pinned node keys: lines `NODE_ID KEY` (hex or base64).
        #[arg(long, value_name = "FILE")]
        keys: Option<PathBuf>,
        /// Check checkpoints only with keys from --keys or a collector's
        /// record (never learn one from a trail).
        #[arg(long)]
        pinned_only: bool,
        /// Accept nodes whose key comes only from their own trail
        /// (authenticity not checked) with a warning instead of a problem.
        #[arg(long)]
        allow_unsigned: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an `audit` subcommand; its exit code.
pub fn run_action(action: AuditAction) -> ExitCode {
    let AuditAction::Verify {
        files,
        keys,
        pinned_only,
        allow_unsigned,
        json,
    } = action;
    let pinned = match &keys {
        Some(p) => match portcullis_trail::keys::load_keys_file(p) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("portcullis: error: --keys: {e}");
                return ExitCode::from(2);
            }
        },
        None => Default::default(),
    };
    let opts = VerifyOptions {
        files,
        trust: if pinned_only {
            Trust::Pinned
        } else {
            Trust::Tofu
        },
        pinned,
        allow_unsigned,
    };
    let report = match verify_files(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis: error: audit verify: {e}");
            return ExitCode::from(2);
        }
    };
    let printed = if json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &report_json(&report))
            .map_err(std::io::Error::other)
            .and_then(|()| std::io::Write::write_all(&mut out, b"\n"))
    } else {
        print_report(&report, &mut std::io::stdout().lock()).map(|_| ())
    };
    if let Err(e) = printed {
        eprintln!("portcullis: error: writing the report: {e}");
        return ExitCode::from(2);
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "portcullis: audit verify: {} problems; the first: {}",
            report.problems.len(),
            text(&report.problems[0])
        );
        ExitCode::from(1)
    }
}
