//! One shard of the block index: key -> slot, slot -> location, lease count and policy state.
//!
//! Entries live in a slab (`slots`) addressed by a `u32` slot id; the hash table stores only slot
//! ids and finds keys through the slab. That keeps an indexed block at about 65 bytes (a 40-byte
//! slot, a 4-byte table entry plus control byte and load-factor slack, and the policy's links);
//! `kvcache-bench index-memory` measures it.

use hashbrown::HashTable;
use kvcache_core::BlockKey;

use super::allocator::PageRun;
use super::eviction::EvictionPolicy;

/// Marks a slot whose block was removed from the table while leased; freed at the last release.
const DOOMED: u8 = 1;

/// A committed block's place in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub run: PageRun,
    pub len: u32,
    pub checksum: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    key_hi: u64,
    key_lo: u64,
    checksum: u64,
    page: u32,
    pages: u32,
    len: u32,
    leases: u16,
    flags: u8,
}

impl Slot {
    fn key(&self) -> BlockKey {
        BlockKey(((self.key_hi as u128) << 64) | self.key_lo as u128)
    }

    fn location(&self) -> Location {
        Location {
            run: PageRun {
                start: self.page,
                len: self.pages,
            },
            len: self.len,
            checksum: self.checksum,
        }
    }
}

/// What a lease attempt found.
pub enum LeaseOutcome {
    Leased {
        slot: u32,
        location: Location,
    },
    Missing,
    /// The lease count is saturated; treat as a miss rather than overflow.
    Busy,
}

/// An index shard. All methods run under the shard's lock.
pub struct Shard {
    table: HashTable<u32>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    policy: Box<dyn EvictionPolicy>,
    leases: usize,
}

fn hash(key: BlockKey) -> u64 {
    key.mixed64()
}

impl Shard {
    pub fn new(policy: Box<dyn EvictionPolicy>) -> Self {
        Self {
            table: HashTable::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            policy,
            leases: 0,
        }
    }

