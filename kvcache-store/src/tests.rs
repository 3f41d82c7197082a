use std::sync::Arc;

use kvcache_core::BlockKey;
use kvcache_core::checksum;
use kvcache_transport::LockMode;

use super::eviction::PolicyKind;
use super::*;

/// Data bytes that, with their checksum trailer, fill exactly one 4 KiB page.
const ONE_PAGE: usize = 4096 - 8;

fn store(pages: u64, policy: PolicyKind) -> Arc<Store> {
    store_with_shards(pages, policy, 4)
}

fn store_with_shards(pages: u64, policy: PolicyKind, shards: usize) -> Arc<Store> {
    Store::new(&StoreConfig {
        capacity: pages * 4096,
        page_size: 4096,
        shards,
        policy,
        high_watermark: 1.0,
        low_watermark: 1.0,
        lock: LockMode::Off,
        shared: false,
    })
    .unwrap()
}

/// Deterministic content for a key, so any reader can verify any block.
fn content(key: BlockKey, len: usize) -> Vec<u8> {
    kvcache_core::sample::bytes(key.low64(), len)
}

/// A verified read, as a client would see it.
fn read(s: &Arc<Store>, key: BlockKey) -> Option<Vec<u8>> {
    s.lease(key)?.verified_bytes().ok().map(<[u8]>::to_vec)
}

fn put(s: &Arc<Store>, key: BlockKey, len: usize) -> Result<CommitOutcome, AllocError> {
    let mut a = s.allocate(key, len)?;
    a.bytes_mut().copy_from_slice(&content(key, len));
    Ok(a.commit())
}

#[test]
fn put_then_get_returns_the_same_bytes() {
    let s = store(128, PolicyKind::Lru);
    assert_eq!(put(&s, BlockKey(1), 10_000), Ok(CommitOutcome::Stored));
    assert_eq!(read(&s, BlockKey(1)).unwrap(), content(BlockKey(1), 10_000));
    assert!(s.lease(BlockKey(2)).is_none());
    assert_eq!(s.stats().blocks, 1);
    assert_eq!(s.stats().used_bytes, 3 * 4096);
    let big = 3 * checksum::CHUNK + 17;
    put(&s, BlockKey(2), big).unwrap();
    assert_eq!(read(&s, BlockKey(2)).unwrap(), content(BlockKey(2), big));
}

#[test]
fn put_of_existing_key_is_a_no_op() {
    let s = store(16, PolicyKind::Lru);
    put(&s, BlockKey(1), 100).unwrap();
    assert_eq!(
        s.allocate(BlockKey(1), 100).err(),
        Some(AllocError::AlreadyPresent)
    );
    // A racing writer that allocated before the first commit is turned into a no-op too.
    let mut late = s.allocate(BlockKey(2), 100).unwrap();
    put(&s, BlockKey(2), 100).unwrap();
    late.bytes_mut().fill(0xee);
    assert_eq!(late.commit(), CommitOutcome::AlreadyPresent);
    assert_eq!(read(&s, BlockKey(2)).unwrap(), content(BlockKey(2), 100));
    assert_eq!(
        s.stats().used_bytes,
        2 * 4096,
        "the loser's pages were returned"
    );
}

#[test]
fn uncommitted_allocation_is_invisible_and_freed_on_drop() {
    let s = store(4, PolicyKind::Lru);
    let mut a = s.allocate(BlockKey(5), 4096 * 4 - 8).unwrap();
    a.bytes_mut()[0] = 1;
    assert!(!s.contains(BlockKey(5)));
    assert!(s.lease(BlockKey(5)).is_none());
    assert_eq!(s.allocate(BlockKey(6), 1).err(), Some(AllocError::PoolFull));
    drop(a);
    assert_eq!(s.stats().used_bytes, 0);
    assert!(put(&s, BlockKey(6), 4096 * 4 - 8).is_ok());
}

#[test]
fn block_larger_than_pool_is_rejected_clearly() {
    let s = store(4, PolicyKind::Lru);
    let err = s.allocate(BlockKey(1), 4 * 4096 - 7).err().unwrap();
    assert!(matches!(err, AllocError::TooLarge { .. }));
    assert!(
        err.to_string().contains("larger than the whole pool"),
        "{err}"
    );
    assert_eq!(s.allocate(BlockKey(1), 0).err(), Some(AllocError::Empty));
}

