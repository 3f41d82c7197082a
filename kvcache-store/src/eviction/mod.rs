//! Eviction policies: which block leaves when the pool needs room.
//!
//! One [`EvictionPolicy`] per index shard, addressed by slot id. `lru.rs` is least recently
//! used; `s3fifo.rs` is S3-FIFO (a small probationary FIFO, a main FIFO with reinsertion, and a
//! ghost list), which resists one-off scans better than LRU.
//!
//! Blocks carry a logical time stamp (the store's clock at their last insert or read), so the
//! store can compare shards: each policy reports the stamp of the block it would evict next,
//! and the store evicts from the sampled shard whose candidate is oldest.
//!
//! Invariants every policy keeps:
//! - a slot passed to `insert` stays tracked until it is returned by `pop_victim` or passed to
//!   `remove`, exactly once; after that the slot id may be inserted again;
//! - `pop_victim` returns only slots for which `evictable` answered true (leased blocks never
//!   leave) and terminates even when nothing is evictable.

mod lru;
mod s3fifo;

pub use lru::Lru;
pub use s3fifo::S3Fifo;

use kvcache_core::BlockKey;

/// Which policy a store uses.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used.
    #[default]
    Lru,
    /// S3-FIFO: scan-resistant, cheaper on hits.
    S3fifo,
}

impl PolicyKind {
    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::default()),
            PolicyKind::S3fifo => Box::new(S3Fifo::default()),
        }
    }
}

/// Chooses eviction victims among the slots of one index shard.
pub trait EvictionPolicy: Send {
    /// Starts tracking a newly committed block, stamped `now`.
    fn insert(&mut self, slot: u32, key: BlockKey, now: u32);
    /// Records a read of a tracked block at `now`.
    fn touch(&mut self, slot: u32, now: u32);
    /// Stops tracking a block that leaves for another reason than eviction.
    fn remove(&mut self, slot: u32);
    /// Picks, stops tracking and returns a victim among slots with `evictable(slot)`.
    fn pop_victim(&mut self, evictable: &mut dyn FnMut(u32) -> bool) -> Option<u32>;
    /// Stamp of the block `pop_victim` would consider first, or None if nothing is tracked.
    fn next_victim_stamp(&self) -> Option<u32>;
    /// Heap bytes held by the policy, for memory accounting.
    fn heap_bytes(&self) -> usize;
}

#[cfg(test)]
mod contract_tests {
    //! Every policy must pass these.
    use super::*;

    fn policies() -> Vec<Box<dyn EvictionPolicy>> {
        vec![PolicyKind::Lru.build(), PolicyKind::S3fifo.build()]
    }

    #[test]
    fn never_returns_unevictable_slots_and_terminates() {
        for mut p in policies() {
            for s in 0..10 {
                p.insert(s, BlockKey(s as u128), s);
            }
            assert_eq!(p.pop_victim(&mut |_| false), None);
            let v = p.pop_victim(&mut |s| s == 7);
            assert_eq!(v, Some(7));
            assert_eq!(
                p.pop_victim(&mut |s| s == 7),
                None,
                "7 is no longer tracked"
            );
        }
    }

    #[test]
    fn every_slot_is_popped_exactly_once() {
        for mut p in policies() {
            for s in 0..100 {
                p.insert(s, BlockKey(s as u128), s);
                if s % 3 == 0 {
                    p.touch(s, 100 + s);
                }
            }
            p.remove(50);
            let mut seen = Vec::new();
            while let Some(v) = p.pop_victim(&mut |_| true) {
                seen.push(v);
            }
            seen.sort_unstable();
            let want: Vec<u32> = (0..100).filter(|&s| s != 50).collect();
            assert_eq!(seen, want);
        }
    }

    #[test]
    fn next_victim_stamp_is_the_first_candidate_and_none_when_empty() {
        for mut p in policies() {
            assert_eq!(p.next_victim_stamp(), None);
            for s in 0..10 {
                p.insert(s, BlockKey(s as u128), 50 + s);
            }
            let stamp = p.next_victim_stamp().expect("tracked blocks");
            let victim = p.pop_victim(&mut |_| true).expect("a victim");
            assert_eq!(
                stamp,
                50 + victim,
                "the stamp belongs to the block evicted next"
            );
        }
    }

    #[test]
    fn reused_slot_ids_are_tracked_afresh() {
        for mut p in policies() {
            p.insert(1, BlockKey(1), 1);
            p.insert(2, BlockKey(2), 2);
            p.remove(1);
            p.insert(1, BlockKey(3), 3);
            let mut seen = Vec::new();
            while let Some(v) = p.pop_victim(&mut |_| true) {
                seen.push(v);
            }
            seen.sort_unstable();
            assert_eq!(seen, [1, 2]);
        }
    }
}