    fn find(&self, key: BlockKey) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash(key), |&s| slots[s as usize].key() == key)
            .copied()
    }

    /// Committed blocks in this shard.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the shard holds no committed block.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Leases currently held on this shard's blocks.
    pub fn active_leases(&self) -> usize {
        self.leases
    }

    pub fn contains(&self, key: BlockKey) -> bool {
        self.find(key).is_some()
    }

    /// Every committed key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = BlockKey> + '_ {
        self.table.iter().map(|&s| self.slots[s as usize].key())
    }

    /// Makes a block visible, stamped `now`. Returns false (and changes nothing) if the key is
    /// already present.
    pub fn insert(&mut self, key: BlockKey, location: Location, now: u32) -> bool {
        if self.contains(key) {
            return false;
        }
        let slot = Slot {
            key_hi: (key.0 >> 64) as u64,
            key_lo: key.0 as u64,
            checksum: location.checksum,
            page: location.run.start,
            pages: location.run.len,
            len: location.len,
            leases: 0,
            flags: 0,
        };
        let id = match self.free_slots.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.table
            .insert_unique(hash(key), id, |&s| hash(slots[s as usize].key()));
        self.policy.insert(id, key, now);
        true
    }

    /// Takes a lease on `key`'s block (a read at `now`): it cannot be evicted or freed until
    /// released.
    pub fn lease(&mut self, key: BlockKey, now: u32) -> LeaseOutcome {
        let Some(id) = self.find(key) else {
            return LeaseOutcome::Missing;
        };
        let slot = &mut self.slots[id as usize];
        if slot.leases == u16::MAX {
            return LeaseOutcome::Busy;
        }
        slot.leases += 1;
        self.leases += 1;
        let location = slot.location();
        self.policy.touch(id, now);
        LeaseOutcome::Leased { slot: id, location }
    }

    /// Ends a lease. Returns the pages to free if this was the last lease of a doomed block.
    pub fn release(&mut self, id: u32) -> Option<PageRun> {
        let slot = &mut self.slots[id as usize];
        debug_assert!(slot.leases > 0, "release without lease");
        slot.leases -= 1;
        self.leases -= 1;
        if slot.leases == 0 && slot.flags & DOOMED != 0 {
            let run = slot.location().run;
            self.free_slots.push(id);
            return Some(run);
        }
        None
    }

    /// Removes a leased block from view (e.g. it failed its checksum). Its pages are freed when
    /// the last lease is released. Returns false if it was already removed.
    pub fn doom(&mut self, id: u32) -> bool {
        let key = self.slots[id as usize].key();
        let Ok(entry) = self.table.find_entry(hash(key), |&s| s == id) else {
            return false;
        };
        entry.remove();
        self.policy.remove(id);
        self.slots[id as usize].flags |= DOOMED;
        true
    }

    /// Stamp of the block this shard would evict next.
    pub fn next_victim_stamp(&self) -> Option<u32> {
        self.policy.next_victim_stamp()
    }

    /// Evicts one unleased block chosen by the policy; returns its key and location.
    pub fn evict_one(&mut self) -> Option<(BlockKey, Location)> {
        let slots = &self.slots;
        let id = self
            .policy
            .pop_victim(&mut |s| slots[s as usize].leases == 0)?;
        let slot = self.slots[id as usize];
        let key = slot.key();
        let entry = self
            .table
            .find_entry(hash(key), |&s| s == id)
            .expect("policy and table agree");
        entry.remove();
        self.free_slots.push(id);
        Some((key, slot.location()))
    }

    /// Looks up a committed, unleased block for a test hook that must not race readers.
    pub fn unleased_location(&self, key: BlockKey) -> Option<Location> {
        let id = self.find(key)?;
        let slot = &self.slots[id as usize];
        (slot.leases == 0).then(|| slot.location())
    }

    /// Heap bytes held by this shard's index structures.
    pub fn heap_bytes(&self) -> usize {
        self.table.allocation_size()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.free_slots.capacity() * 4
            + self.policy.heap_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eviction::PolicyKind;

    fn loc(start: u32) -> Location {
        Location {
            run: PageRun { start, len: 1 },
            len: 10,
            checksum: start as u64,
        }
    }

    #[test]
    fn slot_is_forty_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
    }

    #[test]
    fn insert_is_idempotent_per_key() {
        let mut s = Shard::new(PolicyKind::Lru.build());
        assert!(s.insert(BlockKey(1), loc(0), 0));
        assert!(!s.insert(BlockKey(1), loc(5), 1));
        assert_eq!(s.len(), 1);
        match s.lease(BlockKey(1), 2) {
            LeaseOutcome::Leased { location, .. } => assert_eq!(location, loc(0)),
            _ => panic!("expected a lease"),
        }
    }

    #[test]
    fn leased_blocks_are_never_evicted() {
        let mut s = Shard::new(PolicyKind::Lru.build());
        s.insert(BlockKey(1), loc(0), 0);
        s.insert(BlockKey(2), loc(1), 1);
        let LeaseOutcome::Leased { slot, .. } = s.lease(BlockKey(1), 2) else {
            panic!()
        };
        assert_eq!(s.evict_one().map(|(k, _)| k), Some(BlockKey(2)));
        assert!(s.evict_one().is_none(), "only a leased block is left");
        assert!(s.release(slot).is_none());
        assert_eq!(s.evict_one().map(|(k, _)| k), Some(BlockKey(1)));
    }

    #[test]
    fn doomed_block_is_invisible_and_freed_on_last_release() {
        let mut s = Shard::new(PolicyKind::S3fifo.build());
        s.insert(BlockKey(9), loc(3), 0);
        let LeaseOutcome::Leased { slot: a, .. } = s.lease(BlockKey(9), 3) else {
            panic!()
        };
        let LeaseOutcome::Leased { slot: b, .. } = s.lease(BlockKey(9), 3) else {
            panic!()
        };
        assert!(s.doom(a));
        assert!(!s.doom(b), "dooming twice is a no-op");
        assert!(!s.contains(BlockKey(9)));
        assert!(s.release(a).is_none());
        assert_eq!(s.release(b), Some(PageRun { start: 3, len: 1 }));
        assert!(s.insert(BlockKey(9), loc(4), 5), "key can be stored again");
    }
}
