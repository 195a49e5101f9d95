//! What the benchmarks share: numeric options, the `--n N` option and a row
//! of sorted latencies.

use std::{ops::RangeInclusive, time::Duration};

use anyhow::{Context, Result, bail};

/// The value of a numeric option `name` (the next argument): digits with
/// optional `_` separators, within `range`.
pub fn number(name: &str, value: Option<String>, range: RangeInclusive<u64>) -> Result<u64> {
    let v = value.with_context(|| format!("{name} needs a value"))?;
    let n: u64 = v
        .replace('_', "")
        .parse()
        .with_context(|| format!("{name} {v:?}: not a number"))?;
    if !range.contains(&n) {
        bail!("{name} must be {} to {}", range.start(), range.end());
    }
    Ok(n)
}

/// Parses `[--n N] [--help]`: the calls per row, `default` when absent.
pub fn parse_n(
    mut args: impl Iterator<Item = String>,
    default: usize,
    range: RangeInclusive<usize>,
    usage: &str,
) -> Result<usize> {
    let mut n = default;
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--n" => {
                let r = *range.start() as u64..=*range.end() as u64;
                n = number("--n", args.next(), r)? as usize;
            }
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?}\n{usage}"),
        }
    }
    Ok(n)
}

/// Latencies of one row, sorted, and the loop's wall time.
pub struct Row {
    sorted: Vec<Duration>,
    wall: Duration,
}

impl Row {
    pub fn new(mut lat: Vec<Duration>, wall: Duration) -> Row {
        lat.sort();
        Row { sorted: lat, wall }
    }

    pub fn pct(&self, p: f64) -> Duration {
        let i = ((self.sorted.len() as f64 - 1.0) * p).round() as usize;
        self.sorted[i.min(self.sorted.len() - 1)]
    }

    pub fn per_sec(&self) -> f64 {
        self.sorted.len() as f64 / self.wall.as_secs_f64()
    }
}

/// The agent config of an in-process benchmark: one invoke service and a
/// `[tokens]` section. The programs are loaded unattached, so the interface
/// is a name that cannot exist: nothing is ever attached anywhere.
pub fn agent_config(
    dir: &std::path::Path,
    jwks: &std::path::Path,
    issuer: &str,
    audience: &str,
    service: &str,
) -> Result<portcullis_agent::config::Config> {
    let state = portcullis_e2e::e2e::state_sections(Some("bench"), dir);
    let text = format!(
        r#"{state}[kernel]
interfaces = ["pcl-bench-none"]
pin_dir = "{dir}/pins"

[[services]]
name = "{service}"
port = 8000
action = "invoke"
# Every bench knock is one identity from many sources.
max_sources_per_identity = 1048576

[tokens]
jwks_file = "{jwks}"
issuer = "{issuer}"
audience = "{audience}"
"#,
        dir = dir.display(),
        jwks = jwks.display(),
    );
    portcullis_agent::config::Config::from_toml_str(&text).context("bench config")
}
