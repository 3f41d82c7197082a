//! How a store is built, what its operations can answer, and what it reports.

use kvcache_transport::{LockMode, RegionError};

use crate::eviction::PolicyKind;
use crate::tier::TierStats;

/// How to build a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Pool size in bytes.
    pub capacity: u64,
    /// Allocation granularity in bytes (a power of two).
    pub page_size: u64,
    /// Index shards (rounded up to a power of two).
    pub shards: usize,
    pub policy: PolicyKind,
    /// Above this fraction of the pool in use, eviction runs after a commit...
    pub high_watermark: f64,
    /// ...until usage is back under this fraction.
    pub low_watermark: f64,
    pub lock: LockMode,
    /// Place the pool in shared memory (a memfd) that same-node clients can map.
    pub shared: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 30,
            page_size: 4096,
            shards: 64,
            policy: PolicyKind::Lru,
            high_watermark: 0.95,
            low_watermark: 0.90,
            lock: LockMode::BestEffort,
            shared: false,
        }
    }
}

/// Why a store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// Why a block could not be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("the key is already stored")]
    AlreadyPresent,
    #[error("block of {len} bytes is larger than the whole pool ({capacity} bytes)")]
    TooLarge { len: usize, capacity: u64 },
    #[error("pool full: every remaining block is leased")]
    PoolFull,
    #[error("empty blocks are not stored")]
    Empty,
}

/// What a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Stored,
    /// Another writer committed the same key first; blocks are immutable so this is a no-op.
    AlreadyPresent,
}

/// A point-in-time view of the store, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub blocks: u64,
    pub active_leases: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub checksum_failures: u64,
    /// Blocks brought up from the lower tier.
    pub promotions: u64,
    /// The lower tiers', top down (GPU, disk); empty if none is attached.
    pub lower: Vec<TierStats>,
    pub index_heap_bytes: u64,
    pub locked: bool,
}
