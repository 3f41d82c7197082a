//! `kvcache-bench cluster`: aggregate get throughput of 1 and 3 nodes on loopback with the same
//! total memory, and the measured fraction of keys that move when a fourth node joins.
//!
//! Throughput: the nodes are real server processes; clients are `kvcache_client::Cluster`s
//! over TCP (as between machines), each task reading batches of random stored keys into its
//! own buffers for the given seconds; each value's stamp is checked (the nodes verify every
//! chunk's checksum as they send it).
//! Keys moved: blocks are written through a 3-node ring and looked up through the 4-node ring
//! over the same nodes; a block whose owner changed is a miss there. That is what a cluster
//! pays on a join with R = 1 (before any warming), measured on real nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcache_client::{Cluster, ClusterConfig, GetOutcome, PutBlocks, TransportChoice};
use kvcache_core::{BlockKey, ByteSize};

use crate::systems::{Managed, check_stamp, kvcache, stamp};

/// What to measure.
pub struct Plan {
    pub memory: ByteSize,
    pub value: ByteSize,
    pub concurrency: usize,
    pub batch: usize,
    pub seconds: f64,
    pub move_blocks: usize,
}

fn start_nodes(n: usize, memory_each: u64) -> anyhow::Result<(Vec<Managed>, Vec<String>)> {
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let (p, a) = kvcache::start(&format!("{memory_each}B"))?;
        procs.push(p);
        addrs.push(a);
    }
    Ok((procs, addrs))
}

fn cluster(members: &[String]) -> anyhow::Result<Arc<Cluster>> {
    let mut cfg = ClusterConfig::new(members.iter().cloned());
    cfg.node.transport = TransportChoice::Tcp;
    cfg.node.max_connections = 8;
    Ok(Arc::new(Cluster::new(cfg)?))
}

/// GB/s of verified gets from `nodes` nodes sharing `plan.memory`.
async fn throughput(plan: &Plan, nodes: usize) -> anyhow::Result<f64> {
    let (_procs, addrs) = start_nodes(nodes, plan.memory.0 / nodes as u64)?;
    let c = cluster(&addrs)?;
    let len = plan.value.0 as usize;
    // Half the total memory: every node holds its share with room to spare.
    let keys = plan.memory.0 / 2 / plan.value.0;
    let mut value = vec![0u8; len];
    for k in 0..keys {
        stamp(&mut value, k);
        let stored = c.put_many(&[(BlockKey(k as u128), &value[..])]).await?;
        anyhow::ensure!(stored[0], "node refused block {k}");
    }
    let deadline = Instant::now() + Duration::from_secs_f64(plan.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..plan.concurrency)
        .map(|t| {
            let (c, batch) = (Arc::clone(&c), plan.batch);
            tokio::spawn(async move {
                let mut bufs = vec![vec![0u8; len]; batch];
                let (mut bytes, mut x) = (0u64, 0x9e37_79b9_7f4a_7c15u64 ^ t as u64);
                while Instant::now() < deadline {
                    let ks: Vec<u64> = (0..batch)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x % keys
                        })
                        .collect();
                    let block_keys: Vec<BlockKey> =
                        ks.iter().map(|&k| BlockKey(k as u128)).collect();
                    let mut dst: Vec<Vec<&mut [u8]>> =
                        bufs.iter_mut().map(|b| vec![&mut b[..]]).collect();
                    let got = c.get_many_into(&block_keys, &mut dst).await?;
                    for ((o, k), b) in got.iter().zip(&ks).zip(&bufs) {
                        anyhow::ensure!(*o == GetOutcome::Hit, "key {k}: {o:?}");
                        check_stamp(b, *k)?;
                    }
                    bytes += (batch * len) as u64;
                }
                anyhow::Ok(bytes)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64() / 1e9)
}

/// The fraction of blocks written through 3 nodes that the 4-node ring places elsewhere.
async fn moved_fraction(plan: &Plan) -> anyhow::Result<f64> {
    let (_procs, addrs) = start_nodes(4, 256 << 20)?;
    let three = cluster(&addrs[..3])?;
    let four = cluster(&addrs)?;
    let keys: Vec<BlockKey> = (0..plan.move_blocks as u128)
        .map(|i| BlockKey(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)))
        .collect();
    let value = [7u8; 64];
    for chunk in keys.chunks(500) {
        let batch: Vec<(BlockKey, &[u8])> = chunk.iter().map(|k| (*k, &value[..])).collect();
        anyhow::ensure!(three.put_many(&batch).await?.iter().all(|s| *s));
    }
    let mut missing = 0;
    for chunk in keys.chunks(500) {
        missing += four.exists(chunk).await?.iter().filter(|p| !**p).count();
    }
    Ok(missing as f64 / keys.len() as f64)
}

/// Runs both measurements and prints a report; returns the results as JSON.
pub async fn run(plan: &Plan) -> anyhow::Result<serde_json::Value> {
    let one = throughput(plan, 1).await?;
    let three = throughput(plan, 3).await?;
    let moved = moved_fraction(plan).await?;
    println!(
        "cluster get throughput, {} values, batches of {}, {} clients, {} total memory (TCP, loopback)",
        plan.value, plan.batch, plan.concurrency, plan.memory
    );
    println!("  1 node:  {one:.2} GB/s");
    println!("  3 nodes: {three:.2} GB/s ({:.2}x)", three / one);
    println!(
        "keys moved when a 4th node joins 3: {:.1}% of {} (ideal 25.0%)",
        100.0 * moved,
        plan.move_blocks
    );
    Ok(serde_json::json!({
        "value_bytes": plan.value.0,
        "batch": plan.batch,
        "concurrency": plan.concurrency,
        "memory_bytes": plan.memory.0,
        "get_gbps_1_node": one,
        "get_gbps_3_nodes": three,
        "moved_fraction_3_to_4": moved,
        "move_blocks": plan.move_blocks,
    }))
}
