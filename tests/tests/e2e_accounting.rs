//! End to end: cost accounting (docs/events.md). One
//! identity admitted to two services with different prices moves a measured
//! amount of traffic through the real XDP and TC programs; the kernel's
//! per-(identity, service) counters, priced by the config, must give
//! exactly the cost the price table says, per service.
//!
//! `counters_priced_per_service_over_pinned_maps` drives an `Accountant` in
//! the test over the agent's pinned maps; `agent_ledger_prices_real_traffic`
//! reads the ledger the agent itself keeps (its runtime ticks the
//! accountant every second) and restarts the agent in between.

use portcullis_e2e::e2e;

use std::{
    io::{Read, Write},
    path::Path,
    time::{Duration, SystemTime},
};

use e2e::{Env, OK_TIMEOUT, PROTECTED_PORT, Settings, serial};
use portcullis_agent::{
    accounting::{Accountant, SpendBook},
    config::Config,
    loader::Kernel,
};
use portcullis_testkit::{echo_roundtrip, poll_until};

const MIB: u64 = 1 << 20;
/// The second service, priced per connection only.
const EMBED_PORT: u16 = 8090;
const LLM_CONN: u64 = 5_000;
const LLM_MIB_IN: u64 = 1_000_000;
const LLM_MIB_OUT: u64 = 2_000_000;
const EMBED_CONN: u64 = 1_000;
/// Payload sent to (and echoed by) the llm service.
const LLM_BYTES: u64 = 3 * MIB;
const EMBED_CONNECTIONS: u64 = 7;

/// alice, from the client's main IPv4 address, admitted to `llm` (priced
/// per connection and per MiB each way) and `embed` (per connection).
/// Reports every hour, so the unreported lines in the ledger hold all of
/// the test's usage.
fn env(name: &str) -> Env {
    let env = Env::new(name, &Settings::default());
    let client = env.topo.client_addr(false);
    let settings = Settings::default().admit(client, 3600);
    let mut text = e2e::config_text(&env.topo, &env.bpffs, env.state_dir(), &settings);
    text = text.replacen(
        &format!("port = {PROTECTED_PORT}\n"),
        &format!(
            "port = {PROTECTED_PORT}\nprice = {{ per_connection_micros = {LLM_CONN}, per_mib_in_micros = {LLM_MIB_IN}, per_mib_out_micros = {LLM_MIB_OUT} }}\n"
        ),
        1,
    );
    text = text.replacen("[audit]\n", "[audit]\nreport_interval_secs = 3600\n", 1);
    text.push_str(&format!(
        "\n[[services]]\nname = \"embed\"\nprotocol = \"tcp\"\nport = {EMBED_PORT}\nprice = {{ per_connection_micros = {EMBED_CONN} }}\n\n[[admissions]]\nidentity = \"alice\"\nsource = \"{client}\"\nservice = \"embed\"\nttl_secs = 3600\n"
    ));
    std::fs::write(&env.config, text).expect("write config");
    env
}

/// Sends `LLM_BYTES` through the llm echo service on one connection and
/// opens `EMBED_CONNECTIONS` short connections to embed.
fn traffic(env: &Env) {
    let _llm = env.echo_server(false, PROTECTED_PORT);
    let _embed = env.echo_server(false, EMBED_PORT);
    let mut s = env
        .connect(false, PROTECTED_PORT, OK_TIMEOUT)
        .expect("connect llm");
    s.set_read_timeout(Some(OK_TIMEOUT)).unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut back = vec![0u8; chunk.len()];
    let mut sent = 0;
    while sent < LLM_BYTES {
        s.write_all(&chunk).expect("send to llm");
        s.read_exact(&mut back).expect("echo from llm");
        sent += chunk.len() as u64;
    }
    drop(s);
    for i in 0..EMBED_CONNECTIONS {
        let mut e = env
            .connect(false, EMBED_PORT, OK_TIMEOUT)
            .unwrap_or_else(|err| panic!("connect embed #{i}: {err}"));
        echo_roundtrip(&mut e, b"vec", OK_TIMEOUT).expect("echo from embed");
    }
}

/// One unreported ledger line: (connections, bytes_in, bytes_out, cost).
fn line(ledger: &serde_json::Value, identity: &str, service: &str) -> Option<(u64, u64, u64, u64)> {
    ledger["pending"]["lines"]
        .as_array()?
        .iter()
        .find(|l| l["identity"] == identity && l["service"] == service)
        .map(|l| {
            let c = &l["counters"];
            (
                c["connections"].as_u64().unwrap(),
                c["bytes_in"].as_u64().unwrap(),
                c["bytes_out"].as_u64().unwrap(),
                l["cost_micros"].as_u64().unwrap(),
            )
        })
}