#[test]
fn full_pool_evicts_least_recently_used() {
    // Order is exact within a shard (and approximate across shards), so one shard here.
    let s = store_with_shards(4, PolicyKind::Lru, 1);
    for k in 0..4 {
        put(&s, BlockKey(k), ONE_PAGE).unwrap();
    }
    drop(s.lease(BlockKey(0))); // read 0: now 1 is the least recently used
    put(&s, BlockKey(10), ONE_PAGE).unwrap();
    assert!(s.contains(BlockKey(0)));
    assert!(!s.contains(BlockKey(1)));
    assert_eq!(s.stats().evictions, 1);
}

#[test]
fn full_pool_never_evicts_a_leased_block() {
    for policy in [PolicyKind::Lru, PolicyKind::S3fifo] {
        let s = store(4, policy);
        for k in 0..4 {
            put(&s, BlockKey(k), ONE_PAGE).unwrap();
        }
        let leases: Vec<Lease> = (0..3).map(|k| s.lease(BlockKey(k)).unwrap()).collect();
        put(&s, BlockKey(10), ONE_PAGE).unwrap();
        assert!(
            !s.contains(BlockKey(3)),
            "{policy:?}: the only unleased block goes"
        );
        assert_eq!(
            s.allocate(BlockKey(11), 2 * 4096 - 8).err(),
            Some(AllocError::PoolFull),
            "{policy:?}"
        );
        for (k, l) in leases.iter().enumerate() {
            assert_eq!(
                l.verified_bytes().unwrap(),
                content(BlockKey(k as u128), ONE_PAGE),
                "{policy:?}: leased bytes intact"
            );
        }
        drop(leases);
        assert!(
            put(&s, BlockKey(11), 2 * 4096 - 8).is_ok(),
            "{policy:?}: released blocks are evictable"
        );
    }
}

#[test]
fn corrupted_block_is_a_miss_never_returned() {
    let s = store(8, PolicyKind::Lru);
    put(&s, BlockKey(3), 5000).unwrap();
    assert!(s.corrupt_block_for_test(BlockKey(3)));
    let lease = s.lease(BlockKey(3)).expect("the trailer is intact");
    assert_eq!(lease.verified_bytes(), Err(Corrupt));
    assert!(!s.contains(BlockKey(3)), "a corrupt block is dropped");
    assert!(s.lease(BlockKey(3)).is_none());
    drop(lease);
    let st = s.stats();
    assert_eq!(
        (st.checksum_failures, st.used_bytes, st.active_leases),
        (1, 0, 0)
    );
    assert!(
        put(&s, BlockKey(3), 5000).is_ok(),
        "and can be stored again"
    );
    assert_eq!(read(&s, BlockKey(3)).unwrap(), content(BlockKey(3), 5000));
}

#[test]
fn watermarks_evict_down_to_the_low_mark() {
    let s = Store::new(&StoreConfig {
        capacity: 100 * 4096,
        page_size: 4096,
        shards: 2,
        policy: PolicyKind::Lru,
        high_watermark: 0.9,
        low_watermark: 0.5,
        lock: LockMode::Off,
        shared: false,
    })
    .unwrap();
    for k in 0..91 {
        put(&s, BlockKey(k), ONE_PAGE).unwrap();
    }
    let st = s.stats();
    assert!(
        st.used_bytes <= 50 * 4096,
        "used {} pages",
        st.used_bytes / 4096
    );
    assert!(s.contains(BlockKey(90)), "the newest block stays");
}

#[test]
fn prefix_match_counts_leading_present_keys() {
    let s = store(8, PolicyKind::Lru);
    for k in [1, 2, 4] {
        put(&s, BlockKey(k), 10).unwrap();
    }
    let chain: Vec<BlockKey> = (1..=5).map(BlockKey).collect();
    assert_eq!(s.prefix_match(&chain), 2);
    assert_eq!(s.prefix_match(&[]), 0);
}

#[test]
fn concurrent_puts_gets_and_evictions_never_return_wrong_bytes() {
    for policy in [PolicyKind::Lru, PolicyKind::S3fifo] {
        let s = store(64, policy);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let s = Arc::clone(&s);
                scope.spawn(move || {
                    let mut x = t * 7919 + 1;
                    for _ in 0..3000 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let key = BlockKey((x >> 40) as u128 % 200);
                        let len = 1 + (key.0 as usize * 977) % 9000;
                        if x % 2 == 0 {
                            match put(&s, key, len) {
                                Ok(_) | Err(AllocError::AlreadyPresent | AllocError::PoolFull) => {}
                                Err(e) => panic!("{e}"),
                            }
                        } else if let Some(lease) = s.lease(key) {
                            let bytes = lease.verified_bytes().expect("no corruption in this test");
                            assert_eq!(bytes, content(key, len), "wrong bytes for {key}");
                        }
                    }
                });
            }
        });
        let st = s.stats();
        assert_eq!(st.active_leases, 0);
        assert_eq!(st.checksum_failures, 0);
        assert!(
            st.evictions > 0,
            "{policy:?}: the test must exercise eviction"
        );
        assert!(st.used_bytes <= st.capacity_bytes);
    }
}

