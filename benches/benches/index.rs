//! Index shard operations: insert, lease+release (a hit), and a miss.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kvcache_core::BlockKey;
use kvcache_store::allocator::PageRun;
use kvcache_store::eviction::PolicyKind;
use kvcache_store::index::{LeaseOutcome, Location, Shard};

fn key(i: u64) -> BlockKey {
    BlockKey((i as u128).wrapping_mul(0x9e3779b97f4a7c15_f39cc0605cedc835))
}

fn filled(n: u64, policy: PolicyKind) -> Shard {
    let mut s = Shard::new(policy.build());
    for i in 0..n {
        s.insert(
            key(i),
            Location {
                run: PageRun {
                    start: i as u32,
                    len: 1,
                },
                len: 4096,
                checksum: i,
            },
            i as u32,
        );
    }
    s
}

fn bench(c: &mut Criterion) {
    for policy in [PolicyKind::Lru, PolicyKind::S3fifo] {
        let mut g = c.benchmark_group(format!("index_{policy:?}"));
        g.bench_function("insert_10k", |b| {
            b.iter_batched(|| (), |_| filled(10_000, policy), BatchSize::SmallInput)
        });
        let mut s = filled(100_000, policy);
        let mut i = 0u64;
        g.bench_function("lease_release_hit", |b| {
            b.iter(|| {
                i = (i + 7919) % 100_000;
                if let LeaseOutcome::Leased { slot, .. } = s.lease(key(i), i as u32) {
                    s.release(slot);
                }
            })
        });
        g.bench_function("lookup_miss", |b| b.iter(|| s.contains(key(1 << 40))));
        g.bench_function("evict_one_and_reinsert", |b| {
            b.iter(|| {
                let (k, loc) = s.evict_one().expect("non-empty");
                s.insert(k, loc, 0);
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
