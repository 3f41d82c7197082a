//! Every byte path must pass these: the same scenarios, against a real server process, over
//! TCP, shared memory and RDMA (the RDMA run skips, saying so, without a device at both ends),
//! in the style of the eviction policies' contract tests. What only one path does (a reply
//! cut mid-stream over TCP, descriptors and leases over shared memory) stays in that path's
//! own suite.

mod common;

use common::{ServerProcess, content};
use kvcache_client::{
    Client, ClientConfig, ClientError, GetOutcome, PathKind, PutBlocks, TransportChoice,
};
use kvcache_core::BlockKey;
use kvcache_core::wire::PutStatus;

/// The server every scenario runs against: room for all of them, the corruption hook on.
fn server() -> ServerProcess {
    ServerProcess::start(&["--memory", "64MiB", "--enable-test-hooks"])
}

/// A client on `path`, with small batches and a small staging window so that every scenario
/// also crosses the splitting of gets (`max_get_keys`) and of staged puts (the window). `None`
/// when the path cannot run here.
async fn client(server: &ServerProcess, path: PathKind) -> Option<Client> {
    let mut cfg = ClientConfig::new(server.data.clone());
    cfg.transport = match path {
        PathKind::Tcp => TransportChoice::Tcp,
        PathKind::Shm => TransportChoice::Shm,
        PathKind::Rdma => TransportChoice::Rdma,
    };
    cfg.max_get_keys = 8;
    cfg.shm_staging_bytes = 1 << 20;
    match Client::connect(cfg).await {
        Ok(c) => {
            assert_eq!(c.path(), path);
            Some(c)
        }
        Err(ClientError::RdmaUnavailable(why)) if path == PathKind::Rdma => {
            eprintln!("skipped over RDMA: {why}");
            None
        }
        Err(e) => panic!("cannot connect over {path}: {e}"),
    }
}

/// Lengths from 1 byte to 700 KB: single-chunk, multi-chunk, and not a multiple of anything.
const LENS: [usize; 8] = [1, 63, 4096, 65_537, 100_000, 262_144, 300_001, 700_000];

/// Blocks put as three segments each come back byte for byte, as fresh buffers and scattered
/// into three destination segments; a second put of the same key changes nothing.
async fn round_trips_scattered_blocks_byte_for_byte(path: PathKind) {
    let server = server();
    let Some(c) = client(&server, path).await else {
        return;
    };
    let keys: Vec<BlockKey> = (0..40u128).map(|i| BlockKey(0x1000 + i)).collect();
    let values: Vec<Vec<u8>> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| content(k, LENS[i % LENS.len()]))
        .collect();
    let thirds = |v: &[u8]| {
        let (a, rest) = v.split_at(v.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        [a.to_vec(), b.to_vec(), c.to_vec()]
    };
    let segments: Vec<[Vec<u8>; 3]> = values.iter().map(|v| thirds(v)).collect();
    let refs: Vec<Vec<&[u8]>> = segments
        .iter()
        .map(|s| s.iter().map(|p| &p[..]).collect())
        .collect();
    let lists: Vec<&[&[u8]]> = refs.iter().map(|r| &r[..]).collect();
    let stored = c.put_many_segments(&keys, &lists).await.unwrap();
    assert!(stored.iter().all(|s| *s == PutStatus::Stored), "{stored:?}");
    let again = c.put_many_segments(&keys[..3], &lists[..3]).await.unwrap();
    assert_eq!(again, [PutStatus::AlreadyPresent; 3]);

    let fresh = c.get_many(&keys).await.unwrap();
    for ((k, got), want) in keys.iter().zip(&fresh).zip(&values) {
        assert_eq!(got.as_deref(), Some(&want[..]), "{k} over {path}");
    }
    let mut dst: Vec<[Vec<u8>; 3]> = segments
        .iter()
        .map(|s| s.clone().map(|p| vec![0u8; p.len()]))
        .collect();
    let mut views: Vec<Vec<&mut [u8]>> = dst
        .iter_mut()
        .map(|s| s.iter_mut().map(|p| &mut p[..]).collect())
        .collect();
    let out = c.get_many_into(&keys, &mut views).await.unwrap();
    assert!(out.iter().all(|o| *o == GetOutcome::Hit), "{out:?}");
    for (got, want) in dst.iter().zip(&segments) {
        assert_eq!(got, want);
    }
    assert_eq!(c.exists(&keys).await.unwrap(), vec![true; keys.len()]);
    assert_eq!(c.prefix_match(&keys).await.unwrap(), keys.len());
    assert_eq!(
        server.metric("kvcache_active_leases"),
        0.0,
        "every lease released"
    );
}

