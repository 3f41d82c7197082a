//! Clusters whose membership lives in a real etcd: nodes register themselves (`--etcd`), clients
//! of `etcd://` follow joins, deaths and restarts, and the data plane never waits for etcd.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::{
    EtcdProcess, ServerProcess, assert_spread_follows_ring, blocks, eventually, get_all, put_all,
    put_concurrently, put_then_read_all,
};
use kvcache_client::{Cluster, ClusterConfig, EtcdMembers, GetOutcome};

const TTL: &str = "2";

/// A node registering in `etcd`, on `listen` (port 0 for a fresh one).
fn node_at(etcd: &EtcdProcess, listen: &str) -> ServerProcess {
    let args = [
        "--memory",
        "128MiB",
        "--etcd",
        &etcd.client_url,
        "--etcd-ttl",
        TTL,
    ];
    ServerProcess::start_at(listen, &args)
}

fn node(etcd: &EtcdProcess) -> ServerProcess {
    node_at(etcd, "127.0.0.1:0")
}

async fn client(etcd: &EtcdProcess, replicas: usize) -> Arc<Cluster> {
    let source = EtcdMembers::new(
        &etcd.client_url,
        Duration::from_millis(200),
        Duration::from_secs(1),
    )
    .unwrap();
    let mut cfg = ClusterConfig::new(Vec::<String>::new());
    cfg.replicas = replicas;
    cfg.node.timeout = Duration::from_secs(1);
    cfg.down_for = Duration::from_millis(500);
    Arc::new(Cluster::with_source(Arc::new(source), cfg).await.unwrap())
}

fn members(c: &Cluster) -> Vec<String> {
    c.stats().members
}

