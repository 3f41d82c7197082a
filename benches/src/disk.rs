//! `kvcache-bench disk`: get throughput of blocks that live in the disk tier, against a plain
//! sequential read of the same number of bytes from one file, in the same run and directory.
//!
//! The server writes `total` bytes of values through a pool of `memory` (so most go down to
//! disk), is stopped (which writes the rest down) and started again on the same directory: its
//! pool is empty and every block is on disk (a warm restart). The page cache is dropped, then
//! clients read the blocks in key order, each get bringing its block up from disk and checking
//! it. The ceiling writes the same bytes to one file, drops the page cache, and reads it
//! sequentially in value-sized reads. Without permission to drop the page cache (not root), both
//! read from it, and the report says so.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use kvcache_client::{Client, ClientConfig, GetOutcome, TransportChoice};
use kvcache_core::{BlockKey, ByteSize};

use crate::systems::{check_stamp, kvcache, stamp};

/// What to measure.
pub struct Plan {
    pub dir: std::path::PathBuf,
    pub memory: ByteSize,
    pub total: ByteSize,
    pub value: ByteSize,
    pub concurrency: usize,
}

/// Empties the page cache; false where that is not permitted.
fn drop_page_cache() -> bool {
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

async fn connect(addr: &str) -> anyhow::Result<Client> {
    let mut cfg = ClientConfig::new(addr);
    cfg.transport = TransportChoice::Tcp;
    cfg.max_connections = 16;
    Ok(Client::connect(cfg).await?)
}

/// Seconds to read every key once, in order, over `concurrency` tasks, checking each value.
async fn read_all(plan: &Plan, addr: &str, keys: u64) -> anyhow::Result<f64> {
    let c = Arc::new(connect(addr).await?);
    let next = Arc::new(AtomicU64::new(0));
    let len = plan.value.0 as usize;
    let started = Instant::now();
    let tasks: Vec<_> = (0..plan.concurrency)
        .map(|_| {
            let (c, next) = (Arc::clone(&c), Arc::clone(&next));
            tokio::spawn(async move {
                let mut buf = vec![0u8; len];
                loop {
                    let k = next.fetch_add(1, Relaxed);
                    if k >= keys {
                        return anyhow::Ok(());
                    }
                    let got = c
                        .get_many_into(&[BlockKey(k as u128)], &mut [vec![&mut buf[..]]])
                        .await?;
                    anyhow::ensure!(got[0] == GetOutcome::Hit, "key {k}: {:?}", got[0]);
                    check_stamp(&buf, k)?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds to read a file of the same bytes sequentially, value by value.
fn file_read(path: &Path, plan: &Plan, keys: u64, cold: bool) -> anyhow::Result<f64> {
    let len = plan.value.0 as usize;
    let mut value = vec![0u8; len];
    let mut f = std::fs::File::create(path)?;
    for k in 0..keys {
        stamp(&mut value, k);
        f.write_all(&value)?;
    }
    f.sync_all()?;
    drop(f);
    if cold {
        drop_page_cache();
    }
    let mut f = std::fs::File::open(path)?;
    let started = Instant::now();
    for k in 0..keys {
        f.read_exact(&mut value)?;
        check_stamp(&value, k)?;
    }
    let took = started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(took)
}

pub async fn run(plan: &Plan) -> anyhow::Result<serde_json::Value> {
    let tier = plan.dir.join("tier");
    let _ = std::fs::remove_dir_all(&tier);
    std::fs::create_dir_all(&tier)?;
    let capacity = format!("{}B", plan.total.0 * 2);
    let args = [
        "--disk",
        tier.to_str().unwrap_or_default(),
        "--disk-capacity",
        &capacity,
    ];
    let memory = format!("{}B", plan.memory.0);
    let keys = plan.total.0 / plan.value.0;
    {
        let (_server, addr) = kvcache::start_with(&memory, &args)?;
        let c = connect(&addr).await?;
        let mut value = vec![0u8; plan.value.0 as usize];
        for k in 0..keys {
            stamp(&mut value, k);
            c.put(BlockKey(k as u128), &value).await?;
        }
        // Dropping the server stops it with SIGTERM: what is in memory goes down to disk.
    }
    let (_server, addr) = kvcache::start_with(&memory, &args)?;
    let cold = drop_page_cache();
    let tier_s = read_all(plan, &addr, keys).await?;
    let file_s = file_read(&plan.dir.join("sequential.bin"), plan, keys, cold)?;
    let bytes = (keys * plan.value.0) as f64;
    let (tier_gbps, file_gbps) = (bytes / tier_s / 1e9, bytes / file_s / 1e9);
    println!(
        "disk tier, {} of {} values read once after a restart, {} clients, page cache {}:",
        ByteSize(keys * plan.value.0),
        plan.value,
        plan.concurrency,
        if cold {
            "dropped"
        } else {
            "warm (no permission to drop it)"
        }
    );
    println!("  kvcache disk-tier gets:     {tier_gbps:.2} GB/s");
    println!("  sequential file read:       {file_gbps:.2} GB/s");
    println!(
        "  ratio:                      {:.2}x",
        tier_gbps / file_gbps
    );
    std::fs::remove_dir_all(&tier)?;
    Ok(serde_json::json!({
        "value_bytes": plan.value.0,
        "total_bytes": keys * plan.value.0,
        "memory_bytes": plan.memory.0,
        "concurrency": plan.concurrency,
        "page_cache_dropped": cold,
        "disk_tier_get_gbps": tier_gbps,
        "sequential_file_read_gbps": file_gbps,
        "ratio": tier_gbps / file_gbps,
    }))
}
