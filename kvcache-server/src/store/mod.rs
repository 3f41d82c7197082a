//! The block store: a memory pool carved into pages, a sharded index of committed blocks, and
//! eviction. It implements the data plane's three steps independently of any transport:
//!
//! - put: [`Store::allocate`] -> write the bytes into [`Allocation::bytes_mut`] -> [`Allocation::commit`];
//! - get: [`Store::lease`] -> read through [`Lease::verified_chunk`] -> drop the lease (release).
//!
//! An allocation is invisible until committed and is freed if dropped uncommitted (a client
//! that dies mid-put leaves nothing behind). A leased block is never evicted or reused. Every
//! block is checksummed at commit, and its bytes can only be read through verification
//! ([`Lease::verified_chunk`], [`Lease::verified_bytes`]): a corrupt block is dropped and
//! reported, never returned.
//!
//! Files: `allocator.rs` (pages), `index.rs` (a shard of the key index), `eviction/` (policies),
//! `checksum.rs` (the per-chunk checksum layout).

pub mod allocator;
pub use kvcache_core::checksum;
pub mod eviction;
pub mod index;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use kvcache_core::BlockKey;
use kvcache_transport::{HostRegion, LockMode, MemoryRegion, RegionError, ShmRegion};
use parking_lot::Mutex;

use allocator::{PageAllocator, PageRun};
use eviction::PolicyKind;
use index::{LeaseOutcome, Location, Shard};

/// Shards compared per eviction. Reading a shard's next-victim stamp is one short lock, so all
/// of the default 64 shards are compared: eviction follows the global order of last use
/// exactly. A sample of 8 was not enough: when an allocation must evict many old blocks to find
/// a contiguous run, shards run out of old blocks unevenly, and a sample that saw only fresh
/// ones evicted a block written a moment before (seen in `kvcache-bench compare`).
const EVICTION_SAMPLE: usize = 64;

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

/// Where the pool lives.
enum Pool {
    Private(HostRegion),
    /// Mappable by same-node clients (see `crate::dataplane::unix`).
    Shared(ShmRegion),
}

impl Pool {
    fn region(&self) -> &dyn MemoryRegion {
        match self {
            Pool::Private(r) => r,
            Pool::Shared(r) => r,
        }
    }
}

/// The block store. Shared as `Arc<Store>`; every method is safe to call concurrently.
pub struct Store {
    /// Keeps the pool registered with a device driver (the GPU tier's `cuMemHostRegister`).
    /// Declared before `pool`, so it is dropped, and the registration undone, before the pool
    /// is unmapped.
    pool_pin: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
    pool: Pool,
    page_size: u64,
    allocator: Mutex<PageAllocator>,
    shards: Box<[Mutex<Shard>]>,
    evict_cursor: AtomicUsize,
    /// Logical clock: ticks on every commit and read; stamps blocks for eviction order.
    clock: AtomicU32,
    high_pages: u32,
    low_pages: u32,
    watermark_running: AtomicBool,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    checksum_failures: AtomicU64,
    /// The tier below memory (the disk), if attached.
    lower: std::sync::OnceLock<Arc<dyn LowerTier>>,
    /// Blocks brought up from the lower tier on a read.
    promotions: AtomicU64,
}

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

