//! How the demo and the fleet tell what they do: numbered chapters with
//! the elapsed time, one line per claim checked (`[ ok ]` or `[FAIL]`),
//! indented output of the commands they run, and a final verdict that is
//! an error when any claim failed (`--non-interactive` runs assert it).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use portcullis_testkit::{Netns, run_in};

pub struct Story {
    start: Instant,
    chapter: u32,
    failures: Vec<String>,
    checked: u32,
}

impl Default for Story {
    fn default() -> Self {
        Story::new()
    }
}

impl Story {
    pub fn new() -> Story {
        Story {
            start: Instant::now(),
            chapter: 0,
            failures: Vec::new(),
            checked: 0,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// `[  12.3 s] 4. title`
    pub fn chapter(&mut self, title: &str) {
        self.chapter += 1;
        println!(
            "\n[{:>6.1} s] {}. {title}",
            self.elapsed().as_secs_f64(),
            self.chapter
        );
    }

    /// Records a claim and whether it held; returns `ok`.
    pub fn step(&mut self, claim: &str, ok: bool) -> bool {
        self.checked += 1;
        println!("  [{}] {claim}", if ok { " ok " } else { "FAIL" });
        if !ok {
            self.failures.push(claim.to_string());
        }
        ok
    }

    /// Output shown as is, indented under the current step.
    pub fn show(&self, text: &str) {
        for line in text.trim_end().lines() {
            println!("         {line}");
        }
    }

    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    /// Ok when every claim held; else an error naming the failed ones.
    pub fn verdict(&self, what: &str) -> anyhow::Result<()> {
        println!();
        if !self.failures.is_empty() {
            bail!(
                "{} of {} {what} step(s) failed: {}",
                self.failures.len(),
                self.checked,
                self.failures.join("; ")
            );
        }
        println!(
            "{what} complete in {:.1} s: all {} claims held; namespaces, programs and processes removed",
            self.elapsed().as_secs_f64(),
            self.checked
        );
        Ok(())
    }
}

/// The `portcullis` node binary: `given`, or next to the running program.
pub fn node_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("this creates network namespaces and loads BPF: run it as root");
    }
    let exe = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this program")?
            .with_file_name("portcullis"),
    };
    if !exe.is_file() {
        bail!(
            "the node binary {} is missing: build it (`cargo build --release -p portcullis-agent`) or give --agent-bin PATH",
            exe.display()
        );
    }
    Ok(exe)
}

/// A development token for `tenant/subject` with scope `model:llm:invoke`
/// and five minutes to live, from the issuer at `dir/issuer`, written to
/// `dir/SUBJECT.jwt`.
pub fn mint_file(
    dir: &Path,
    issuer: &str,
    audience: &str,
    tenant: &str,
    subject: &str,
) -> anyhow::Result<PathBuf> {
    let token = crate::devtoken::mint(
        &dir.join("issuer/issuer.key"),
        crate::devtoken::MintClaims {
            issuer: issuer.into(),
            audience: audience.into(),
            subject: subject.into(),
            tenant: Some(tenant.into()),
            client_id: None,
            roles: vec![],
            scopes: vec!["model:llm:invoke".into()],
            ttl: Duration::from_secs(300),
            cnf_jkt: None,
        },
    )?;
    let path = dir.join(format!("{subject}.jwt"));
    std::fs::write(&path, token)?;
    Ok(path)
}

/// `portcullis knock` for service `llm` from namespace `ns`; true when
/// admitted (a refusal is silence, so false after the retries).
pub fn knock(
    ns: &Netns,
    exe: &Path,
    token: &Path,
    host: &str,
    timeout_ms: u32,
    retries: u32,
) -> anyhow::Result<bool> {
    let token = token.to_string_lossy();
    let (timeout, retries) = (timeout_ms.to_string(), retries.to_string());
    let args = [
        "knock",
        "--token-file",
        &token,
        "--service",
        "llm",
        "--timeout-ms",
        &timeout,
        "--retries",
        &retries,
        host,
    ];
    Ok(run_in(ns, exe, &args)?.status.success())
}
