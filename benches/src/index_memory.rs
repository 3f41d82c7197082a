//! `kvcache-bench index-memory`: heap bytes per indexed block, measured with a counting global
//! allocator around the server's real index shards.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use kvcache_core::BlockKey;
use kvcache_store::allocator::PageRun;
use kvcache_store::eviction::PolicyKind;
use kvcache_store::index::{Location, Shard};

/// Counts live heap bytes.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: p was allocated by System with layout l.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: p was allocated by System with layout l.
        unsafe { System.realloc(p, l, new) }
    }
}

/// Live heap bytes right now.
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Bytes per block after indexing `blocks` random keys over `shards` shards.
pub fn measure(blocks: usize, shards: usize, policy: PolicyKind) -> (f64, f64) {
    let before = live();
    let mut index: Vec<Shard> = (0..shards).map(|_| Shard::new(policy.build())).collect();
    for i in 0..blocks {
        let key = BlockKey(xxhash_key(i as u64));
        let shard = (key.mixed64() >> 48) as usize % shards;
        let loc = Location {
            run: PageRun {
                start: i as u32,
                len: 1,
            },
            len: 4096,
            checksum: i as u64,
        };
        index[shard].insert(key, loc, i as u32);
    }
    let measured = (live() - before) as f64 / blocks as f64;
    let reported = index.iter().map(|s| s.heap_bytes()).sum::<usize>() as f64 / blocks as f64;
    drop(index);
    (measured, reported)
}

fn xxhash_key(i: u64) -> u128 {
    // Any well-mixed 128-bit value will do; splitmix64 twice.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    };
    ((mix(i.wrapping_add(0x9e3779b97f4a7c15)) as u128) << 64) | mix(i ^ 0x5555) as u128
}