impl Store {
    /// Maps the pool and builds an empty index.
    pub fn new(cfg: &StoreConfig) -> Result<Arc<Self>, StoreError> {
        if !cfg.page_size.is_power_of_two() || cfg.page_size < 64 {
            return Err(StoreError::Config(format!(
                "page size {} must be a power of two ≥ 64",
                cfg.page_size
            )));
        }
        let pages = cfg.capacity / cfg.page_size;
        if pages == 0 {
            return Err(StoreError::Config(format!(
                "pool of {} bytes is smaller than one page ({} bytes)",
                cfg.capacity, cfg.page_size
            )));
        }
        let pages = u32::try_from(pages).map_err(|_| {
            StoreError::Config("pool too large for the page size: raise --page-size".into())
        })?;
        if !(0.0 < cfg.low_watermark
            && cfg.low_watermark <= cfg.high_watermark
            && cfg.high_watermark <= 1.0)
        {
            return Err(StoreError::Config(format!(
                "watermarks must satisfy 0 < low ({}) ≤ high ({}) ≤ 1",
                cfg.low_watermark, cfg.high_watermark
            )));
        }
        let len = pages as usize * cfg.page_size as usize;
        let region = if cfg.shared {
            Pool::Shared(ShmRegion::new("kvcache-pool", len, cfg.lock)?)
        } else {
            Pool::Private(HostRegion::new(len, cfg.lock)?)
        };
        let shards = cfg.shards.max(1).next_power_of_two();
        Ok(Arc::new(Self {
            pool: region,
            page_size: cfg.page_size,
            allocator: Mutex::new(PageAllocator::new(pages)),
            shards: (0..shards)
                .map(|_| Mutex::new(Shard::new(cfg.policy.build())))
                .collect(),
            evict_cursor: AtomicUsize::new(0),
            clock: AtomicU32::new(0),
            high_pages: (pages as f64 * cfg.high_watermark) as u32,
            low_pages: (pages as f64 * cfg.low_watermark) as u32,
            watermark_running: AtomicBool::new(false),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            checksum_failures: AtomicU64::new(0),
            lower: std::sync::OnceLock::new(),
            pool_pin: std::sync::OnceLock::new(),
            promotions: AtomicU64::new(0),
        }))
    }

    /// Pool bytes allocated to blocks (committed or being written).
    pub fn used_bytes(&self) -> u64 {
        self.allocator.lock().used() as u64 * self.page_size
    }

    /// Bytes in use at the low watermark, where eviction stops (and warming too).
    pub fn low_watermark_bytes(&self) -> u64 {
        self.low_pages as u64 * self.page_size
    }

    /// Pool size in bytes.
    pub fn capacity(&self) -> u64 {
        self.pool.region().len() as u64
    }

    /// The pool's memory (to register with an RDMA device).
    pub fn pool_region(&self) -> &dyn MemoryRegion {
        self.pool.region()
    }

    /// The pool's shared memory file, if the pool is shared.
    pub fn shared_pool(&self) -> Option<&ShmRegion> {
        match &self.pool {
            Pool::Shared(r) => Some(r),
            Pool::Private(_) => None,
        }
    }

    fn shard_of(&self, key: BlockKey) -> usize {
        // The top bits of the mixed key pick the shard; the shard's table hashes the low bits.
        (key.mixed64() >> 48) as usize & (self.shards.len() - 1)
    }

    fn pages_for(&self, len: usize) -> u32 {
        (checksum::stored_len(len) as u64).div_ceil(self.page_size) as u32
    }

    /// Pointer to the first byte of a run.
    fn run_ptr(&self, run: PageRun) -> *mut u8 {
        let off = run.start as usize * self.page_size as usize;
        debug_assert!(off + run.len as usize * self.page_size as usize <= self.pool.region().len());
        // SAFETY: runs come from the allocator, which only hands out pages inside the region.
        unsafe { self.pool.region().base().add(off) }
    }

    /// Whether `key` is committed.
    pub fn contains(&self, key: BlockKey) -> bool {
        self.shards[self.shard_of(key)].lock().contains(key)
    }

    /// The number of leading keys of `keys` held in memory or the lower tier.
    pub fn prefix_match(&self, keys: &[BlockKey]) -> usize {
        keys.iter().take_while(|k| self.holds(**k)).count()
    }

    /// Whether `key` is held in memory or in the lower tier.
    pub fn holds(&self, key: BlockKey) -> bool {
        self.contains(key) || self.lower().is_some_and(|t| t.len_of(key).is_some())
    }

    /// Puts `tier` under the pool. Once only; false if a tier was attached already.
    pub fn attach_lower(&self, tier: Arc<dyn LowerTier>) -> bool {
        self.lower.set(tier).is_ok()
    }

    /// Holds `pin` (a registration of the pool's memory with a driver) until the store is
    /// dropped, undoing it before the pool is unmapped. False if one is held already.
    pub fn pin_pool(&self, pin: Box<dyn std::any::Any + Send + Sync>) -> bool {
        self.pool_pin.set(pin).is_ok()
    }

