//! `portcullis-bench admission [--n N]`: the knock admission path, in process
//! (`tests/bench/src/admission.rs`).
//!
//! `portcullis-bench policy [--n N]`: the Cedar admission decision for 10,
//! 100 and 1000 policies next to token verification and a cached admission
//! (`tests/bench/src/policy.rs`).
//!
//! `portcullis-bench control [--n N]`: the control API's Admit next to a
//! knock, and Revoke's delay, against a real agent in namespaces
//! (`tests/bench/src/control.rs`).
//!
//! `portcullis-bench events [--secs N]`: audit events from the agent to a
//! real collector, sustained, against the same events written to the local
//! spool only (`tests/bench/src/events.rs`).
//!
//! `portcullis-bench xdp [--repeat N] [--singles N]`: per-packet cost of the
//! XDP ingress program's paths, measured with BPF_PROG_TEST_RUN (the
//! kernel-reported average over `repeat` runs of the same frame), against a
//! program that only returns XDP_DROP. Each figure is the median of five
//! measurements.
//!
//! `portcullis-bench peers [--secs N] [--windows N]`: a spoofed SYN flood
//! against portcullis and the filters it is compared with, node CPU per
//! packet (`tests/bench/src/peers.rs`).
//!
//! `portcullis-bench budgets [--identities N] [--ticks N]`: the CPU of the
//! once-a-second cost control for N identities with three budgets each,
//! against the accounting tick without budgets
//! (`tests/bench/src/budgets.rs`). Benchmarks report; they never fail on
//! a missed target.

use std::process::ExitCode;

mod admission;
mod budgets;
mod control;
mod events;
mod flood;
mod goodput;
mod peers;
mod policy;
mod support;
mod xdp;
mod xdp_clamp;
mod xdp_scale;

const USAGE: &str = "usage: portcullis-bench xdp [--repeat N] [--singles N]
  --repeat N   runs per BPF_PROG_TEST_RUN call (default 1000000)
  --singles N  single-run calls per sample for the new-flow path (default 2000)
       portcullis-bench admission [--n N]
  --n N        calls per row (default 2000)
       portcullis-bench policy [--n N]
  --n N        decisions per row (default 20000)
       portcullis-bench control [--n N]
  --n N        calls per row (default 1000)
       portcullis-bench events [--secs N] [--inflight N] [--rate N] [--portcullis PATH]
  --secs N     seconds per scenario (default 30)
       portcullis-bench peers [--secs N] [--windows N]
  --secs N     seconds per window (default 5)
  --windows N  windows per configuration (default 3)
       portcullis-bench budgets [--identities N] [--ticks N]
  --identities N  active identities with 3 budgets each (default 10000)
  --ticks N       one-second ticks per configuration (default 20)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let which = args.next();
    let result = match which.as_deref() {
        Some("xdp") => xdp::main(args),
        Some("admission") => admission::main(args),
        Some("policy") => policy::main(args),
        Some("events") => events::main(args),
        Some("control") => control::main(args),
        Some("peers") => peers::main(args),
        Some("budgets") => budgets::main(args),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown benchmark {other:?}\n{USAGE}")),
        None => Err(anyhow::anyhow!("which benchmark?\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
