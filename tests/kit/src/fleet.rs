//! [`Fleet`]: several node namespaces and one client namespace, each node
//! joined to the client by its own veth pair and subnet, for a fleet of
//! agents that one client, one collector and one operator reach.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::Ordering,
};

use crate::{
    command::{check_prefix, next_id},
    netns::{Netns, TOPOLOGY_COUNTER, prepare, settle, veth},
};

/// Nodes in a fleet, at most.
pub const MAX_FLEET: usize = 8;

/// One node and its link to the client namespace:
/// `client_if 10.(210+k).N.1/24` <-veth-> `node_if 10.(210+k).N.2/24`, and
/// `fd00:(210+k):N::1/2`; the client's `.3` is a second, never admitted
/// source on the same link.
#[derive(Debug)]
pub struct FleetNode {
    pub client_if: String,
    pub node_if: String,
    pub client_v4: Ipv4Addr,
    pub client_v4_alt: Ipv4Addr,
    pub node_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub node_v6: Ipv6Addr,
    pub ns: Netns,
}

impl FleetNode {
    pub fn node_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.node_v6.into()
        } else {
            self.node_v4.into()
        }
    }
}

/// A client namespace linked to `n` node namespaces. Dropping it deletes
/// the veths and every namespace.
#[derive(Debug)]
pub struct Fleet {
    pub nodes: Vec<FleetNode>,
    pub client: Netns,
}

impl Fleet {
    pub fn new(prefix: &str, n: usize) -> io::Result<Fleet> {
        check_prefix(prefix)?;
        if !(1..=MAX_FLEET).contains(&n) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a fleet has 1-{MAX_FLEET} nodes, not {n}"),
            ));
        }
        let client = Netns::new(&format!("{prefix}-c"))?;
        prepare(&client)?;
        let pid = std::process::id();
        let index =
            ((pid.wrapping_add(TOPOLOGY_COUNTER.fetch_add(1, Ordering::Relaxed))) % 250 + 1) as u8;
        let mut fleet = Fleet {
            nodes: Vec::with_capacity(n),
            client,
        };
        for k in 0..n {
            let ns = Netns::new(&format!("{prefix}-n{k}"))?;
            prepare(&ns)?;
            let tag = format!("pf{:x}{:x}", pid & 0xff_ffff, next_id() & 0xffff);
            let net = 210 + k as u8;
            let node = FleetNode {
                client_if: format!("{tag}c"),
                node_if: format!("{tag}n"),
                client_v4: Ipv4Addr::new(10, net, index, 1),
                client_v4_alt: Ipv4Addr::new(10, net, index, 3),
                node_v4: Ipv4Addr::new(10, net, index, 2),
                client_v6: Ipv6Addr::new(0xfd00, net.into(), index.into(), 0, 0, 0, 0, 1),
                node_v6: Ipv6Addr::new(0xfd00, net.into(), index.into(), 0, 0, 0, 0, 2),
                ns,
            };
            fleet.nodes.push(node);
            let node = fleet.nodes.last().unwrap();
            veth(
                (
                    &fleet.client,
                    &node.client_if,
                    &[
                        (node.client_v4.into(), false),
                        (node.client_v4_alt.into(), true),
                        (node.client_v6.into(), false),
                    ],
                ),
                (
                    &node.ns,
                    &node.node_if,
                    &[(node.node_v4.into(), false), (node.node_v6.into(), false)],
                ),
            )?;
        }
        let mut links: Vec<(&Netns, &str)> = Vec::new();
        for node in &fleet.nodes {
            links.push((&fleet.client, &node.client_if));
            links.push((&node.ns, &node.node_if));
        }
        settle(&links)?;
        Ok(fleet)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = self.client.ip(&["link", "del", "dev", &node.client_if]);
        }
    }
}