#[test]
fn corruption_in_a_later_chunk_is_caught_before_that_chunk_is_read() {
    let s = store(1024, PolicyKind::Lru);
    let len = 8 * checksum::CHUNK;
    put(&s, BlockKey(8), len).unwrap();
    assert!(s.corrupt_block_for_test(BlockKey(8))); // the middle byte: chunk 4
    let lease = s.lease(BlockKey(8)).unwrap();
    for i in 0..4 {
        let want = &content(BlockKey(8), len)[checksum::chunk_range(len, i)];
        assert_eq!(
            lease.verified_chunk(i).unwrap(),
            want,
            "chunks before the damage are intact"
        );
    }
    assert_eq!(lease.verified_chunk(4), Err(Corrupt));
    assert!(!s.contains(BlockKey(8)));
    drop(lease);
    assert_eq!(s.stats().used_bytes, 0, "pages freed at the last release");
    assert_eq!(s.stats().checksum_failures, 1);
}

#[test]
fn chunks_sealed_while_filling_match_a_commit_time_checksum() {
    let s = store(1024, PolicyKind::Lru);
    let len = 2 * checksum::CHUNK + 999;
    let data = content(BlockKey(1), len);
    let mut a = s.allocate(BlockKey(1), len).unwrap();
    for i in 0..a.chunk_count() {
        a.fill_chunk(i, &data[checksum::chunk_range(len, i)]);
    }
    a.commit();
    put(&s, BlockKey(2), len).unwrap(); // filled whole, sealed at commit
    assert_eq!(read(&s, BlockKey(1)).unwrap(), data);
    assert_eq!(read(&s, BlockKey(2)).unwrap(), content(BlockKey(2), len));
}

#[test]
fn chunks_filled_and_sealed_in_one_pass_read_back_verified_in_any_order() {
    let s = store(1024, PolicyKind::Lru);
    let len = 2 * checksum::CHUNK + 999;
    let data = content(BlockKey(3), len);
    let mut a = s.allocate(BlockKey(3), len).unwrap();
    // Chunk 2 before chunk 1: it is stored now and sealed at commit.
    for i in [0, 2, 1] {
        a.fill_chunk(i, &data[checksum::chunk_range(len, i)]);
    }
    a.commit();
    assert_eq!(read(&s, BlockKey(3)).unwrap(), data);
}

#[test]
fn eviction_takes_the_oldest_block_across_shards_not_a_recent_one() {
    // The default 64 shards: eviction follows the global order of last use exactly.
    let s = store_with_shards(64, PolicyKind::Lru, 64);
    for k in 0..64 {
        put(&s, BlockKey(k), ONE_PAGE).unwrap();
    }
    for k in 32..64 {
        drop(s.lease(BlockKey(k))); // read: recently used
    }
    for k in 100..116 {
        put(&s, BlockKey(k), ONE_PAGE).unwrap();
    }
    let gone: Vec<u128> = (0..64).filter(|&k| !s.contains(BlockKey(k))).collect();
    assert_eq!(
        gone,
        (0..16).collect::<Vec<_>>(),
        "the 16 least recently used blocks, in order"
    );
    assert!(
        (100..116).all(|k| s.contains(BlockKey(k))),
        "new blocks survive"
    );
}

#[test]
fn keys_are_listed_in_order_a_page_at_a_time() {
    let s = store_with_shards(64, PolicyKind::Lru, 4);
    let mut keys: Vec<BlockKey> = (0..37u128).map(|i| BlockKey(i * 0x9e37_79b9 + 5)).collect();
    for &k in &keys {
        put(&s, k, 100).unwrap();
    }
    keys.sort();
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let (page, more) = s.keys_after(after, 10);
        assert!(page.len() <= 10);
        listed.extend_from_slice(&page);
        after = page.last().copied();
        if !more {
            break;
        }
    }
    assert_eq!(listed, keys, "every key once, ascending");
    assert_eq!(s.keys_after(keys.last().copied(), 10), (vec![], false));
}
