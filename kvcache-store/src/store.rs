//! The store itself: the pool, the sharded index over it, eviction by policy between the
//! watermarks, and the tier below. Writing a block ([`crate::allocation`]) and reading one
//! ([`crate::lease`]) are implemented beside their handles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use kvcache_core::BlockKey;
use kvcache_core::checksum;
use kvcache_transport::{HostRegion, MemoryRegion, ShmRegion};
use parking_lot::Mutex;

use crate::allocator::{PageAllocator, PageRun};
use crate::config::{StoreConfig, StoreError, StoreStats};
use crate::index::{Location, Shard};
use crate::tier::LowerTier;

/// Shards compared per eviction. Reading a shard's next-victim stamp is one short lock, so all
/// of the default 64 shards are compared: eviction follows the global order of last use
/// exactly. A sample of 8 was not enough: when an allocation must evict many old blocks to find
/// a contiguous run, shards run out of old blocks unevenly, and a sample that saw only fresh
/// ones evicted a block written a moment before (seen in `kvcache-bench compare`).
const EVICTION_SAMPLE: usize = 64;

/// Where the pool lives.
pub(crate) enum Pool {
    Private(HostRegion),
    /// Mappable by same-node clients (the server's shared-memory socket hands it out).
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
    pub(crate) pool_pin: std::sync::OnceLock<Box<dyn std::any::Any + Send + Sync>>,
    pub(crate) pool: Pool,
    pub(crate) page_size: u64,
    pub(crate) allocator: Mutex<PageAllocator>,
    pub(crate) shards: Box<[Mutex<Shard>]>,
    pub(crate) evict_cursor: AtomicUsize,
    /// Logical clock: ticks on every commit and read; stamps blocks for eviction order.
    pub(crate) clock: AtomicU32,
    pub(crate) high_pages: u32,
    pub(crate) low_pages: u32,
    pub(crate) watermark_running: AtomicBool,
    pub(crate) evictions: AtomicU64,
    pub(crate) evicted_bytes: AtomicU64,
    pub(crate) checksum_failures: AtomicU64,
    /// The tier below memory (the disk), if attached.
    pub(crate) lower: std::sync::OnceLock<Arc<dyn LowerTier>>,
    /// Blocks brought up from the lower tier on a read.
    pub(crate) promotions: AtomicU64,
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

    pub(crate) fn shard_of(&self, key: BlockKey) -> usize {
        // The top bits of the mixed key pick the shard; the shard's table hashes the low bits.
        (key.mixed64() >> 48) as usize & (self.shards.len() - 1)
    }

    pub(crate) fn pages_for(&self, len: usize) -> u32 {
        (checksum::stored_len(len) as u64).div_ceil(self.page_size) as u32
    }

    /// Pointer to the first byte of a run.
    pub(crate) fn run_ptr(&self, run: PageRun) -> *mut u8 {
        let off = run.start as usize * self.page_size as usize;
        debug_assert!(off + run.len as usize * self.page_size as usize <= self.pool.region().len());
        // SAFETY: runs come from the allocator, which only hands out pages inside the region.
        unsafe { self.pool.region().base().add(off) }
    }

    /// Whether `key` is committed.
    #[inline]
    pub fn contains(&self, key: BlockKey) -> bool {
        self.shards[self.shard_of(key)].lock().contains(key)
    }

    /// The number of leading keys of `keys` held in memory or the lower tier.
    pub fn prefix_match(&self, keys: &[BlockKey]) -> usize {
        keys.iter().take_while(|k| self.holds(**k)).count()
    }

    /// Whether `key` is held in memory or in the lower tier.
    #[inline]
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

    pub(crate) fn lower(&self) -> Option<&Arc<dyn LowerTier>> {
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

    pub(crate) fn tick(&self) -> u32 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Evicts one unleased block; false if none could be evicted.
    ///
    /// Each shard orders its own blocks exactly; across shards, up to [`EVICTION_SAMPLE`]
    /// shards are compared and the one whose next victim was used longest ago gives it up.
    /// (Plain round robin over shards evicted blocks written a moment before whenever one
    /// shard had run out of old ones.) If that shard holds only leased blocks, every shard is
    /// tried in turn.
    pub(crate) fn evict_one(&self) -> bool {
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
    pub(crate) fn enforce_watermarks(&self) {
        if self.allocator.lock().used() <= self.high_pages
            || self.watermark_running.swap(true, Ordering::Acquire)
        {
            return;
        }
        while self.allocator.lock().used() > self.low_pages && self.evict_one() {}
        self.watermark_running.store(false, Ordering::Release);
    }

    /// Drops a block that failed verification from the index (once) and counts it.
    pub(crate) fn report_corrupt(&self, key: BlockKey, shard: usize, slot: u32, len: u32) {
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

/// Whether chunk `i` of a stored block (`raw`: its data then its trailer) matches the checksum
/// its trailer records.
pub(crate) fn chunk_intact(raw: &[u8], len: usize, i: usize) -> bool {
    let trailer = &raw[checksum::trailer_offset(len)..];
    checksum::chunk_checksum(&raw[checksum::chunk_range(len, i)]) == checksum::recorded(trailer, i)
}