    fn lower(&self) -> Option<&Arc<dyn LowerTier>> {
        self.lower.get()
    }

    /// On shutdown: hands every block in memory to the lower tier (which skips those it holds
    /// already), then has it write out its queue, so a restart finds them all.
    pub fn flush_lower(self: &Arc<Self>) {
        let Some(tier) = self.lower().cloned() else {
            return;
        };
        let (mut after, mut written) = (None, 0);
        loop {
            let (keys, more) = self.keys_after(after, 4096);
            after = keys.last().copied();
            for key in keys {
                if let Some(lease) = self.lease(key)
                    && let Ok(bytes) = lease.verified_bytes()
                {
                    tier.demote(key, bytes);
                    written += 1;
                }
            }
            if !more {
                break;
            }
        }
        tier.flush();
        tracing::info!(blocks = written, "memory written down to the tier below");
    }

    /// Whether a lower tier is attached (reads that miss memory may then do disk I/O).
    pub fn has_lower(&self) -> bool {
        self.lower().is_some()
    }

    /// A lease on `key`, bringing the block up from the lower tier if memory misses it. Does
    /// blocking I/O: call it off the async workers.
    pub fn lease_or_promote(self: &Arc<Self>, key: BlockKey) -> Option<Lease> {
        if let Some(lease) = self.lease(key) {
            return Some(lease);
        }
        let tier = self.lower()?;
        let len = tier.len_of(key)?;
        match self.allocate(key, len) {
            Ok(mut alloc) => {
                if !tier.read_into(key, alloc.bytes_mut()) {
                    return None; // dropped uncommitted: its pages go back
                }
                alloc.commit();
                self.promotions.fetch_add(1, Ordering::Relaxed);
            }
            Err(AllocError::AlreadyPresent) => {} // another reader brought it up
            Err(_) => return None,
        }
        self.lease(key)
    }

    /// Up to `limit` committed keys greater than `after`, ascending, and whether more remain.
    /// Costs one pass over the index per page (each shard locked in turn), so pages should be
    /// large; keys committed or evicted meanwhile may or may not appear.
    pub fn keys_after(&self, after: Option<BlockKey>, limit: usize) -> (Vec<BlockKey>, bool) {
        // The `limit + 1` smallest keys above `after`, kept in a max-heap.
        let mut page = std::collections::BinaryHeap::with_capacity(limit + 1);
        for shard in self.shards.iter() {
            let s = shard.lock();
            for key in s.keys().filter(|k| after.is_none_or(|a| *k > a)) {
                if page.len() <= limit {
                    page.push(key);
                } else if page.peek().is_some_and(|top| key < *top) {
                    page.pop();
                    page.push(key);
                }
            }
        }
        let mut keys = page.into_sorted_vec();
        let more = keys.len() > limit;
        keys.truncate(limit);
        (keys, more)
    }

    /// Step 1 of a put: reserves room for `len` bytes under `key`, evicting by policy if needed.
    pub fn allocate(self: &Arc<Self>, key: BlockKey, len: usize) -> Result<Allocation, AllocError> {
        if len == 0 {
            return Err(AllocError::Empty);
        }
        if len > u32::MAX as usize || checksum::stored_len(len) as u64 > self.capacity() {
            return Err(AllocError::TooLarge {
                len,
                capacity: self.capacity(),
            });
        }
        if self.contains(key) {
            return Err(AllocError::AlreadyPresent);
        }
        let pages = self.pages_for(len);
        loop {
            if let Some(run) = self.allocator.lock().alloc(pages) {
                return Ok(Allocation {
                    store: Arc::clone(self),
                    key,
                    run,
                    len,
                    sealed: 0,
                    committed: false,
                });
            }
            if !self.evict_one() {
                return Err(AllocError::PoolFull);
            }
        }
    }

