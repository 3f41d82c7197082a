//! The trace benchmark's tests: parsing, keys and values, the simulated store against an
//! independent LRU, and a replay against a real server that must match the simulation exactly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcache_core::BlockKey;
use kvcache_store::eviction::PolicyKind;

use super::blocks::{
    TRACE_BLOCK_TOKENS, block_footprint, block_tokens, chain_keys_of, fill_value, namespace,
    splitmix64,
};
use super::replay::{metric, replay, server_args, server_stats};
use super::sim::{CacheModel, StoreModel, TextbookLru, simulate};
use super::{Capacity, TraceRequest, parse_trace};

fn keys_of(ids: &[u64]) -> Vec<BlockKey> {
    chain_keys_of(&namespace(), ids)
}

/// Requests over `distinct` shared prefixes of random depth plus private tails, so hits,
/// misses, evictions and blocks held beyond a missed prefix all happen.
fn random_chains(n: usize, seed: u64) -> Vec<Vec<BlockKey>> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            let prefix = splitmix64(&mut s) % 40;
            let depth = 1 + splitmix64(&mut s) % 30;
            let tail = splitmix64(&mut s) % 8;
            let mut ids: Vec<u64> = (0..depth).map(|d| prefix * 1000 + d).collect();
            ids.extend((0..tail).map(|t| 1_000_000 + (i as u64) * 100 + t));
            keys_of(&ids)
        })
        .collect()
}

#[test]
fn trace_lines_parse_to_their_hash_ids_and_blank_lines_are_skipped() {
    let text = "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 6, \"hash_ids\": [0, 1]}\n\
                \n\
                {\"hash_ids\": [0, 2, 3]}\n";
    let reqs = parse_trace(text).unwrap();
    assert_eq!(
        reqs,
        [
            TraceRequest {
                hash_ids: vec![0, 1]
            },
            TraceRequest {
                hash_ids: vec![0, 2, 3]
            }
        ]
    );
}

#[test]
fn a_bad_trace_line_is_reported_with_its_number() {
    let err = parse_trace("{\"hash_ids\": [1]}\n{\"hash_ids\": 7}\n").unwrap_err();
    assert!(format!("{err:#}").contains("line 2"), "{err:#}");
}

#[test]
fn trace_keys_are_the_connectors_chain_keys_over_the_blocks_tokens() {
    let ids = [5u64, 9, 5];
    let tokens: Vec<u32> = ids.iter().flat_map(|&id| block_tokens(id)).collect();
    assert_eq!(
        keys_of(&ids),
        kvcache_core::chain_keys(&namespace(), &tokens, TRACE_BLOCK_TOKENS)
    );
}

#[test]
fn trace_key_names_the_whole_prefix_so_only_equal_prefixes_share_keys() {
    let a = keys_of(&[1, 2, 3]);
    let b = keys_of(&[1, 2, 4]);
    let c = keys_of(&[7, 2, 3]);
    assert_eq!(a[..2], b[..2]);
    assert_ne!(a[2], b[2]);
    assert!(
        a.iter().zip(&c).all(|(x, y)| x != y),
        "a different first block changes every key after it"
    );
    assert_ne!(a[0], a[1], "same position, different ids");
}

#[test]
fn values_are_derived_from_the_key_and_cover_every_byte() {
    let (k1, k2) = (BlockKey(1), BlockKey(2));
    for len in [16usize, 17, 1000, 65536] {
        let (mut a, mut b, mut c) = (vec![0u8; len], vec![0u8; len], vec![0u8; len]);
        fill_value(k1, &mut a);
        fill_value(k1, &mut b);
        fill_value(k2, &mut c);
        assert_eq!(a, b, "deterministic");
        assert_ne!(a, c, "keys differ");
        assert_ne!(a[len - 1], 0, "the tail is filled too (for these keys)");
    }
}

#[test]
fn a_block_takes_its_data_and_trailer_rounded_to_pages() {
    assert_eq!(block_footprint(64 << 10), 17 * 4096, "64 KiB + 8 B trailer");
    assert_eq!(block_footprint(4096 - 8), 4096);
    assert_eq!(block_footprint(4096), 2 * 4096);
}

#[test]
fn pool_sizes_parse_as_blocks_or_inf() {
    assert_eq!("1000".parse::<Capacity>(), Ok(Capacity::Blocks(1000)));
    assert_eq!("inf".parse::<Capacity>(), Ok(Capacity::Unbounded));
    assert!("0".parse::<Capacity>().is_err());
    assert!("lots".parse::<Capacity>().is_err());
}

#[test]
fn trace_model_of_an_unbounded_cache_hits_every_prefix_block_seen_before() {
    let mut m = StoreModel::new(PolicyKind::Lru, 1, u64::MAX);
    assert_eq!(m.request(&keys_of(&[1, 2, 3])).hits, 0);
    assert_eq!(m.request(&keys_of(&[1, 2, 4])).hits, 2);
    let again = m.request(&keys_of(&[1, 2, 4, 5]));
    assert_eq!((again.hits, again.stored), (3, 1));
    assert_eq!(m.evictions(), 0);
    assert_eq!(m.blocks(), 5);
}

