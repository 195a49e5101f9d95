//! The configurations `portcullis-bench peers` compares, and how each is
//! installed on the node: as its documentation recommends for dropping a
//! port's traffic from unknown sources.

use std::process::Command;

use anyhow::{Context, Result};
use aya::programs::{Xdp, XdpMode};
use portcullis_agent::loader::Unattached;
use portcullis_common::programs;
use portcullis_e2e::e2e::{Env, PROTECTED_PORT};

use super::run;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Stack,
    Iptables,
    Nftables,
    XdpFilter,
    XdpDrop,
    Portcullis,
}

impl Config {
    pub const ALL: [Config; 6] = [
        Config::Stack,
        Config::Iptables,
        Config::Nftables,
        Config::XdpFilter,
        Config::XdpDrop,
        Config::Portcullis,
    ];

    /// The `--only` word.
    pub fn key(self) -> &'static str {
        match self {
            Config::Stack => "stack",
            Config::Iptables => "iptables",
            Config::Nftables => "nftables",
            Config::XdpFilter => "xdp-filter",
            Config::XdpDrop => "xdp-drop",
            Config::Portcullis => "portcullis",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Config::Stack => "no filter (kernel stack)",
            Config::Iptables => "iptables raw + ipset",
            Config::Nftables => "nftables netdev ingress + set",
            Config::XdpFilter => "xdp-filter (xdp-tools), native",
            Config::XdpDrop => "trivial XDP_DROP",
            Config::Portcullis => "portcullis (port-wide service, no admissions)",
        }
    }

    /// Whether the admitted client gets through: a trivial XDP_DROP and a
    /// port rule drop it with the flood.
    pub fn admits_client(self) -> bool {
        !matches!(self, Config::XdpDrop | Config::XdpFilter)
    }

    /// As run, for the report.
    pub fn how(self) -> &'static str {
        match self {
            Config::Stack => "nothing loaded; the sink listens on the port",
            Config::Iptables => {
                "ipset create allow hash:ip; iptables -t raw -A PREROUTING -p tcp --dport 8000 -m set ! --match-set allow src -j DROP"
            }
            Config::Nftables => {
                "table netdev f { set allow { type ipv4_addr; }; chain in { type filter hook ingress device IF priority -500; tcp dport 8000 ip saddr != @allow drop; } }"
            }
            Config::XdpFilter => "xdp-filter load IF -m native; xdp-filter port 8000 -m dst",
            Config::XdpDrop => "portcullis_baseline_drop (returns XDP_DROP), XDP native",
            Config::Portcullis => "portcullis agent, [[services]] llm tcp 8000, xdp_mode auto",
        }
    }
}

pub fn keys() -> String {
    Config::ALL.map(Config::key).join(", ")
}

/// What a configuration loaded; removed on drop (the namespace's deletion
/// removes rules and sets; XDP programs go with the veth).
pub struct Installed {
    xdp_filter_if: Option<(String, String)>,
    xdp_drop: Option<Unattached>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some((ns, ifname)) = &self.xdp_filter_if {
            let _ = Command::new("nsenter")
                .args([
                    &format!("--net=/run/netns/{ns}"),
                    "xdp-filter",
                    "unload",
                    ifname,
                ])
                .output();
        }
    }
}

pub fn install(cfg: Config, env: &mut Env, ns: &str, ifname: &str) -> Result<Installed> {
    let mut out = Installed {
        xdp_filter_if: None,
        xdp_drop: None,
    };
    let client = env.topo.client_v4.to_string();
    let in_ns = |args: &[&str]| -> Result<()> {
        run(Command::new("ip").args(["netns", "exec", ns]).args(args))
    };
    match cfg {
        Config::Stack => {}
        Config::Iptables => {
            in_ns(&["ipset", "create", "allow", "hash:ip"])?;
            in_ns(&["ipset", "add", "allow", &client])?;
            in_ns(&[
                "iptables",
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                "8000",
                "-m",
                "set",
                "!",
                "--match-set",
                "allow",
                "src",
                "-j",
                "DROP",
            ])?;
        }
        Config::Nftables => {
            let rules = format!(
                "table netdev pcl {{\n  set allow {{\n    type ipv4_addr\n    elements = {{ {client} }}\n  }}\n  chain ingress {{\n    type filter hook ingress device {ifname} priority -500; policy accept;\n    tcp dport {PROTECTED_PORT} ip saddr != @allow drop\n  }}\n}}\n"
            );
            let file = std::env::temp_dir().join(format!("pcl-peers-{}.nft", std::process::id()));
            std::fs::write(&file, rules)?;
            let r = in_ns(&["nft", "-f", &file.to_string_lossy()]);
            let _ = std::fs::remove_file(&file);
            r?;
        }
        Config::XdpFilter => {
            // nsenter keeps the host's mounts (xdp-filter pins in bpffs).
            let nsx = |args: &[&str]| -> Result<()> {
                run(Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{ns}"))
                    .args(args))
            };
            nsx(&["xdp-filter", "load", ifname, "-m", "native"])?;
            out.xdp_filter_if = Some((ns.to_string(), ifname.to_string()));
            nsx(&[
                "xdp-filter",
                "port",
                &PROTECTED_PORT.to_string(),
                "-m",
                "dst",
            ])?;
        }
        Config::XdpDrop => {
            // The object's own baseline program, attached natively from a
            // thread inside the node's namespace; detached when the object
            // is dropped with the guard.
            let mut k = Unattached::load().context("load the eBPF object")?;
            let prog: &mut Xdp = k
                .ebpf
                .program_mut(programs::BASELINE_DROP)
                .context("baseline program")?
                .try_into()?;
            let ifname = ifname.to_string();
            env.topo
                .server
                .run(|| prog.attach(&ifname, XdpMode::Driver))??;
            out.xdp_drop = Some(k);
        }
        Config::Portcullis => {
            env.start_agent();
        }
    }
    Ok(out)
}