    fn tick(&self) -> u32 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Evicts one unleased block; false if none could be evicted.
    ///
    /// Each shard orders its own blocks exactly; across shards, up to [`EVICTION_SAMPLE`]
    /// shards are compared and the one whose next victim was used longest ago gives it up.
    /// (Plain round robin over shards evicted blocks written a moment before whenever one
    /// shard had run out of old ones.) If that shard holds only leased blocks, every shard is
    /// tried in turn.
    fn evict_one(&self) -> bool {
        let n = self.shards.len();
        let start = self
            .evict_cursor
            .fetch_add(EVICTION_SAMPLE, Ordering::Relaxed);
        let now = self.clock.load(Ordering::Relaxed);
        let mut oldest: Option<(u32, usize)> = None;
        for i in 0..EVICTION_SAMPLE.min(n) {
            let shard = (start + i) % n;
            if let Some(stamp) = self.shards[shard].lock().next_victim_stamp() {
                let age = now.wrapping_sub(stamp);
                if oldest.is_none_or(|(a, _)| age > a) {
                    oldest = Some((age, shard));
                }
            }
        }
        let order = oldest
            .map(|(_, s)| s)
            .into_iter()
            .chain((0..n).map(|i| (start + i) % n));
        for shard in order {
            let victim = self.shards[shard].lock().evict_one();
            if let Some((key, loc)) = victim {
                if let Some(tier) = self.lower() {
                    self.demote(tier.as_ref(), key, loc);
                }
                self.allocator.lock().free(loc.run);
                self.evictions.fetch_add(1, Ordering::Relaxed);
                self.evicted_bytes
                    .fetch_add(loc.len as u64, Ordering::Relaxed);
                tracing::trace!(%key, bytes = loc.len, "evicted");
                return true;
            }
        }
        false
    }

    /// Hands an evicted block to the lower tier if it is intact (a block corrupted in memory
    /// must not be written down with a fresh checksum). Its pages are not free yet.
    fn demote(&self, tier: &dyn LowerTier, key: BlockKey, loc: Location) {
        let len = loc.len as usize;
        // SAFETY: the run was just taken from the index and is not leased (evict_one skips
        // leased blocks) nor freed yet, so nobody writes it meanwhile.
        let raw =
            unsafe { std::slice::from_raw_parts(self.run_ptr(loc.run), checksum::stored_len(len)) };
        let trailer = &raw[checksum::trailer_offset(len)..];
        let intact = checksum::trailer_checksum(trailer) == loc.checksum
            && (0..checksum::chunk_count(len)).all(|i| chunk_intact(raw, len, i));
        if intact {
            tier.demote(key, &raw[..len]);
        } else {
            self.checksum_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%key, "an evicted block failed verification; not written down to the tier below");
        }
    }

    /// Brings usage under the low watermark once it passes the high one. One thread at a time.
    fn enforce_watermarks(&self) {
        if self.allocator.lock().used() <= self.high_pages
            || self.watermark_running.swap(true, Ordering::Acquire)
        {
            return;
        }
        while self.allocator.lock().used() > self.low_pages && self.evict_one() {}
        self.watermark_running.store(false, Ordering::Release);
    }

    /// Step 1 of a get: leases `key`'s block, checking its checksum trailer against the index.
    /// The bytes themselves are verified as they are read, through the lease.
    pub fn lease(self: &Arc<Self>, key: BlockKey) -> Option<Lease> {
        let shard = self.shard_of(key);
        let now = self.tick();
        let (slot, location) = match self.shards[shard].lock().lease(key, now) {
            LeaseOutcome::Leased { slot, location } => (slot, location),
            LeaseOutcome::Missing | LeaseOutcome::Busy => return None,
        };
        let lease = Lease {
            store: Arc::clone(self),
            key,
            shard,
            slot,
            location,
        };
        if checksum::trailer_checksum(lease.trailer()) != location.checksum {
            lease.corrupt();
            return None;
        }
        Some(lease)
    }

    /// Drops a block that failed verification from the index (once) and counts it.
    fn report_corrupt(&self, key: BlockKey, shard: usize, slot: u32, len: u32) {
        if self.shards[shard].lock().doom(slot) {
            self.checksum_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%key, bytes = len, "stored block failed its checksum; dropped and reported as a miss");
        }
    }

    /// Test hook: flips the middle byte of a committed, unleased block's data, as memory
    /// corruption would.
    /// Returns false if the block is absent or leased.
    #[doc(hidden)]
    pub fn corrupt_block_for_test(&self, key: BlockKey) -> bool {
        let shard = self.shards[self.shard_of(key)].lock();
        let Some(loc) = shard.unleased_location(key) else {
            return false;
        };
        // SAFETY: the block is committed (nobody writes it) and unleased; holding the shard lock
        // keeps any reader from leasing it while we write, so no reference to it exists.
        unsafe {
            let p = self.run_ptr(loc.run).add(loc.len as usize / 2);
            p.write_volatile(p.read_volatile() ^ 0x5a);
        }
        true
    }

    /// Current usage and counters.
    pub fn stats(&self) -> StoreStats {
        let (mut blocks, mut leases, mut heap) = (0u64, 0u64, 0u64);
        for shard in self.shards.iter() {
            let s = shard.lock();
            blocks += s.len() as u64;
            leases += s.active_leases() as u64;
            heap += s.heap_bytes() as u64;
        }
        StoreStats {
            capacity_bytes: self.capacity(),
            used_bytes: self.used_bytes(),
            blocks,
            active_leases: leases,
            evictions: self.evictions.load(Ordering::Relaxed),
            evicted_bytes: self.evicted_bytes.load(Ordering::Relaxed),
            checksum_failures: self.checksum_failures.load(Ordering::Relaxed),
            promotions: self.promotions.load(Ordering::Relaxed),
            lower: self.lower().map(|t| t.stats()).unwrap_or_default(),
            index_heap_bytes: heap,
            locked: self.pool.region().is_locked(),
        }
    }
}

