//! The capability set the deployment files grant the agent instead of full
//! privilege (deploy/kubernetes/base/agent-daemonset.yaml,
//! deploy/systemd/portcullis-agent.service) is enough: an agent whose
//! bounding set holds only CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN,
//! CAP_SYS_RESOURCE and CAP_CHOWN loads, attaches, pins and enforces, and
//! one without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN is refused by the kernel
//! and says so.

use portcullis_e2e::e2e::{self, Env, PROTECTED_PORT, READY_TIMEOUT, Settings, serial};
use portcullis_testkit::AgentProcess;

const DEPLOYED: &str = "-all,+bpf,+perfmon,+net_admin,+sys_resource,+chown";

fn setpriv(bounding: &str) -> Vec<String> {
    ["setpriv", "--bounding-set", bounding, "--"]
        .map(String::from)
        .to_vec()
}

#[test]
fn the_deployed_capabilities_are_enough_to_load_and_enforce() {
    let _serial = serial();
    let mut env = Env::new("caps", &Settings::default());
    let wrapper = setpriv(DEPLOYED);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent =
        AgentProcess::spawn_wrapped(&wrapper, &env.binary, &env.topo.server, &env.config, &[])
            .expect("spawn agent");
    let origin = agent
        .wait_ready(READY_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(origin, "fresh");
    // The capabilities really were limited.
    let pid = agent.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    const CAP_SYS_ADMIN: u32 = 21;
    assert_eq!(bnd & (1 << CAP_SYS_ADMIN), 0, "CAP_SYS_ADMIN in {bnd:#x}");
    env.agent = Some(agent);
    let _server = env.echo_server(false, PROTECTED_PORT);
    env.assert_dropped(
        false,
        PROTECTED_PORT,
        false,
        "enforcing with the deployed capabilities",
    );
    let st = env.status();
    assert!(st.get("no_admission").is_some_and(|n| *n > 0), "{st:?}");
}

#[test]
fn without_bpf_capabilities_the_kernel_refuses_and_the_agent_says_so() {
    let _serial = serial();
    let env = Env::new("nocaps", &Settings::default());
    let wrapper = setpriv("-all,+net_admin,+sys_resource,+chown");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent =
        AgentProcess::spawn_wrapped(&wrapper, &env.binary, &env.topo.server, &env.config, &[])
            .expect("spawn agent");
    let failed = agent.wait_ready(READY_TIMEOUT);
    assert!(failed.is_err(), "started without CAP_BPF: {}", agent.log());
    let log = e2e::knock::strip_ansi(&agent.log());
    let error = log
        .lines()
        .find(|l| l.starts_with("portcullis: error:"))
        .unwrap_or_else(|| panic!("no error line: {log}"));
    assert!(
        error.contains("Operation not permitted")
            && error.contains("needs CAP_BPF and CAP_PERFMON"),
        "{error}"
    );
}
