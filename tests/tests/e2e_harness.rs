//! Self-tests of the network-namespace harness (`portcullis_agent::netns`),
//! without any agent: namespaces appear and disappear, the veth carries TCP
//! over IPv4 and IPv6, bpffs mounts are private and removed, and guards
//! clean up after a panic.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use portcullis_testkit::{
    self, BpffsMount, FloodPlan, Netns, TempDir, Topology, echo_roundtrip, list_netns,
};

const T: Duration = Duration::from_secs(3);

fn netns_inode_of_thread() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("own netns")
        .ino()
}

fn host_links() -> String {
    portcullis_testkit::ip(&["-o", "link", "show"]).expect("ip link")
}

#[test]
fn netns_is_created_entered_and_removed() {
    let host = netns_inode_of_thread();
    let name;
    {
        let ns = Netns::new("selftest").expect("netns");
        name = ns.name().to_owned();
        assert!(list_netns().unwrap().contains(&name), "{name} listed");
        assert!(ns.path().exists());
        let inside = ns.run(netns_inode_of_thread).expect("run");
        assert_ne!(inside, host, "run() executes in another namespace");
        assert_eq!(
            netns_inode_of_thread(),
            host,
            "the caller's thread stays put"
        );
        // exec() runs commands inside: only lo exists there.
        let out =
            portcullis_testkit::run_cmd(ns.exec("ip").args(["-o", "link", "show"])).expect("exec");
        assert_eq!(out.lines().count(), 1, "only lo in a new namespace: {out}");
        // A panic inside run() reaches the caller.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ns.run(|| panic!("boom")).ok();
        }));
        assert!(caught.is_err());
    }
    assert!(
        !list_netns().unwrap().contains(&name),
        "{name} removed on drop"
    );
    assert!(
        !PathBuf::from(portcullis_testkit::NETNS_RUN_DIR)
            .join(&name)
            .exists()
    );
}

#[test]
fn topology_carries_tcp_v4_and_v6_and_cleans_up() {
    let (names, ifaces);
    {
        let topo = Topology::new("selftest").expect("topology");
        names = topo.netns_names().map(str::to_owned);
        ifaces = [topo.client_if.clone(), topo.server_if.clone()];
        assert!(
            ifaces
                .iter()
                .all(|i| i.len() <= portcullis_testkit::MAX_IFNAME)
        );
        let links = host_links();
        assert!(
            ifaces.iter().all(|i| !links.contains(i.as_str())),
            "veth never appears in the host namespace"
        );
        for v6 in [false, true] {
            let addr = SocketAddr::new(topo.server_addr(v6), 8000);
            let server = portcullis_testkit::tcp_echo_server(&topo.server, addr).expect("echo");
            let mut s = portcullis_testkit::try_connect(&topo.client, addr, T).expect("connect");
            // The stream was made in the client namespace and still works
            // from this (host-namespace) thread.
            assert_eq!(s.local_addr().unwrap().ip(), topo.client_addr(v6));
            echo_roundtrip(&mut s, b"hello through the veth", T).expect("echo");
            let alt = topo.client_alt_addr(v6);
            let mut s2 =
                portcullis_testkit::connect_from(&topo.client, alt, addr, T).expect("connect_from");
            assert_eq!(s2.local_addr().unwrap().ip(), alt);
            echo_roundtrip(&mut s2, b"from the second address", T).expect("echo alt");
            assert!(server.accepted() >= 2);
            // A port with no listener answers with RST: refused, not a timeout.
            let closed = SocketAddr::new(topo.server_addr(v6), 9);
            let e = portcullis_testkit::try_connect(&topo.client, closed, T)
                .expect_err("nothing listens");
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        }
        // Client and server really are two different namespaces.
        assert_ne!(
            topo.client.run(netns_inode_of_thread).unwrap(),
            topo.server.run(netns_inode_of_thread).unwrap()
        );
    }
    let listed = list_netns().unwrap();
    for n in &names {
        assert!(!listed.contains(n), "{n} removed on drop");
    }
    let links = host_links();
    assert!(ifaces.iter().all(|i| !links.contains(i.as_str())));
}

#[test]
fn topologies_get_distinct_subnets() {
    let a = Topology::new("selftest").expect("a");
    let b = Topology::new("selftest").expect("b");
    assert_ne!(a.index, b.index);
    assert_ne!(a.server_if, b.server_if);
    assert_ne!(a.client.name(), b.client.name());
}

#[test]
fn connect_flood_without_agent_connects_every_attempt() {
    let topo = Topology::new("selftest").expect("topology");
    for v6 in [false, true] {
        let addr = SocketAddr::new(topo.server_addr(v6), 8000);
        let server = portcullis_testkit::tcp_echo_server(&topo.server, addr).expect("echo");
        let plan = FloodPlan {
            duration: Duration::from_millis(500),
            interval: Duration::from_millis(5),
            attempt_timeout: Duration::from_millis(200),
            max_pending: 64,
        };
        let st = portcullis_testkit::connect_flood(&topo.client, addr, plan).expect("flood");
        assert!(st.attempts >= 50, "{st:?}");
        assert_eq!(st.connected, st.attempts, "{st:?}");
        assert_eq!(st.timed_out + st.failed, 0, "{st:?}");
        // The server accepts all of them (bounded wait).
        let all =
            portcullis_testkit::poll_until(T, || (server.accepted() >= st.connected).then_some(()));
        assert!(
            all.is_some(),
            "accepted {} of {}",
            server.accepted(),
            st.connected
        );
    }
}

#[test]
fn bpffs_mount_is_private_and_removed() {
    let path;
    {
        let m = BpffsMount::new().expect("mount");
        path = m.path().to_path_buf();
        assert!(
            portcullis_agent::loader::bpffs::is_bpffs(&path).unwrap(),
            "{} is a bpffs",
            path.display()
        );
        std::fs::create_dir(m.pin_dir()).expect("mkdir in bpffs");
        // Each mount is its own instance: a second one starts empty.
        let other = BpffsMount::new().expect("second mount");
        assert!(!other.pin_dir().exists());
    }
    assert!(!path.exists(), "{} removed on drop", path.display());
}

#[test]
fn guards_clean_up_after_a_panic() {
    let mut names = Vec::new();
    let mut dir = PathBuf::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new("selftest").expect("topology");
        names.extend(topo.netns_names().map(str::to_owned));
        let tmp = TempDir::new("selftest").expect("tmp");
        dir = tmp.path().to_path_buf();
        let _server = portcullis_testkit::tcp_echo_server(
            &topo.server,
            SocketAddr::new(IpAddr::V4(topo.server_v4), 8000),
        )
        .expect("echo");
        panic!("test failure in the middle of a test");
    }));
    assert!(result.is_err());
    let listed = list_netns().unwrap();
    for n in &names {
        assert!(!listed.contains(n), "{n} removed after the panic");
    }
    assert!(!dir.as_os_str().is_empty() && !dir.exists());
}