/// Room for one block being written. Invisible to readers until [`commit`](Self::commit);
/// dropping it uncommitted returns its pages.
pub struct Allocation {
    store: Arc<Store>,
    key: BlockKey,
    run: PageRun,
    len: usize,
    /// Chunks checksummed so far, in order.
    sealed: usize,
    committed: bool,
}

impl Allocation {
    /// Data bytes of the block.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: empty blocks cannot be allocated.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of checksum chunks; a transport may fill and [`seal`](Self::seal_chunk) them in order.
    pub fn chunk_count(&self) -> usize {
        checksum::chunk_count(self.len)
    }

    fn raw(&mut self) -> &mut [u8] {
        // SAFETY: the allocator gave this run to this allocation alone and nobody can lease it
        // before commit, so this is the only reference to these bytes; `&mut self` keeps it unique.
        // The run holds `stored_len(len)` bytes (see `pages_for`).
        unsafe {
            std::slice::from_raw_parts_mut(
                self.store.run_ptr(self.run),
                checksum::stored_len(self.len),
            )
        }
    }

    /// The block's data bytes, to be filled by the transfer step.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.raw()[..len]
    }

    /// Chunk `i` of the data, for transports that fill a block chunk by chunk.
    pub fn chunk_mut(&mut self, i: usize) -> &mut [u8] {
        let range = checksum::chunk_range(self.len, i);
        &mut self.raw()[range]
    }

    /// Checksums chunk `i` now, while the bytes just written are in cache. Chunks must be
    /// sealed in order; any left unsealed are checksummed at commit.
    pub fn seal_chunk(&mut self, i: usize) {
        if i != self.sealed {
            return;
        }
        let (len, range) = (self.len, checksum::chunk_range(self.len, i));
        let (data, trailer) = self.raw().split_at_mut(checksum::trailer_offset(len));
        checksum::record(trailer, i, checksum::chunk_checksum(&data[range]));
        self.sealed += 1;
    }

    /// Copies `src` into chunk `i` and seals it in the same pass over the bytes
    /// ([`chunk_hash::copy_and_hash`](kvcache_core::chunk_hash::copy_and_hash)): the checksum
    /// covers exactly what was stored, even if `src` changes meanwhile. Chunks must be filled
    /// in order; one filled out of order is sealed at commit.
    pub fn fill_chunk(&mut self, i: usize, src: &[u8]) {
        let (len, range) = (self.len, checksum::chunk_range(self.len, i));
        assert_eq!(
            src.len(),
            range.len(),
            "chunk {i} has {} bytes",
            range.len()
        );
        let in_order = i == self.sealed;
        let (data, trailer) = self.raw().split_at_mut(checksum::trailer_offset(len));
        if !in_order {
            data[range].copy_from_slice(src);
            return;
        }
        let sum = kvcache_core::chunk_hash::copy_and_hash(src, &mut data[range]);
        checksum::record(trailer, i, sum);
        self.sealed += 1;
    }

    /// Step 3 of a put: finishes the checksums and makes the block visible atomically.
    pub fn commit(mut self) -> CommitOutcome {
        for i in self.sealed..self.chunk_count() {
            self.seal_chunk(i);
        }
        let len = self.len;
        let checksum = checksum::trailer_checksum(&self.raw()[checksum::trailer_offset(len)..]);
        let location = Location {
            run: self.run,
            len: self.len as u32,
            checksum,
        };
        let store = Arc::clone(&self.store);
        let now = store.tick();
        let stored = store.shards[store.shard_of(self.key)]
            .lock()
            .insert(self.key, location, now);
        if !stored {
            return CommitOutcome::AlreadyPresent; // Drop frees the pages.
        }
        self.committed = true;
        drop(self);
        store.enforce_watermarks();
        CommitOutcome::Stored
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if !self.committed {
            self.store.allocator.lock().free(self.run);
        }
    }
}

