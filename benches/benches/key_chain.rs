//! Cost of keying a prompt: the prefix chain over 1k and 32k tokens, and the node's tenant fold
//! (under `--auth`) of a 64-key request.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvcache_core::tenant::TenantFold;
use kvcache_core::{Namespace, chain_keys};

fn bench(c: &mut Criterion) {
    let ns = Namespace::new("llama-3-8b@main", "bfloat16", 16).id();
    let mut g = c.benchmark_group("chain_keys");
    for tokens in [1024usize, 32 * 1024] {
        let t: Vec<u32> = (0..tokens as u32)
            .map(|i| i.wrapping_mul(2654435761) % 128_000)
            .collect();
        g.throughput(Throughput::Elements(tokens as u64));
        g.bench_function(format!("{tokens}_tokens_block16"), |b| {
            b.iter(|| chain_keys(&ns, &t, 16))
        });
    }
    g.finish();
    let keys = chain_keys(&ns, &vec![7u32; 64 * 16], 16);
    let fold = TenantFold::new("team-a");
    let mut g = c.benchmark_group("tenant_fold");
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("64_keys", |b| {
        b.iter(|| keys.iter().map(|&k| fold.fold(k)).collect::<Vec<_>>())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
