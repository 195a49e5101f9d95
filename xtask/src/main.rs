//! Developer tasks for portcullis, run as `cargo xtask <task>`.
//!
//! Every task shells out to the ordinary tools (rustup, cargo, apt-get, mount)
//! with inherited stdio and stops at the first command that fails.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

/// bpf-linker must link the same LLVM as the nightly rustc; 0.10.3 does.
const BPF_LINKER_VERSION: &str = "0.10.3";
/// Debian packages the tests and the demo use.
// `prometheus` for `promtool check metrics` in the metrics test; `systemd`
// for `systemd-analyze verify` of deploy/systemd; the peers `bench peers`
// compares with: iptables with ipset, nftables, xdp-tools (xdp-filter),
// fwknop's SPA server and client (installed with START_DAEMON="no": nothing
// runs on the host).
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "ethtool",
    "prometheus",
    "systemd",
    "iptables",
    "ipset",
    "nftables",
    "xdp-tools",
    "fwknop-server",
    "fwknop-client",
];
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "portcullis developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install prerequisites: toolchains, bpf-linker, Debian packages, bpffs (root, idempotent)
    Setup,
    /// Build release binaries (the agent's build.rs builds the eBPF object)
    Build,
    /// Run the test suite as root; extra arguments go to `cargo test`
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Check formatting, run clippy with warnings denied, check crate dependencies
    Lint,
    /// setup, then lint, then test
    Ci,
    /// Run benchmarks; extra arguments go to the benchmark binary
    Bench {
        what: Bench,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run `portcullis-fleet`: three nodes with their own agents, one client, one collector, in network namespaces; extra arguments go to it
    Fleet {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run `portcullis-demo` with the release node binary; extra arguments go to the demo
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// XDP per-packet cost (BPF_PROG_TEST_RUN)
    Xdp,
    /// Knock admission path, in process (needs PyJWT and cryptography)
    Admission,
    /// Cedar policy decisions (10/100/1000 policies) vs token verification
    Policy,
    /// Audit events agent → collector (fsync both sides) vs the local spool only
    Events,
    /// Control API: Admit vs a knock, Revoke delay (a real agent in namespaces)
    Control,
    /// A spoofed SYN flood against portcullis, iptables, nftables, xdp-filter and a trivial XDP_DROP
    Peers,
    /// Cost control's once-a-second loop: 10k identities x 3 budgets vs the accounting tick alone
    Budgets,
    /// Every benchmark, each with its defaults
    All,
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup(),
        Task::Build => build(),
        Task::Test { args } => test(&args),
        Task::Lint => lint(),
        Task::Ci => {
            setup()?;
            lint()?;
            test(&[])
        }
        Task::Bench { what, args } => bench(what, &args),
        Task::Demo { args } => demo(&args),
        Task::Fleet { args } => fleet(&args),
    }
}

// ---- tasks ----------------------------------------------------------------

fn setup() -> Result<()> {
    require_root("setup", "it installs system packages and mounts bpffs")?;
    ensure_nightly()?;
    ensure_component("nightly", "rust-src")?;
    ensure_component("stable", "clippy")?;
    ensure_component("stable", "rustfmt")?;
    ensure_bpf_linker()?;
    ensure_apt_packages()?;
    ensure_python_packages()?;
    ensure_kustomize()?;
    ensure_bpffs()?;
    println!("setup: done");
    Ok(())
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--release"]))
}

fn test(args: &[String]) -> Result<()> {
    require_root(
        "test",
        "it loads BPF programs and creates network namespaces",
    )?;
    // The end-to-end tests run the real `portcullis` (and
    // `portcullis-collector`) binaries from target/release, so build them
    // first rather than rely on cargo test's side effects.
    build()?;
    run(cargo().args(["test", "--release"]).args(args))
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    check_dependencies()
}

