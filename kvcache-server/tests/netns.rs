//! A node cut off the network instead of killed: it runs in a network namespace this test
//! creates, reached over a veth pair; taking the link down drops its packets, so calls to it
//! time out rather than being refused (the harder case). Skipped, with a message, where
//! namespaces cannot be created (no root, no iproute2).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ServerProcess, blocks, get_all, put_all};
use kvcache_client::{Cluster, ClusterConfig, GetOutcome, TransportChoice};

/// A namespace with a veth pair to the host; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    fn create() -> Option<Self> {
        let id = std::process::id() % 200 + 20;
        let n = Self {
            name: format!("kvc-test-{}", std::process::id()),
            host_if: format!("kvch{}", std::process::id() % 100_000),
            ns_if: format!("kvcn{}", std::process::id() % 100_000),
            host_ip: format!("10.231.{id}.1"),
            ns_ip: format!("10.231.{id}.2"),
        };
        let ns_if = n.ns_if.clone();
        let ok = ip(&["netns", "add", &n.name])
            && ip(&[
                "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
            ])
            && ip(&["link", "set", &ns_if, "netns", &n.name])
            && ip(&[
                "addr",
                "add",
                &format!("{}/30", n.host_ip),
                "dev",
                &n.host_if,
            ])
            && ip(&["link", "set", &n.host_if, "up"])
            && ip(&[
                "netns",
                "exec",
                &n.name,
                "ip",
                "addr",
                "add",
                &format!("{}/30", n.ns_ip),
                "dev",
                &ns_if,
            ])
            && ip(&["netns", "exec", &n.name, "ip", "link", "set", &ns_if, "up"])
            && ip(&["netns", "exec", &n.name, "ip", "link", "set", "lo", "up"]);
        if !ok {
            eprintln!(
                "skipping: cannot create a network namespace with a veth pair (needs root and iproute2)"
            );
            return None; // Drop removes whatever was created.
        }
        Some(n)
    }

    /// Cuts (false) or restores (true) the link: packets to the node are dropped while cut.
    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_if]);
        ip(&["netns", "del", &self.name]);
    }
}

/// The server binary inside the namespace, on its veth address (no shared memory: it stands
/// for another machine).
fn start_in(ns: &Netns) -> (Child, String) {
    let addr = format!("{}:7400", ns.ns_ip);
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_kvcache-server"),
        ])
        .args([
            "--listen",
            &addr,
            "--metrics-listen",
            "off",
            "--shm-socket",
            "off",
        ])
        .args(["--mlock", "off", "--memory", "128MiB"])
        .env("KVCACHE_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kvcache-server in the namespace");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("ready"), "{line}");
    (child, addr)
}

fn cluster(members: &[String], replicas: usize) -> Arc<Cluster> {
    let mut cfg = ClusterConfig::new(members.iter().cloned());
    cfg.replicas = replicas;
    cfg.node.transport = TransportChoice::Tcp;
    cfg.node.timeout = Duration::from_secs(1);
    cfg.down_for = Duration::from_millis(500);
    Arc::new(Cluster::new(cfg).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_the_network_costs_timeouts_then_misses_never_errors() {
    let Some(ns) = Netns::create() else { return };
    let (mut far, far_addr) = start_in(&ns);
    let near: Vec<ServerProcess> = (0..2)
        .map(|_| ServerProcess::start(&["--memory", "128MiB", "--shm-socket", "off"]))
        .collect();
    let mut members: Vec<String> = near.iter().map(|s| s.data.clone()).collect();
    members.push(far_addr.clone());
    let (r1, r2) = (cluster(&members, 1), cluster(&members, 2));
    let (one, two) = (blocks(71, 1200), blocks(72, 1200));
    put_all(&r1, &one).await;
    put_all(&r2, &two).await;
    assert!(
        get_all(&r1, &one)
            .await
            .iter()
            .all(|o| *o == GetOutcome::Hit)
    );

    ns.link(false);
    let started = Instant::now();
    let got_two = get_all(&r2, &two).await;
    assert!(
        got_two.iter().all(|o| *o == GetOutcome::Hit),
        "R=2: nothing lost to a partition"
    );
    let got_one = get_all(&r1, &one).await;
    for ((k, _), o) in one.iter().zip(&got_one) {
        let expect = if r1.owners(*k)[0] == far_addr {
            GetOutcome::Miss
        } else {
            GetOutcome::Hit
        };
        assert_eq!(*o, expect, "R=1: only the cut-off node's blocks miss");
    }
    // Each batch pays at most one client timeout before the node is routed around.
    let took = started.elapsed();
    eprintln!("reads around the partition took {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the partition should cost a timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "reads around a partition took {took:?}"
    );
    assert!(r1.stats().failovers >= 1 && r2.stats().replica_reads > 0);

    ns.link(true);
    tokio::time::sleep(Duration::from_millis(600)).await; // past down_for
    assert!(
        get_all(&r1, &one)
            .await
            .iter()
            .all(|o| *o == GetOutcome::Hit),
        "healed: the node serves again"
    );
    let _ = far.kill();
    let _ = far.wait();
}
