//! Page allocator: alloc+free of a 1 MiB block (256 pages) on a fragmented 4 GiB pool.

use criterion::{Criterion, criterion_group, criterion_main};
use kvcache_store::allocator::PageAllocator;

fn bench(c: &mut Criterion) {
    let mut a = PageAllocator::new(1 << 20);
    // Fragment: allocate everything in mixed sizes, free every other run.
    let mut runs = Vec::new();
    let mut i = 0u32;
    while let Some(r) = a.alloc(64 + (i % 7) * 64) {
        runs.push(r);
        i += 1;
    }
    for r in runs.iter().step_by(2) {
        a.free(*r);
    }
    c.bench_function("alloc_free_256_pages_fragmented", |b| {
        b.iter(|| {
            let r = a.alloc(256).or_else(|| a.alloc(64)).expect("space");
            a.free(r);
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