/// A read lease on a committed block: its bytes stay put until the lease is dropped (release).
/// The bytes are reachable only through verification.
pub struct Lease {
    store: Arc<Store>,
    key: BlockKey,
    shard: usize,
    slot: u32,
    location: Location,
}

/// A block failed verification; it has been dropped from the index and must be treated as a miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stored block failed its checksum")]
pub struct Corrupt;

impl Lease {
    fn raw(&self) -> &[u8] {
        // SAFETY: committed blocks are immutable, and the lease keeps the pages from being
        // evicted, freed or reused until it is dropped, which outlives this borrow.
        unsafe {
            std::slice::from_raw_parts(
                self.store.run_ptr(self.location.run),
                checksum::stored_len(self.location.len as usize),
            )
        }
    }

    fn trailer(&self) -> &[u8] {
        &self.raw()[checksum::trailer_offset(self.len())..]
    }

    fn corrupt(&self) -> Corrupt {
        self.store
            .report_corrupt(self.key, self.shard, self.slot, self.location.len);
        Corrupt
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.location.len as usize
    }

    /// Where the block starts in the pool, for a peer that maps the shared pool; it reads the
    /// bytes and checks them itself against [`trailer_checksum`](Self::trailer_checksum).
    pub fn pool_offset(&self) -> u64 {
        self.location.run.start as u64 * self.store.page_size
    }

    /// The checksum of the block's trailer, as the index records it.
    pub fn trailer_checksum(&self) -> u64 {
        self.location.checksum
    }

    /// Never true: empty blocks are not stored.
    pub fn is_empty(&self) -> bool {
        self.location.len == 0
    }

    /// Number of checksum chunks.
    pub fn chunk_count(&self) -> usize {
        checksum::chunk_count(self.len())
    }

    /// Chunk `i`, verified just now. On a mismatch the block is dropped from the index.
    pub fn verified_chunk(&self, i: usize) -> Result<&[u8], Corrupt> {
        if !chunk_intact(self.raw(), self.len(), i) {
            return Err(self.corrupt());
        }
        Ok(&self.raw()[checksum::chunk_range(self.len(), i)])
    }

    /// The whole block, every chunk verified.
    pub fn verified_bytes(&self) -> Result<&[u8], Corrupt> {
        for i in 0..self.chunk_count() {
            self.verified_chunk(i)?;
        }
        Ok(&self.raw()[..self.len()])
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let freed = self.store.shards[self.shard].lock().release(self.slot);
        if let Some(run) = freed {
            self.store.allocator.lock().free(run);
        }
    }
}

/// Whether chunk `i` of a stored block (`raw`: its data then its trailer) matches the checksum
/// its trailer records.
fn chunk_intact(raw: &[u8], len: usize, i: usize) -> bool {
    let trailer = &raw[checksum::trailer_offset(len)..];
    checksum::chunk_checksum(&raw[checksum::chunk_range(len, i)]) == checksum::recorded(trailer, i)
}

#[cfg(test)]
mod tests;
