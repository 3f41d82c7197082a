//! The tiers under the memory pool: the seam ([`LowerTier`]) and its two implementations, the
//! GPU tier (`gpu`, feature `cuda`) and the disk tier (`disk`, feature `disk`; RocksDB for the
//! index). Nothing outside `disk.rs` knows RocksDB exists; nothing outside `gpu.rs` and the
//! transport's `cuda` module knows CUDA.

#[cfg(feature = "disk")]
pub mod disk;
#[cfg(feature = "cuda")]
pub mod gpu;

use kvcache_core::BlockKey;

/// A slower tier under the pool. Blocks evicted from memory go down to it (verified first), and
/// a read that misses memory brings them back up. The tier checks what it returns: a block it
/// cannot vouch for is a miss.
pub trait LowerTier: Send + Sync + 'static {
    /// Takes a copy of a verified block leaving memory. May block briefly when the tier is
    /// behind (back-pressure on the writes that evict), or skip the block.
    fn demote(&self, key: BlockKey, bytes: &[u8]);
    /// The stored length of `key`, if the tier holds it.
    fn len_of(&self, key: BlockKey) -> Option<usize>;
    /// Reads `key` into `dst` (exactly its length) and verifies it; false for a miss or a block
    /// that failed verification (which the tier then forgets).
    fn read_into(&self, key: BlockKey, dst: &mut [u8]) -> bool;
    /// Writes out what is queued; later demotions are dropped. Called on shutdown.
    fn flush(&self);
    /// Usage and counters, for metrics: this tier's, then those of the tiers under it.
    fn stats(&self) -> Vec<TierStats>;
}

/// The checksum a lower tier keeps for a block: xxh3 of its bytes, seeded with its key, so a
/// block read back under another key fails too.
pub fn tier_checksum(key: BlockKey, bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, key.low64())
}

/// What a lower tier holds and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// `gpu` or `disk`: names the tier's metrics.
    pub name: &'static str,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blocks: u64,
    /// Blocks written down after eviction from memory.
    pub demoted_blocks: u64,
    pub demoted_bytes: u64,
    /// Blocks too large for the tier, not written.
    pub skipped_blocks: u64,
    /// Blocks read back up (hits in this tier).
    pub read_blocks: u64,
    /// Blocks that failed verification when read; dropped.
    pub corrupt_blocks: u64,
    /// Whole segments dropped to stay within capacity.
    pub dropped_segments: u64,
    /// Failed reads or writes of the tier's files or index.
    pub errors: u64,
}
