//! A static cluster of real server processes on loopback, driven by `kvcache_client::Cluster`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    ServerProcess, assert_spread_follows_ring, blocks, get_all, put_all, put_concurrently,
    put_then_read_all,
};
use kvcache_client::{Cluster, ClusterConfig, GetOutcome};
use kvcache_core::BlockKey;

fn cluster(servers: &[ServerProcess], replicas: usize) -> Arc<Cluster> {
    let mut cfg = ClusterConfig::new(servers.iter().map(|s| s.data.clone()));
    cfg.replicas = replicas;
    cfg.node.timeout = Duration::from_secs(1);
    cfg.down_for = Duration::from_millis(500);
    Arc::new(Cluster::new(cfg).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_and_five_nodes_hold_thousands_of_blocks_evenly_and_return_every_byte() {
    for n in [3usize, 5] {
        let servers: Vec<ServerProcess> = (0..n)
            .map(|_| ServerProcess::start(&["--memory", "128MiB"]))
            .collect();
        let c = cluster(&servers, 1);
        let all = blocks(n as u64, 3000);
        put_concurrently(&c, &all, 4).await;
        let readers: Vec<_> = all
            .chunks(1000)
            .map(|part| {
                let (c, part) = (Arc::clone(&c), part.to_vec());
                tokio::spawn(async move { get_all(&c, &part).await })
            })
            .collect();
        for r in readers {
            assert!(r.await.unwrap().iter().all(|o| *o == GetOutcome::Hit));
        }
        assert_spread_follows_ring(&c, &servers, &all);
        let chain: Vec<BlockKey> = all[..100].iter().map(|b| b.0).collect();
        assert_eq!(c.prefix_match(&chain).await.unwrap(), 100);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_costs_misses_with_one_replica_nothing_with_two_and_rejoins_on_restart() {
    let mut servers: Vec<ServerProcess> = (0..3)
        .map(|_| ServerProcess::start(&["--memory", "128MiB"]))
        .collect();
    let (r1, r2) = (cluster(&servers, 1), cluster(&servers, 2));
    let (one, two) = (blocks(11, 1500), blocks(22, 1500));
    put_all(&r1, &one).await;
    put_all(&r2, &two).await;

    let dead = servers[1].data.clone();
    servers[1].child.kill().unwrap(); // kill -9
    servers[1].child.wait().unwrap();
    let started = Instant::now();
    let got_two = get_all(&r2, &two).await;
    assert!(
        got_two.iter().all(|o| *o == GetOutcome::Hit),
        "R=2: no misses for blocks written before the kill"
    );
    let got_one = get_all(&r1, &one).await;
    for ((k, _), o) in one.iter().zip(&got_one) {
        let expect = if r1.owners(*k)[0] == dead {
            GetOutcome::Miss
        } else {
            GetOutcome::Hit
        };
        assert_eq!(*o, expect, "R=1: only the dead node's blocks are misses");
    }
    assert!(
        got_one.contains(&GetOutcome::Miss),
        "the dead node owned some blocks"
    );
    let chain: Vec<BlockKey> = two[..200].iter().map(|b| b.0).collect();
    assert_eq!(r2.prefix_match(&chain).await.unwrap(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "reads around a dead node took {:?}",
        started.elapsed()
    );

    // The node comes back, empty, where it was: it is routed to again and serves.
    servers[1] = ServerProcess::start_at(&dead, &["--memory", "128MiB"]);
    tokio::time::sleep(Duration::from_millis(600)).await; // past down_for
    let fresh = blocks(33, 300);
    put_then_read_all(&r1, &fresh).await;
    assert!(
        servers[1].metric("kvcache_blocks_stored") > 0.0,
        "the restarted node took its share"
    );
    assert!(
        get_all(&r2, &two)
            .await
            .iter()
            .all(|o| *o == GetOutcome::Hit),
        "R=2 reads fall back past the empty node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locality_hint_keeps_a_copy_on_the_named_node_and_the_ring_still_finds_every_block() {
    let mut servers: Vec<ServerProcess> = (0..3)
        .map(|_| ServerProcess::start(&["--memory", "128MiB"]))
        .collect();
    let c = cluster(&servers, 1);
    let near = servers[2].data.clone();
    let data = common::blocks(81, 600);
    let values = common::contents(&data);
    let keys: Vec<BlockKey> = data.iter().map(|b| b.0).collect();
    let segs: Vec<Vec<&[u8]>> = values.iter().map(|v| vec![&v[..]]).collect();
    let segs: Vec<&[&[u8]]> = segs.iter().map(|v| &v[..]).collect();
    let stored = c
        .put_many_segments_near(&keys, &segs, Some(&near))
        .await
        .unwrap();
    assert!(stored.iter().all(|s| *s));
    // The named node holds every block; the ring owners hold theirs, so any client finds all.
    assert_eq!(
        servers[2].metric("kvcache_blocks_stored"),
        data.len() as f64
    );
    assert!(
        get_all(&c, &data)
            .await
            .iter()
            .all(|o| *o == GetOutcome::Hit)
    );

    // Lose a ring owner: a reader next to the named node still reads everything from it.
    let dead = servers[0].data.clone();
    servers[0].child.kill().unwrap();
    servers[0].child.wait().unwrap();
    let mut bufs: Vec<Vec<u8>> = data.iter().map(|b| vec![0u8; b.1]).collect();
    let mut dst: Vec<Vec<&mut [u8]>> = bufs.iter_mut().map(|b| vec![&mut b[..]]).collect();
    let got = c
        .get_many_into_near(&keys, &mut dst, Some(&near))
        .await
        .unwrap();
    assert!(got.iter().all(|o| *o == GetOutcome::Hit));
    assert!(
        bufs.iter().zip(&values).all(|(b, v)| b == v),
        "every byte from the nearby copy"
    );
    // Without the hint, the dead owner's blocks are misses (R = 1): the copy is extra.
    let plain = get_all(&c, &data).await;
    let lost = data.iter().filter(|b| c.owners(b.0)[0] == dead).count();
    assert_eq!(
        plain.iter().filter(|o| **o == GetOutcome::Miss).count(),
        lost
    );
    assert!(lost > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_a_static_cluster_warms_itself_with_the_blocks_it_now_owns() {
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let peers = addrs.join(",");
    let node =
        |i: usize| ServerProcess::start_at(&addrs[i], &["--memory", "128MiB", "--peers", &peers]);
    let (first, second) = (node(0), node(1));
    // Clients that know the first two write; then the third node joins.
    let mut two = ClusterConfig::new(addrs[..2].to_vec());
    two.node.timeout = Duration::from_secs(1);
    let data = blocks(91, 2000);
    put_all(&Cluster::new(two).unwrap(), &data).await;
    let third = node(2);

    let full = Cluster::new(ClusterConfig::new(addrs.clone())).unwrap();
    let owned = data
        .iter()
        .filter(|b| full.owners(b.0)[0] == addrs[2])
        .count();
    assert!(
        owned > 400,
        "about a third of the keys move to the newcomer, got {owned}"
    );
    // Warm state 2 says warming is over: the count is final then, not still climbing.
    third.wait_metric("kvcache_cluster_warm_state", |v| v == 2.0);
    assert_eq!(
        third.metric("kvcache_cluster_warmed_blocks_total"),
        owned as f64,
        "exactly the blocks it owns, copied from its peers"
    );
    assert_eq!(third.metric("kvcache_blocks_stored"), owned as f64);
    for n in [&first, &second, &third] {
        assert_eq!(n.metric("kvcache_cluster_members"), 3.0);
        assert_eq!(n.metric("kvcache_cluster_ring_version"), 1.0);
        assert_eq!(n.metric("kvcache_cluster_warm_state"), 2.0);
    }
    // A client of the full ring reads every block, the moved ones from the newcomer, every
    // byte checked.
    assert!(
        get_all(&full, &data)
            .await
            .iter()
            .all(|o| *o == GetOutcome::Hit)
    );
    let moved: Vec<BlockKey> = data
        .iter()
        .filter(|b| full.owners(b.0)[0] == addrs[2])
        .map(|b| b.0)
        .collect();
    let direct = kvcache_client::Client::connect(kvcache_client::ClientConfig::new(&addrs[2]))
        .await
        .unwrap();
    assert!(direct.exists(&moved).await.unwrap().iter().all(|p| *p));
}