fn sorted(servers: &[ServerProcess]) -> Vec<String> {
    let mut v: Vec<String> = servers.iter().map(|s| s.data.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_found_through_etcd_hold_thousands_of_blocks_evenly_with_3_and_5_nodes() {
    for n in [3usize, 5] {
        let Some(etcd) = EtcdProcess::start() else {
            return;
        };
        let servers: Vec<ServerProcess> = (0..n).map(|_| node(&etcd)).collect();
        let c = client(&etcd, 1).await;
        let want = sorted(&servers);
        eventually(Duration::from_secs(5), "all nodes registered", || {
            members(&c) == want
        })
        .await;
        let all = blocks(100 + n as u64, 3000);
        put_concurrently(&c, &all, 4).await;
        assert!(
            get_all(&c, &all)
                .await
                .iter()
                .all(|o| *o == GetOutcome::Hit)
        );
        assert_spread_follows_ring(&c, &servers, &all);
        for s in &servers {
            assert_eq!(s.metric("kvcache_cluster_registered"), 1.0);
        }
    }
}

/// Reads a set of blocks in a loop (bounded in rounds and time) until finished, counting
/// rounds that were not all hits; a read that errors fails the test.
struct Loader {
    stop: Arc<AtomicBool>,
    bad: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<u64>,
}

impl Loader {
    fn start(c: &Arc<Cluster>, data: &[(kvcache_core::BlockKey, usize)]) -> Self {
        let (stop, bad) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (c, data) = (Arc::clone(c), data[..200].to_vec());
        let (s, b) = (Arc::clone(&stop), Arc::clone(&bad));
        let task = tokio::spawn(async move {
            let (mut rounds, deadline) = (0u64, Instant::now() + Duration::from_secs(60));
            while !s.load(Relaxed) && Instant::now() < deadline && rounds < 10_000 {
                // get_all checks every hit's bytes and panics on an error.
                if get_all(&c, &data)
                    .await
                    .iter()
                    .any(|o| *o != GetOutcome::Hit)
                {
                    b.fetch_add(1, Relaxed);
                }
                rounds += 1;
            }
            rounds
        });
        Self { stop, bad, task }
    }

    /// Stops the loop; (rounds run, rounds with a miss).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Relaxed);
        (self.task.await.unwrap(), self.bad.load(Relaxed))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_the_ring_within_the_ttl_with_no_errors_and_rejoins_on_restart() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let mut servers: Vec<ServerProcess> = (0..3).map(|_| node(&etcd)).collect();
    let (r1, r2) = (client(&etcd, 1).await, client(&etcd, 2).await);
    let want = sorted(&servers);
    eventually(Duration::from_secs(5), "registered", || {
        members(&r1) == want && members(&r2) == want
    })
    .await;
    let (one, two) = (blocks(11, 1500), blocks(22, 1500));
    put_all(&r1, &one).await;
    put_all(&r2, &two).await;

    let loader = Loader::start(&r2, &two);
    let dead = servers[1].data.clone();
    servers[1].child.kill().unwrap(); // kill -9 under load
    servers[1].child.wait().unwrap();
    let gone = eventually(
        Duration::from_secs(5),
        "the dead node leaves the ring",
        || !members(&r1).contains(&dead) && !members(&r2).contains(&dead),
    )
    .await;
    assert!(
        gone <= Duration::from_secs(4),
        "left after {gone:?}, TTL {TTL} s"
    );
    // R=2: every block written before the kill is still read, by the loader and here.
    assert!(
        get_all(&r2, &two)
            .await
            .iter()
            .all(|o| *o == GetOutcome::Hit)
    );
    // R=1: the dead node's blocks are misses (its keys now map to other nodes), no errors.
    let got = get_all(&r1, &one).await;
    let hits = got.iter().filter(|o| **o == GetOutcome::Hit).count();
    assert!(
        hits < one.len() && hits > one.len() / 2,
        "R=1 after a loss: {hits} of {} hit",
        one.len()
    );
    assert!(r2.stats().ring_version >= 2);

    // Restart it where it was: it registers again, the clients route to it, it serves.
    servers[1] = node_at(&etcd, &dead);
    eventually(Duration::from_secs(5), "the node rejoins", || {
        members(&r1) == want
    })
    .await;
    let fresh = blocks(33, 300);
    put_then_read_all(&r1, &fresh).await;
    assert!(
        servers[1].metric("kvcache_blocks_stored") > 0.0,
        "the restarted node took its share"
    );
    let (rounds, bad) = loader.finish().await;
    assert!(rounds > 0, "the loader ran");
    assert_eq!(bad, 0, "R=2 reads under the kill: no misses");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_keeps_serving_while_etcd_restarts_and_resynchronises_after() {
    let Some(mut etcd) = EtcdProcess::start() else {
        return;
    };
    let mut servers: Vec<ServerProcess> = (0..3).map(|_| node(&etcd)).collect();
    let c = client(&etcd, 2).await;
    let want = sorted(&servers);
    eventually(Duration::from_secs(5), "registered", || members(&c) == want).await;
    let data = blocks(44, 1000);
    put_all(&c, &data).await;

    let loader = Loader::start(&c, &data);
    etcd.kill();
    // Longer than the lease TTL: membership must come from the last known list, not expire.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(members(&c), want, "the last known members stay in use");
    let more = blocks(55, 500);
    put_then_read_all(&c, &more).await;
    for s in &servers {
        s.wait_metric("kvcache_cluster_registered", |v| v == 0.0);
        assert!(s.metric("kvcache_cluster_etcd_errors_total") > 0.0);
    }

    etcd.restart();
    for s in &servers {
        assert_eq!(
            s.wait_metric("kvcache_cluster_registered", |v| v == 1.0),
            1.0,
            "re-registered"
        );
    }
    // A node that joins after the restart is seen: the client resynchronised.
    servers.push(node(&etcd));
    let want = sorted(&servers);
    eventually(Duration::from_secs(5), "the newcomer is seen", || {
        members(&c) == want
    })
    .await;
    let (rounds, bad) = loader.finish().await;
    assert!(rounds > 0, "the loader ran");
    assert_eq!(bad, 0, "no misses while etcd was down");
    assert!(
        get_all(&c, &data)
            .await
            .iter()
            .all(|o| *o == GetOutcome::Hit)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_node_id_refuses_to_start() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let args = |id: &str| {
        vec![
            "--memory".to_string(),
            "16MiB".into(),
            "--etcd".into(),
            etcd.client_url.clone(),
            "--etcd-ttl".into(),
            TTL.into(),
            "--node-id".into(),
            id.into(),
        ]
    };
    let first_args = args("dup");
    let first = ServerProcess::start(&first_args.iter().map(String::as_str).collect::<Vec<_>>());
    let r = client(&etcd, 1).await;
    eventually(Duration::from_secs(5), "registered", || {
        members(&r) == [first.data.clone()]
    })
    .await;
    let dup = args("dup");
    let out = common::server_command(&dup.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a duplicate --node-id must not start"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another node is registered in etcd as \"dup\""),
        "{stderr}"
    );
    // The first node's record is untouched, and another id starts fine.
    assert_eq!(members(&r), std::slice::from_ref(&first.data));
    let other_args = args("other");
    let _other = ServerProcess::start(&other_args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// POSTs JSON to etcd's gateway (as `token` if given) and returns the reply's JSON.
fn etcd_post(
    etcd: &EtcdProcess,
    path: &str,
    body: serde_json::Value,
    token: Option<&str>,
) -> serde_json::Value {
    use std::io::{Read, Write};
    let addr = etcd.client_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let body = body.to_string();
    let auth = token.map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let json = r.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{path}: {e}: {json}"))
}

/// Turns on etcd's authentication with a root user, a `node` user that may write the member
/// list and a `reader` user that may only read it.
fn enable_etcd_auth(etcd: &EtcdProcess) {
    use serde_json::json;
    // base64 of "/kvcache/members/" and of the end of its range, "/kvcache/members0".
    let (key, end) = ("L2t2Y2FjaGUvbWVtYmVycy8=", "L2t2Y2FjaGUvbWVtYmVyczA=");
    for (user, pw) in [
        ("root", "rootpw"),
        ("node", "nodepw"),
        ("reader", "readerpw"),
    ] {
        etcd_post(
            etcd,
            "/v3/auth/user/add",
            json!({"name": user, "password": pw}),
            None,
        );
    }
    for role in ["root", "kvnode", "kvreader"] {
        etcd_post(etcd, "/v3/auth/role/add", json!({"name": role}), None);
    }
    for (role, perm) in [("kvnode", "READWRITE"), ("kvreader", "READ")] {
        let reply = etcd_post(
            etcd,
            "/v3/auth/role/grant",
            json!({"name": role, "perm": {"permType": perm, "key": key, "range_end": end}}),
            None,
        );
        assert!(reply.get("error").is_none(), "{reply}");
    }
    for (user, role) in [("root", "root"), ("node", "kvnode"), ("reader", "kvreader")] {
        let reply = etcd_post(
            etcd,
            "/v3/auth/user/grant",
            json!({"user": user, "role": role}),
            None,
        );
        assert!(reply.get("error").is_none(), "{reply}");
    }
    let reply = etcd_post(etcd, "/v3/auth/enable", json!({}), None);
    assert!(reply.get("error").is_none(), "{reply}");
}

/// H8: with etcd's authentication on, only a user allowed to write `/kvcache/members/` can
/// put a node in the ring; clients read it as a read-only user; a node without credentials, or
/// with a wrong password, refuses to start saying why; tokens are renewed after etcd restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_auth_only_a_node_user_can_join_the_ring() {
    let Some(mut etcd) = EtcdProcess::start() else {
        return;
    };
    enable_etcd_auth(&etcd);
    let host = etcd.client_url.trim_start_matches("http://").to_string();
    let url = |userinfo: &str| format!("http://{userinfo}@{host}");
    let start = |etcd_url: &str| {
        ServerProcess::start(&["--memory", "16MiB", "--etcd", etcd_url, "--etcd-ttl", TTL])
    };
    let node = start(&url("node:nodepw"));
    let source = EtcdMembers::new(
        &url("reader:readerpw"),
        Duration::from_millis(200),
        Duration::from_secs(1),
    )
    .unwrap();
    let mut cfg = ClusterConfig::new(Vec::<String>::new());
    cfg.node.timeout = Duration::from_secs(1);
    let reader = Cluster::with_source(Arc::new(source), cfg).await.unwrap();
    eventually(Duration::from_secs(5), "the node registered", || {
        members(&reader) == [node.data.clone()]
    })
    .await;

    let refused = |etcd_url: &str| {
        let out = common::server_command(&["--memory", "16MiB", "--etcd", etcd_url])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{etcd_url} must not start");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let anonymous = refused(&etcd.client_url);
    assert!(
        anonymous.contains("etcd has authentication on")
            && anonymous.contains("KVCACHE_ETCD_PASSWORD"),
        "{anonymous}"
    );
    let wrong = refused(&url("node:guess"));
    assert!(
        wrong.contains("refused user \"node\"") && !wrong.contains("guess"),
        "{wrong}"
    );

    // The read-only user cannot put a node in the ring: it serves, unregistered, and says so.
    let rogue = start(&url("reader:readerpw"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(members(&reader), std::slice::from_ref(&node.data));
    assert_eq!(rogue.metric("kvcache_cluster_registered"), 0.0);
    assert_eq!(node.metric("kvcache_cluster_registered"), 1.0);

    // etcd restarts (its tokens die with it): node and reader authenticate again.
    etcd.kill();
    etcd.restart();
    let second = start(&url("node:nodepw"));
    let mut want = vec![node.data.clone(), second.data.clone()];
    want.sort();
    eventually(
        Duration::from_secs(10),
        "both nodes in the ring after etcd restarts",
        || members(&reader) == want,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // past the TTL: the first node renewed
    assert_eq!(members(&reader), want);
}