/// What must never be in a crate's dependency tree: the collector and the
/// knock client run where there is no BPF, the knock client inside model
/// server clients, and the trail format must build anywhere.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "portcullis-collector",
        &["aya", "aya-obj", "portcullis-ebpf"],
    ),
    (
        "portcullis-knock",
        &["aya", "aya-obj", "portcullis-ebpf", "cedar-policy"],
    ),
    (
        "portcullis-trail",
        &[
            "aya",
            "aya-obj",
            "portcullis-ebpf",
            "tokio",
            "tonic",
            "cedar-policy",
        ],
    ),
];

/// `cargo tree -p CRATE` (all edge kinds, dev-dependencies included) holds
/// none of the crate's forbidden packages.
fn check_dependencies() -> Result<()> {
    for (krate, forbidden) in FORBIDDEN {
        let tree =
            capture(cargo().args(["tree", "-p", krate, "--prefix", "none", "--format", "{p}"]))?;
        let found: Vec<&str> = tree
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| forbidden.contains(name))
            .collect();
        if !found.is_empty() {
            bail!(
                "{krate} depends on {found:?}, which it must not (see `cargo tree -p {krate} -i NAME`)"
            );
        }
        println!("lint: {krate} has none of {forbidden:?}");
    }
    Ok(())
}

fn bench(what: Bench, args: &[String]) -> Result<()> {
    match what {
        Bench::Xdp => bench_run("xdp", args),
        Bench::Admission => bench_run("admission", args),
        Bench::Policy => bench_run("policy", args),
        Bench::Events => {
            // It runs the real `portcullis collector` from target/release.
            build()?;
            bench_run("events", args)
        }
        Bench::Control => {
            // It runs the real `portcullis` agent from target/release.
            build()?;
            bench_run("control", args)
        }
        Bench::Peers => {
            build()?;
            bench_run("peers", args)
        }
        Bench::Budgets => bench_run("budgets", args),
        Bench::All => {
            if !args.is_empty() {
                bail!(
                    "extra arguments go to one benchmark: `cargo xtask bench xdp|admission|policy|events|control|peers|budgets ARGS`"
                );
            }
            bench_run("xdp", &[])?;
            bench_run("admission", &[])?;
            bench_run("policy", &[])?;
            bench_run("budgets", &[])?;
            build()?;
            bench_run("events", &[])?;
            bench_run("control", &[])?;
            bench_run("peers", &[])
        }
    }
}

/// `portcullis-bench NAME ARGS...` (release build).
fn bench_run(name: &str, args: &[String]) -> Result<()> {
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "portcullis-bench",
            "--bin",
            "portcullis-bench",
        ])
        .args(["--", name])
        .args(args))
}

fn demo(args: &[String]) -> Result<()> {
    namespaced("portcullis-demo", args)
}

fn fleet(args: &[String]) -> Result<()> {
    namespaced("portcullis-fleet", args)
}

/// Builds, then runs a program of the test crate that sets up network
/// namespaces, with the release node binary.
fn namespaced(program: &str, args: &[String]) -> Result<()> {
    require_root(
        program,
        "it creates network namespaces and loads BPF programs",
    )?;
    build()?;
    let release = target_dir().join("release");
    run(Command::new(release.join(program))
        .current_dir(workspace_root())
        .arg("--agent-bin")
        .arg(release.join("portcullis"))
        .args(args))
}

// ---- setup steps ----------------------------------------------------------

fn ensure_nightly() -> Result<()> {
    let list = capture(Command::new("rustup").args(["toolchain", "list"]))?;
    if list.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: nightly toolchain present");
        return Ok(());
    }
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

fn ensure_component(toolchain: &str, component: &str) -> Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    let prefix = format!("{component}-");
    if installed
        .lines()
        .any(|l| l == component || l.starts_with(&prefix))
    {
        println!("setup: {component} ({toolchain}) present");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", component, "--toolchain", toolchain]))
}

fn ensure_bpf_linker() -> Result<()> {
    let version = capture(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    run(Command::new("cargo").args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
    ]))
}

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!(
            "setup: Debian packages present ({})",
            APT_PACKAGES.join(", ")
        );
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(", "));
    run(apt().arg("update"))?;
    run(apt()
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
}

