//! `portcullis ctl --node NAME=TARGET ...` (or `--nodes-file FILE`): one
//! call on several agents at once. Each node is called by this same
//! program with the node's target in place of the node list, so a node's
//! reply is exactly what `ctl` prints for one node; the replies are
//! gathered and printed per node, and any node's failure (a refusal, an
//! unreachable socket, the time limit) makes the exit status 1.

use std::{ffi::OsString, path::Path, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// One agent: a name for the report and where its control API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Socket(String),
    /// `https://HOST:PORT`, with the call's `--ca/--cert/--key`.
    Endpoint(String),
}

impl Target {
    fn parse(s: &str) -> Target {
        if s.starts_with("https://") || s.starts_with("http://") {
            Target::Endpoint(s.to_string())
        } else {
            Target::Socket(s.to_string())
        }
    }

    fn flag(&self) -> [&str; 2] {
        match self {
            Target::Socket(p) => ["--socket", p],
            Target::Endpoint(u) => ["--endpoint", u],
        }
    }

    fn show(&self) -> &str {
        match self {
            Target::Socket(p) | Target::Endpoint(p) => p,
        }
    }
}

/// The nodes of `--node NAME=TARGET` (repeatable) and of a nodes file
/// (`NAME TARGET` per line, `#` comments), in the order given. Names are
/// unique.
pub fn nodes(flags: &[String], file: Option<&Path>) -> anyhow::Result<Vec<Node>> {
    let mut out: Vec<Node> = Vec::new();
    let mut add = |name: &str, target: &str, from: &str| -> anyhow::Result<()> {
        if name.is_empty() || target.is_empty() {
            bail!("{from}: give NAME=TARGET (TARGET: a control socket path or https://HOST:PORT)");
        }
        if out.iter().any(|n| n.name == name) {
            bail!("{from}: node {name:?} is named twice; node names must be unique");
        }
        out.push(Node {
            name: name.to_string(),
            target: Target::parse(target),
        });
        Ok(())
    };
    for f in flags {
        let (name, target) = f.split_once('=').unwrap_or((f, ""));
        add(name.trim(), target.trim(), &format!("--node {f:?}"))?;
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--nodes-file {}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (name, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let from = format!("{}:{}", path.display(), i + 1);
            if parts.next().is_some() {
                bail!("{from}: one `NAME TARGET` per line");
            }
            add(name, target, &from)?;
        }
    }
    if out.is_empty() {
        bail!("no nodes: give --node NAME=TARGET or a --nodes-file with `NAME TARGET` lines");
    }
    Ok(out)
}

/// This program's arguments without the node list (`--node`,
/// `--nodes-file`, `--node-timeout-secs`, and any `--socket`/`--endpoint`
/// a node's target replaces).
fn single_node_args(args: &[OsString]) -> Vec<OsString> {
    const DROP: [&str; 5] = [
        "--node",
        "--nodes-file",
        "--node-timeout-secs",
        "--socket",
        "--endpoint",
    ];
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = a.to_string_lossy();
        if DROP.contains(&s.as_ref()) {
            skip_value = true;
            continue;
        }
        if DROP.iter().any(|d| s.starts_with(&format!("{d}="))) {
            continue;
        }
        out.push(a.clone());
    }
    out
}

struct Outcome {
    node: Node,
    result: Result<String, String>,
}

/// Calls every node at once and reports per node.
pub async fn run(nodes: Vec<Node>, json: bool, timeout: Duration) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating this program")?;
    let args = single_node_args(&std::env::args_os().skip(1).collect::<Vec<_>>());
    let handles: Vec<_> = nodes
        .into_iter()
        .map(|node| {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(&args)
                .args(node.target.flag())
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let exe = exe.clone();
            let call = tokio::spawn(async move {
                match tokio::time::timeout(timeout, cmd.output()).await {
                    Err(_) => Err(format!("no answer within {} s", timeout.as_secs())),
                    Ok(Err(e)) => Err(format!("cannot run {}: {e}", exe.display())),
                    Ok(Ok(o)) if o.status.success() => {
                        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
                    }
                    Ok(Ok(o)) => {
                        let err = String::from_utf8_lossy(&o.stderr);
                        let err = err.trim().trim_start_matches("portcullis ctl: ");
                        Err(format!("{}{err}", String::from_utf8_lossy(&o.stdout)))
                    }
                }
            });
            (node, call)
        })
        .collect();
    let mut outcomes = Vec::with_capacity(handles.len());
    for (node, call) in handles {
        let result = call
            .await
            .unwrap_or_else(|e| Err(format!("the call failed: {e}")));
        outcomes.push(Outcome { node, result });
    }
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    if json {
        let rows: Vec<Value> = outcomes
            .iter()
            .map(|o| {
                let (ok, reply, error) = match &o.result {
                    Ok(out) => (
                        true,
                        serde_json::from_str::<Value>(out.trim()).unwrap_or(Value::String(out.clone())),
                        Value::Null,
                    ),
                    Err(e) => (false, Value::Null, Value::String(e.trim().to_string())),
                };
                json!({"node": o.node.name, "target": o.node.target.show(), "ok": ok, "reply": reply, "error": error})
            })
            .collect();
        println!(
            "{}",
            json!({"nodes": rows, "ok": outcomes.len() - failed, "failed": failed})
        );
    } else {
        for o in &outcomes {
            let (word, body) = match &o.result {
                Ok(out) => ("ok", out.as_str()),
                Err(e) => ("FAILED", e.as_str()),
            };
            println!("== {} ({}): {word}", o.node.name, o.node.target.show());
            for line in body.trim_end().lines() {
                println!("   {line}");
            }
        }
        println!(
            "{} nodes: {} ok, {failed} failed",
            outcomes.len(),
            outcomes.len() - failed
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_node_list_leaves_the_arguments_and_targets_replace_it() {
        let args = os(&[
            "ctl",
            "--node",
            "a=/s1",
            "--node=b=/s2",
            "--json",
            "revoke",
            "--tenant",
            "acme",
            "--nodes-file",
            "f",
            "--node-timeout-secs=3",
            "--socket",
            "/x",
        ]);
        assert_eq!(
            single_node_args(&args),
            os(&["ctl", "--json", "revoke", "--tenant", "acme"])
        );
    }

    #[test]
    fn nodes_come_from_flags_and_a_file_with_unique_names() {
        let dir = std::env::temp_dir().join(format!("pcl-fleet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nodes");
        std::fs::write(
            &file,
            "# fleet\nb https://b:7400\n\nc /run/c.sock  # third\n",
        )
        .unwrap();
        let n = nodes(&["a=/run/a.sock".into()], Some(&file)).unwrap();
        assert_eq!(
            n,
            vec![
                Node {
                    name: "a".into(),
                    target: Target::Socket("/run/a.sock".into())
                },
                Node {
                    name: "b".into(),
                    target: Target::Endpoint("https://b:7400".into())
                },
                Node {
                    name: "c".into(),
                    target: Target::Socket("/run/c.sock".into())
                },
            ]
        );
        let dup = nodes(&["a=/x".into(), "a=/y".into()], None).unwrap_err();
        assert!(dup.to_string().contains("named twice"), "{dup}");
        let bad = nodes(&["a".into()], None).unwrap_err();
        assert!(bad.to_string().contains("NAME=TARGET"), "{bad}");
        std::fs::write(&file, "a /x extra\n").unwrap();
        let bad = nodes(&[], Some(&file)).unwrap_err();
        assert!(bad.to_string().contains(":1: one `NAME TARGET`"), "{bad}");
        assert!(nodes(&[], None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