/// An absent key is a miss; a destination of the wrong size is reported with both sizes and
/// left untouched; the connection stays clean for the next call.
async fn a_miss_and_a_wrong_size_leave_the_destination_untouched(path: PathKind) {
    let server = server();
    let Some(c) = client(&server, path).await else {
        return;
    };
    c.put(BlockKey(1), &[7u8; 1000]).await.unwrap();
    let (mut small, mut absent) = (vec![0u8; 999], vec![0u8; 1000]);
    let out = c
        .get_many_into(
            &[BlockKey(1), BlockKey(2)],
            &mut [vec![&mut small[..]], vec![&mut absent[..]]],
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        [
            GetOutcome::WrongSize {
                stored: 1000,
                expected: 999
            },
            GetOutcome::Miss
        ]
    );
    assert!(small.iter().chain(&absent).all(|b| *b == 0));
    assert_eq!(c.get(BlockKey(2)).await.unwrap(), None);
    assert_eq!(c.get(BlockKey(1)).await.unwrap().unwrap(), vec![7u8; 1000]);
    assert_eq!(
        c.exists(&[BlockKey(2), BlockKey(1)]).await.unwrap(),
        [false, true]
    );
    assert_eq!(
        c.prefix_match(&[BlockKey(2), BlockKey(1)]).await.unwrap(),
        0
    );
}

/// A block corrupted in the pool is a miss, never bytes: the client checks it as the bytes
/// land (over every path), reports it, and the node checks it, drops it and counts it; the
/// rest of the batch still hits.
async fn a_corrupt_block_is_a_miss_and_the_rest_of_the_batch_hits(path: PathKind) {
    let server = server();
    let Some(c) = client(&server, path).await else {
        return;
    };
    let (bad, good) = (BlockKey(10), BlockKey(11));
    let value = content(bad, 500_000);
    c.put(bad, &value).await.unwrap();
    c.put(good, &value).await.unwrap();
    let (status, _) = server.http("POST", &format!("/debug/corrupt/{}", bad.to_hex()));
    assert_eq!(status, 200);
    // The bad block lands in three segments cut so that its chunks are read every way: through
    // a bounce buffer (spanning segments), alone in place, and in a group of chunks.
    let (mut a, mut b) = (vec![0u8; value.len()], vec![0u8; value.len()]);
    let (a0, rest) = a.split_at_mut(123_457);
    let (a1, a2) = rest.split_at_mut(300_001 - 123_457);
    let out = c
        .get_many_into(&[bad, good], &mut [vec![a0, a1, a2], vec![&mut b[..]]])
        .await
        .unwrap();
    assert_eq!(out, [GetOutcome::Miss, GetOutcome::Hit]);
    assert!(b == value);
    // The client named the block (on release, or in a report over TCP); the node checked it
    // itself.
    let confirmed = "kvcache_suspect_blocks_total{result=\"confirmed\"}";
    assert_eq!(server.wait_metric(confirmed, |v| v == 1.0), 1.0);
    assert_eq!(server.metric("kvcache_checksum_failures_total"), 1.0);
    assert_eq!(
        c.exists(&[bad]).await.unwrap(),
        [false],
        "dropped from the index"
    );
    assert_eq!(c.put(bad, &value).await.unwrap(), PutStatus::Stored);
    assert_eq!(c.get(bad).await.unwrap().unwrap(), value);
}

macro_rules! every_byte_path {
    ($($scenario:ident),* $(,)?) => {
        mod tcp { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(kvcache_client::PathKind::Tcp).await } )* }
        mod shm { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(kvcache_client::PathKind::Shm).await } )* }
        mod rdma { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $scenario() { super::$scenario(kvcache_client::PathKind::Rdma).await } )* }
    };
}

every_byte_path!(
    round_trips_scattered_blocks_byte_for_byte,
    a_miss_and_a_wrong_size_leave_the_destination_untouched,
    a_corrupt_block_is_a_miss_and_the_rest_of_the_batch_hits,
);