/// PyJWT with `cryptography`: the independent JWT implementation the
/// interop tests and the admission benchmark mint tokens with;
/// `pydantic-ocsf`: the OCSF schema exports and models that
/// tests/ocsf/validate.py checks the collector's records against;
/// `kubernetes-validate`: the Kubernetes OpenAPI schemas (bundled, no
/// cluster or network needed) that deploy/kubernetes is validated against.
const PYTHON_PACKAGES: [&str; 4] = [
    "pyjwt==2.15.1",
    "cryptography==48.0.0",
    "pydantic-ocsf==3.0.0",
    "kubernetes-validate==1.34.1",
];
/// What the probe imports: every package above.
const PYTHON_PROBE: &str = "import jwt, cryptography, ocsf.v1_7_0.events, kubernetes_validate";

/// The project's virtual environment (`.venv/`): the tests use its
/// interpreter (tests/kit/src/python.rs); nothing goes into the system's.
fn venv_python() -> PathBuf {
    workspace_root().join(".venv/bin/python3")
}

fn ensure_python_packages() -> Result<()> {
    let python = venv_python();
    if !python.exists() {
        println!("setup: creating the Python environment .venv");
        run(Command::new("python3")
            .args(["-m", "venv"])
            .arg(workspace_root().join(".venv")))
        .context("python3 -m venv (Debian: apt-get install python3-venv)")?;
    }
    let probe = Command::new(&python).args(["-c", PYTHON_PROBE]).output();
    if probe.is_ok_and(|o| o.status.success()) {
        println!(
            "setup: Python packages present in .venv ({})",
            PYTHON_PACKAGES.join(", ")
        );
        return Ok(());
    }
    println!(
        "setup: installing Python packages into .venv: {}",
        PYTHON_PACKAGES.join(", ")
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PYTHON_PACKAGES))
}

/// deploy/kubernetes is rendered with kubectl's built-in kustomize (v5
/// syntax). Debian's own kubectl is too old for it, so it is not installed
/// from there: the machine image provides it.
fn ensure_kustomize() -> Result<()> {
    let out = Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    match out {
        Ok(o)
            if o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("Kustomize Version: v5") =>
        {
            println!("setup: kubectl with kustomize v5 present");
            Ok(())
        }
        _ => bail!(
            "kubectl with kustomize v5 (kubectl 1.27 or later) is needed to render deploy/kubernetes: \
             install it from https://kubernetes.io/docs/tasks/tools/"
        ),
    }
}

fn dpkg_installed(package: &str) -> bool {
    capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status == "install ok installed")
}

fn ensure_bpffs() -> Result<()> {
    let fs_type = capture(Command::new("stat").args(["-f", "-c", "%T", BPFFS]))?;
    if fs_type == "bpf_fs" {
        println!("setup: bpffs mounted at {BPFFS}");
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

// ---- helpers --------------------------------------------------------------

fn require_root(task: &str, why: &str) -> Result<()> {
    let uid = capture(Command::new("id").arg("-u"))?;
    if uid != "0" {
        bail!("`cargo xtask {task}` must run as root ({why}); current uid is {uid}");
    }
    Ok(())
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Runs a command with inherited stdio; fails naming the command.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    println!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its trimmed stdout; fails naming the command.
fn capture(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_args(argv: &[&str]) -> Vec<String> {
        match Cli::try_parse_from(argv).expect("parses").task {
            Task::Test { args } => args,
            _ => panic!("not the test task"),
        }
    }

    #[test]
    fn test_passes_extra_arguments_through() {
        assert!(test_args(&["xtask", "test"]).is_empty());
        assert_eq!(test_args(&["xtask", "test", "knock"]), ["knock"]);
        assert_eq!(
            test_args(&["xtask", "test", "--", "knock", "--", "--nocapture"]),
            ["knock", "--", "--nocapture"]
        );
    }
}
