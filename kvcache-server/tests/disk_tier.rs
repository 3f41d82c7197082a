//! The disk tier (`--disk`, cargo feature `disk`) in a real server process: blocks beyond the
//! memory pool are read back from disk, every byte checked, and again after a restart.
#![cfg(feature = "disk")]

mod common;

use common::{ServerProcess, put_blocks, read_blocks};
use kvcache_client::{Client, ClientConfig, PutBlocks, TransportChoice};
use kvcache_core::BlockKey;

const BLOCK: usize = 256 << 10;
const BLOCKS: u128 = 400; // 100 MiB through a 32 MiB pool

async fn client(server: &ServerProcess) -> Client {
    let mut cfg = ClientConfig::new(&server.data);
    cfg.transport = TransportChoice::Tcp;
    Client::connect(cfg).await.unwrap()
}

/// Reads every block, checks its bytes, and returns how many were hits.
async fn read_all(c: &Client, keys: &[BlockKey]) -> usize {
    read_blocks(c, keys, BLOCK).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_beyond_memory_come_back_from_disk_and_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("kvcache-disk-tier-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = [
        "--memory",
        "32MiB",
        "--disk",
        dir.to_str().unwrap(),
        "--disk-capacity",
        "512MiB",
    ];
    let keys: Vec<BlockKey> = (1..=BLOCKS)
        .map(|i| BlockKey(i * 0x9e37_79b9_7f4a_7c15))
        .collect();
    let mut server = ServerProcess::start(&args);
    let c = client(&server).await;
    put_blocks(&c, &keys, BLOCK).await;
    assert!(
        server.metric("kvcache_blocks_stored") < 130.0,
        "most blocks left memory"
    );
    // Every block is still held: the first ones come back from disk.
    assert!(c.exists(&keys).await.unwrap().iter().all(|p| *p));
    assert_eq!(
        read_all(&c, &keys).await,
        keys.len(),
        "every block, every byte"
    );
    let disk_hits = server.metric("kvcache_disk_hits_total");
    assert!(disk_hits >= 250.0, "read from disk: {disk_hits}");
    assert_eq!(server.metric("kvcache_disk_corrupt_blocks_total"), 0.0);

    // A restart with an empty pool finds every block on disk: those still in memory were
    // written down at shutdown.
    assert!(server.terminate().success());
    drop(c);
    server = ServerProcess::start(&args);
    let c = client(&server).await;
    assert_eq!(server.metric("kvcache_blocks_stored"), 0.0);
    assert_eq!(server.metric("kvcache_disk_blocks"), keys.len() as f64);
    assert_eq!(
        read_all(&c, &keys).await,
        keys.len(),
        "after a restart, every byte"
    );
    assert_eq!(c.prefix_match(&keys[..10]).await.unwrap(), 10);
    drop(server);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn disk_capacity_without_a_disk_is_refused_clearly() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcache-server"))
        .args(["--disk-capacity", "1GiB", "--metrics-listen", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--disk-capacity only applies with --disk")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_naming_more_keys_than_the_cap_reads_nothing_from_disk() {
    use kvcache_core::wire::{self, ErrorCode, GetRequest, Op};

    let dir = std::env::temp_dir().join(format!("kvcache-disk-cap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = ServerProcess::start(&[
        "--memory",
        "16MiB",
        "--disk",
        dir.to_str().unwrap(),
        "--disk-capacity",
        "256MiB",
    ]);
    let c = client(&server).await;
    let keys: Vec<BlockKey> = (1..=200u128).map(|i| BlockKey(i << 70 | i)).collect();
    put_blocks(&c, &keys, BLOCK).await;
    let on_disk = server.wait_metric("kvcache_disk_blocks", |v| v >= 100.0);
    assert!(on_disk >= 100.0, "blocks went down to disk: {on_disk}");
    let hits = server.metric("kvcache_disk_hits_total");
    // 200,000 keys, all of them on disk: one request the size of the control limit.
    let many: Vec<BlockKey> = keys.iter().copied().cycle().take(200_000).collect();
    let req = GetRequest {
        keys: wire::encode_keys(&many),
        ..Default::default()
    };
    let mut s = std::net::TcpStream::connect(&server.data).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    common::send_request(&mut s, Op::Get, 1, &req);
    let (h, control) = common::read_frame(&mut s).expect("a reply");
    assert_eq!(h.op, Op::Error);
    let (code, message) = common::error_reply(&control);
    assert_eq!(code, ErrorCode::LimitExceeded, "{message}");
    assert_eq!(
        server.metric("kvcache_disk_hits_total"),
        hits,
        "nothing was read from disk"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// M4: a node killed mid-demotion, whose newest segment is then torn and whose index is
/// damaged, still starts, rebuilds its index from the segments, and serves the intact blocks:
/// every hit byte for byte, the torn record never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_demotion_with_a_broken_index_starts_and_serves_the_intact_blocks() {
    let dir = std::env::temp_dir().join(format!("kvcache-disk-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let args = [
        "--memory",
        "16MiB",
        "--disk",
        dir.to_str().unwrap(),
        "--disk-capacity",
        "256MiB",
    ];
    let keys: Vec<BlockKey> = (1..=300u128)
        .map(|i| BlockKey((i << 80) | (i * 31)))
        .collect();
    let mut server = ServerProcess::start(&args);
    let c = client(&server).await;
    put_blocks(&c, &keys[..200], BLOCK).await;
    server.wait_metric("kvcache_disk_blocks", |v| v >= 100.0);
    // Kill it while another 100 blocks push the pool's oldest down to disk.
    let writer = {
        let c = client(&server).await;
        let keys = keys[200..].to_vec();
        tokio::spawn(async move {
            for chunk in keys.chunks(4) {
                let values: Vec<Vec<u8>> =
                    chunk.iter().map(|k| common::content(*k, BLOCK)).collect();
                let batch: Vec<(BlockKey, &[u8])> = chunk
                    .iter()
                    .zip(&values)
                    .map(|(k, v)| (*k, &v[..]))
                    .collect();
                if c.put_many(&batch).await.is_err() {
                    return; // the node is gone
                }
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    writer.await.unwrap();
    drop(c);

    // Tear the newest segment mid-record and damage the index.
    let segments = dir.join("segments");
    let newest = std::fs::read_dir(&segments)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let len = std::fs::metadata(&newest).unwrap().len();
    if len > 1000 {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .unwrap()
            .set_len(len - 1000)
            .unwrap();
    }
    std::fs::write(dir.join("index/CURRENT"), b"garbage\n").unwrap();

    let server = ServerProcess::start(&args);
    let c = client(&server).await;
    let on_disk = server.metric("kvcache_disk_blocks");
    assert!(
        on_disk >= 100.0,
        "the rebuilt index finds the demoted blocks: {on_disk}"
    );
    // read_blocks checks every hit's bytes; a torn or missing block is a miss.
    let hits = read_all(&c, &keys).await;
    assert_eq!(hits as f64, on_disk, "every indexed block, every byte");
    assert_eq!(server.metric("kvcache_disk_corrupt_blocks_total"), 0.0);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
