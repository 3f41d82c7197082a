//! Deterministic bytes for tests and benchmarks: a seed names a block's whole content, so any
//! reader can check what it got without keeping a copy.

/// `len` bytes from an xorshift generator seeded with `seed` (0 and 1 give the same bytes).
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