fn read_ledger(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The traffic's lines are complete: every llm byte both ways and every
/// embed connection counted.
fn complete(ledger: &serde_json::Value) -> bool {
    let llm = line(ledger, "alice", "llm");
    let embed = line(ledger, "alice", "embed");
    matches!((llm, embed), (Some((_, i, o, _)), Some((c, ..)))
        if i >= LLM_BYTES && o >= LLM_BYTES && c >= EMBED_CONNECTIONS)
}

/// Cost per service is exactly the price table applied to the counters,
/// and the counters are the traffic sent (payload plus header overhead).
fn assert_priced(ledger: &serde_json::Value) {
    let (conns, bin, bout, cost) = line(ledger, "alice", "llm").expect("llm line");
    eprintln!("llm: {conns} connections, {bin} bytes in, {bout} bytes out, cost {cost}");
    assert_eq!(conns, 1, "one llm connection");
    for (what, bytes) in [("in", bin), ("out", bout)] {
        assert!(
            (LLM_BYTES..=LLM_BYTES + LLM_BYTES / 5).contains(&bytes),
            "llm bytes {what} {bytes}: payload {LLM_BYTES} plus headers"
        );
    }
    let want = conns * LLM_CONN
        + ((u128::from(bin) * u128::from(LLM_MIB_IN)) >> 20) as u64
        + ((u128::from(bout) * u128::from(LLM_MIB_OUT)) >> 20) as u64;
    assert_eq!(cost, want, "llm cost by the price table");
    let (conns, _, _, cost) = line(ledger, "alice", "embed").expect("embed line");
    assert_eq!(conns, EMBED_CONNECTIONS);
    assert_eq!(
        cost,
        EMBED_CONNECTIONS * EMBED_CONN,
        "embed: per connection only"
    );
    let llm_cost = line(ledger, "alice", "llm").unwrap().3;
    assert_eq!(
        ledger["identities"]["alice"]["month_micros"].as_u64(),
        Some(llm_cost + cost),
        "month to date is the sum of the lines"
    );
    assert_eq!(
        ledger["identities"]["alice"]["day_micros"],
        ledger["identities"]["alice"]["month_micros"]
    );
}

#[test]
fn counters_priced_per_service_over_pinned_maps() {
    let _serial = serial();
    let mut env = env("acct-maps");
    assert_eq!(env.start_agent(), "fresh");
    // The test's own ledger and accountant over the agent's pinned maps.
    let ledger = env.state_dir().join("test-ledger.json");
    let text = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace("ledger.json", "test-ledger.json");
    let cfg = Config::from_toml_str(&text).expect("config");
    let maps = Kernel::open_pinned_maps(&env.bpffs.pin_dir()).expect("pinned maps");
    let instance = maps.usage_instance().expect("instance");
    let mut acct = Accountant::open(&cfg, SpendBook::new()).expect("ledger");
    acct.know("alice", "");
    let tick = |acct: &mut Accountant| {
        let rows = maps.usage().expect("usage");
        acct.tick(SystemTime::now(), &instance, &rows)
            .expect("tick");
        read_ledger(&ledger)
    };
    tick(&mut acct);
    traffic(&env);
    let done = poll_until(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(200));
        tick(&mut acct).filter(complete)
    })
    .expect("the traffic shows up in the counters within a second");
    assert_priced(&done);

    // An accountant restarted over the same (adopted) maps neither forgets
    // nor counts again.
    let month = done["identities"]["alice"]["month_micros"].as_u64();
    drop(acct);
    let mut acct = Accountant::open(&cfg, SpendBook::new()).expect("ledger");
    let again = tick(&mut acct).expect("ledger");
    assert_eq!(again["identities"]["alice"]["month_micros"].as_u64(), month);
    assert_eq!(acct.spend("alice").month_micros, month.unwrap());
}

#[test]
fn agent_ledger_prices_real_traffic() {
    let _serial = serial();
    let mut env = env("acct-agent");
    assert_eq!(env.start_agent(), "fresh");
    let ledger = env.state_dir().join("ledger.json");
    traffic(&env);
    let done = poll_until(Duration::from_secs(5), || {
        read_ledger(&ledger).filter(complete)
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent's ledger shows the traffic within a few intervals; ledger: {:?}",
            std::fs::read_to_string(&ledger)
        )
    });
    assert_priced(&done);

    // A restarted agent adopts the maps and resumes: nothing counted twice.
    let month = done["identities"]["alice"]["month_micros"]
        .as_u64()
        .unwrap();
    env.agent()
        .terminate(Duration::from_secs(10))
        .expect("stop");
    env.agent.take();
    assert_eq!(env.start_agent(), "adopted");
    // Nothing is counted twice: the ledger reaches exactly one connection
    // more than before the restart, and double-counted usage from the
    // restart would overshoot it for good.
    // One more embed connection costs exactly one more connection.
    let _embed = env.echo_server(false, EMBED_PORT);
    let mut e = env
        .connect(false, EMBED_PORT, OK_TIMEOUT)
        .expect("connect embed");
    echo_roundtrip(&mut e, b"vec", OK_TIMEOUT).expect("echo");
    poll_until(Duration::from_secs(5), || {
        let l = read_ledger(&ledger)?;
        (l["identities"]["alice"]["month_micros"].as_u64() == Some(month + EMBED_CONN))
            .then_some(())
    })
    .expect("the new connection is charged once");
}