#[test]
fn trace_model_never_holds_more_than_its_capacity_and_evicts_only_when_full() {
    for policy in [PolicyKind::Lru, PolicyKind::S3fifo] {
        for shards in [1, 64] {
            let mut m = StoreModel::new(policy, shards, 50);
            for keys in random_chains(300, 3) {
                let before = m.blocks();
                let ev = m.evictions();
                let o = m.request(&keys);
                assert!(m.blocks() <= 50, "{policy:?}/{shards}: {}", m.blocks());
                let evicted = m.evictions() - ev;
                assert_eq!(before + o.stored - evicted, m.blocks());
                if evicted > 0 {
                    assert_eq!(m.blocks(), 50, "evicts only to make room");
                }
            }
        }
    }
}

#[test]
fn trace_model_lru_equals_a_textbook_lru_sharded_or_not() {
    // The store compares every shard's oldest block, so even 64 shards are one global LRU.
    let chains = random_chains(2000, 7);
    for cap in [10, 60, 200, 1000] {
        let mut textbook = TextbookLru::new(cap);
        let want = simulate(&chains, &mut textbook);
        for shards in [1, 8, 64] {
            let mut m = StoreModel::new(PolicyKind::Lru, shards, cap);
            let got = simulate(&chains, &mut m);
            assert_eq!(got, want, "capacity {cap}, {shards} shards");
        }
        assert!(
            want.hits > 0 && want.stored > cap,
            "hits and evictions: {want:?}"
        );
    }
}

#[test]
fn trace_model_s3fifo_keeps_a_reused_prefix_through_a_scan_that_flushes_lru() {
    // A hot 10-block prefix read between bursts of one-off blocks, in a 40-block cache.
    let hot = keys_of(&(0..10).collect::<Vec<_>>());
    let mut chains = Vec::new();
    for round in 0..20u64 {
        chains.push(hot.clone());
        chains.push(hot.clone());
        chains.push(keys_of(
            &(0..50)
                .map(|i| 10_000 + round * 100 + i)
                .collect::<Vec<_>>(),
        ));
    }
    let hit_rate = |policy| {
        let mut m = StoreModel::new(policy, 1, 40);
        simulate(&chains, &mut m).hit_rate()
    };
    let (lru, s3) = (hit_rate(PolicyKind::Lru), hit_rate(PolicyKind::S3fifo));
    assert!(s3 > lru, "S3-FIFO {s3} should beat LRU {lru} on a scan");
}

#[test]
fn metrics_text_gives_plain_and_labelled_samples() {
    let text = "# TYPE kvcache_blocks_stored gauge\n\
                kvcache_blocks_stored 1234\n\
                kvcache_blocks_stored_other 9\n\
                kvcache_hit_blocks_total{op=\"get\"} 7\n\
                kvcache_hit_blocks_total{op=\"prefix_match\"} 42\n";
    assert_eq!(metric(text, "kvcache_blocks_stored", ""), Some(1234.0));
    assert_eq!(
        metric(text, "kvcache_hit_blocks_total", r#"{op="prefix_match"}"#),
        Some(42.0)
    );
    assert_eq!(metric(text, "kvcache_evictions_total", ""), None);
}

#[test]
fn trace_replay_against_a_real_server_matches_the_model_exactly_sharded_or_not() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let chains = Arc::new(random_chains(150, 11));
        let block = 1000usize;
        let runs = [PolicyKind::Lru, PolicyKind::S3fifo]
            .into_iter()
            .flat_map(|p| [(p, 1), (p, 16)]);
        for (policy, shards) in runs {
            let cap = 60u64;
            let mut args = vec![
                "kvcache-server".to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
            ];
            args.extend(server_args(
                policy,
                shards,
                cap * block_footprint(block as u64),
            ));
            let settings =
                <kvcache_server::config::settings::Settings as clap::Parser>::try_parse_from(args)
                    .unwrap();
            let server = kvcache_server::server::RunningServer::start(&settings.resolve().unwrap())
                .await
                .unwrap();
            let addr = server.data_addr().to_string();
            let metrics = server.metrics_addr().unwrap().to_string();
            let deadline = Instant::now() + Duration::from_secs(60);
            let r = replay(&addr, Arc::clone(&chains), block, 1, deadline)
                .await
                .unwrap();
            let stats = tokio::task::spawn_blocking(move || server_stats(&metrics))
                .await
                .unwrap()
                .unwrap();
            server.shutdown().await;
            let mut m = StoreModel::new(policy, shards, cap);
            let sim = simulate(&chains, &mut m);
            assert!(r.complete);
            assert_eq!(r.totals, sim, "{policy:?}, {shards} shards");
            assert!(
                sim.hits > 0 && m.evictions() > 0,
                "the test exercises eviction"
            );
            assert_eq!(
                stats.blocks_stored, cap,
                "the pool holds exactly its blocks"
            );
            assert_eq!(stats.evictions, m.evictions());
            assert_eq!(stats.prefix_hit_blocks, r.totals.hits);
        }
    });
}
