//! Cost of keying a prompt: the prefix chain over 1k and 32k tokens.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
