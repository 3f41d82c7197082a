//! The store simulated on a replay's sequence: [`StoreModel`] (the store's own index shards and
//! policies) and [`TextbookLru`] (an independent LRU), both behind [`CacheModel`].

use std::collections::{BTreeMap, HashMap};

use kvcache_core::BlockKey;
use kvcache_store::allocator::PageRun;
use kvcache_store::eviction::PolicyKind;
use kvcache_store::index::{LeaseOutcome, Location, Shard};

/// Shards `Store::evict_one` compares per eviction (kvcache-store's private
/// `EVICTION_SAMPLE`); the model must use the same number.
const STORE_EVICTION_SAMPLE: usize = 64;

/// What one request did to a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Leading blocks found (the prefix match).
    pub hits: u64,
    /// Blocks after the prefix stored anew.
    pub stored: u64,
    /// Blocks after the prefix that were held already (a put answered "already present").
    pub present: u64,
}

/// A cache a replay is simulated on, driven by the operations the server performs.
pub trait CacheModel {
    /// The number of leading keys held (reads nothing, as the server's `prefix_match`).
    fn prefix_match(&self, keys: &[BlockKey]) -> usize;

    /// A get of one block the prefix matched.
    fn read(&mut self, key: BlockKey);

    /// A put of one block: true if stored, false if it was held already.
    fn write(&mut self, key: BlockKey) -> bool;

    /// One replayed request: the lookup, a read of each matched block, a put of each other.
    fn request(&mut self, keys: &[BlockKey]) -> Outcome {
        let hits = self.prefix_match(keys);
        for &k in &keys[..hits] {
            self.read(k);
        }
        let mut out = Outcome {
            hits: hits as u64,
            ..Outcome::default()
        };
        for &k in &keys[hits..] {
            if self.write(k) {
                out.stored += 1;
            } else {
                out.present += 1;
            }
        }
        out
    }
}

/// The store as the server runs it, without the pool or the network: the store's own index
/// shards and policies, sharding and cross-shard victim choice, and one logical clock that
/// ticks where the store's does (every read and every commit).
pub struct StoreModel {
    shards: Vec<Shard>,
    capacity: u64,
    blocks: u64,
    clock: u32,
    cursor: usize,
    evictions: u64,
}

impl StoreModel {
    /// An empty store of `capacity` blocks over `shards` index shards (rounded up to a power of
    /// two, as the store does).
    pub fn new(policy: PolicyKind, shards: usize, capacity: u64) -> Self {
        let n = shards.max(1).next_power_of_two();
        Self {
            shards: (0..n).map(|_| Shard::new(policy.build())).collect(),
            capacity,
            blocks: 0,
            clock: 0,
            cursor: 0,
            evictions: 0,
        }
    }

    /// Blocks held.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    fn shard_of(&self, key: BlockKey) -> usize {
        (key.mixed64() >> 48) as usize & (self.shards.len() - 1)
    }

    fn tick(&mut self) -> u32 {
        let now = self.clock;
        self.clock = self.clock.wrapping_add(1);
        now
    }

    /// `Store::evict_one`: the sampled shard whose next victim is oldest gives one up, else
    /// the first shard in turn that can.
    fn evict_one(&mut self) -> bool {
        let n = self.shards.len();
        let start = self.cursor;
        self.cursor = self.cursor.wrapping_add(STORE_EVICTION_SAMPLE);
        let now = self.clock;
        let mut oldest: Option<(u32, usize)> = None;
        for i in 0..STORE_EVICTION_SAMPLE.min(n) {
            let shard = (start + i) % n;
            if let Some(stamp) = self.shards[shard].next_victim_stamp() {
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
            if self.shards[shard].evict_one().is_some() {
                self.blocks -= 1;
                self.evictions += 1;
                return true;
            }
        }
        false
    }
}

impl CacheModel for StoreModel {
    fn prefix_match(&self, keys: &[BlockKey]) -> usize {
        keys.iter()
            .take_while(|&&k| self.shards[self.shard_of(k)].contains(k))
            .count()
    }

    /// A lease taken and released (the clock ticks even on a miss).
    fn read(&mut self, key: BlockKey) {
        let now = self.tick();
        let shard = self.shard_of(key);
        if let LeaseOutcome::Leased { slot, .. } = self.shards[shard].lease(key, now) {
            self.shards[shard].release(slot);
        }
    }

    /// Nothing if held, else one eviction if full, then the commit.
    fn write(&mut self, key: BlockKey) -> bool {
        let shard = self.shard_of(key);
        if self.shards[shard].contains(key) {
            return false;
        }
        if self.blocks >= self.capacity && !self.evict_one() {
            return false;
        }
        let now = self.tick();
        let location = Location {
            run: PageRun { start: 0, len: 1 },
            len: 1,
            checksum: 0,
        };
        if self.shards[shard].insert(key, location, now) {
            self.blocks += 1;
        }
        true
    }
}

/// A least-recently-used cache of `capacity` blocks written from its definition, independent
/// of the store's code: the check on its LRU.
pub struct TextbookLru {
    capacity: u64,
    last_use: HashMap<BlockKey, u64>,
    by_age: BTreeMap<u64, BlockKey>,
    now: u64,
}

impl TextbookLru {
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            last_use: HashMap::new(),
            by_age: BTreeMap::new(),
            now: 0,
        }
    }

    fn use_now(&mut self, key: BlockKey) {
        self.now += 1;
        if let Some(old) = self.last_use.insert(key, self.now) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.now, key);
    }
}

impl CacheModel for TextbookLru {
    fn prefix_match(&self, keys: &[BlockKey]) -> usize {
        keys.iter()
            .take_while(|k| self.last_use.contains_key(k))
            .count()
    }

    fn read(&mut self, key: BlockKey) {
        self.use_now(key);
    }

    /// The least recently used block makes room when full.
    fn write(&mut self, key: BlockKey) -> bool {
        if self.last_use.contains_key(&key) {
            return false;
        }
        if self.last_use.len() as u64 >= self.capacity
            && let Some((_, victim)) = self.by_age.pop_first()
        {
            self.last_use.remove(&victim);
        }
        self.use_now(key);
        true
    }
}

/// Totals of a replay, by whoever replayed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    pub blocks: u64,
    pub hits: u64,
    pub stored: u64,
    pub present: u64,
}

impl Totals {
    /// Counts one request of `keys` blocks that did `o`.
    pub(super) fn add(&mut self, keys: usize, o: Outcome) {
        self.requests += 1;
        self.blocks += keys as u64;
        self.hits += o.hits;
        self.stored += o.stored;
        self.present += o.present;
    }

    /// Blocks found by the prefix match over blocks requested.
    pub(super) fn hit_rate(&self) -> f64 {
        self.hits as f64 / self.blocks.max(1) as f64
    }
}

/// Replays `chains` through a model (a [`StoreModel`] or a [`TextbookLru`]).
pub(super) fn simulate(chains: &[Vec<BlockKey>], model: &mut impl CacheModel) -> Totals {
    let mut t = Totals::default();
    for keys in chains {
        t.add(keys.len(), model.request(keys));
    }
    t
}
