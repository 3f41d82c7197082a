//! What each engine's own KV cache holds, as (engine, block key) entries under one global
//! budget with least-recently-used eviction. Pure: time comes in as milliseconds.
//!
//! Entries come from the engines' KV events, re-keyed with our own key chain from the events'
//! token ids (so the index never depends on vLLM's block hash or its seed: the engine's hash
//! only maps a later `BlockRemoved` back to our key), or, for engines that publish no events,
//! from the gateway's own routing decisions, each with an expiry.

use std::collections::HashMap;

use hashlink::LinkedHashMap;
use kvcache_core::key::{ChainHasher, chain_root};
use kvcache_core::{BlockKey, NamespaceId};

use crate::events::EngineHash;

/// An engine's position in the gateway's backend list.
pub type EngineId = u32;

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// None: reported by the engine (until it says otherwise); Some: learned, until then.
    expires_ms: Option<u64>,
    /// The engine's hash of the block, for entries from events.
    hash: Option<EngineHash>,
}

/// Why a stored event could not be indexed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the parent block is not indexed (events were missed, or it was evicted here)")]
    UnknownParent,
    #[error("{tokens} token ids do not make {blocks} blocks of {block_size}")]
    Shape {
        tokens: usize,
        blocks: usize,
        block_size: usize,
    },
}

/// The index.
pub struct BlockIndex {
    budget: usize,
    entries: LinkedHashMap<(EngineId, BlockKey), Entry>,
    by_hash: HashMap<(EngineId, EngineHash), BlockKey>,
    evicted: u64,
}

impl BlockIndex {
    /// An empty index that holds at most `budget` entries.
    pub fn new(budget: usize) -> Self {
        Self {
            budget: budget.max(1),
            entries: LinkedHashMap::new(),
            by_hash: HashMap::new(),
            evicted: 0,
        }
    }

    /// How many leading `keys` engine `e` holds (at `now_ms`); those it holds become the most
    /// recently used.
    pub fn matched(&mut self, e: EngineId, keys: &[BlockKey], now_ms: u64) -> usize {
        let mut n = 0;
        for &k in keys {
            match self.entries.get(&(e, k)) {
                Some(entry) if entry.expires_ms.is_none_or(|t| t > now_ms) => {
                    self.entries.to_back(&(e, k));
                    n += 1;
                }
                _ => break,
            }
        }
        n
    }

    /// Records that engine `e` will hold `keys` (the gateway just sent it their prompt), until
    /// `expires_ms`. Entries the engine reported itself keep no expiry.
    pub fn learn(&mut self, e: EngineId, keys: &[BlockKey], expires_ms: u64) {
        for &k in keys {
            match self.entries.get_mut(&(e, k)) {
                Some(entry) => {
                    if let Some(t) = &mut entry.expires_ms {
                        *t = (*t).max(expires_ms);
                    }
                    self.entries.to_back(&(e, k));
                }
                None => {
                    self.entries.insert(
                        (e, k),
                        Entry {
                            expires_ms: Some(expires_ms),
                            hash: None,
                        },
                    );
                }
            }
        }
        self.shrink();
    }

    /// Indexes a `BlockStored` event of engine `e` (namespace `ns`): `hashes[i]` is the engine's
    /// hash of the i-th block of `tokens`, chained after `parent` (None: the prompt's first
    /// block). Returns the blocks indexed.
    pub fn stored(
        &mut self,
        e: EngineId,
        ns: NamespaceId,
        parent: Option<EngineHash>,
        hashes: &[EngineHash],
        tokens: &[u32],
        block_size: usize,
    ) -> Result<usize, StoreError> {
        if block_size == 0 || tokens.len() != hashes.len() * block_size {
            return Err(StoreError::Shape {
                tokens: tokens.len(),
                blocks: hashes.len(),
                block_size,
            });
        }
        let parent_key = match parent {
            None => chain_root(&ns),
            Some(h) => *self.by_hash.get(&(e, h)).ok_or(StoreError::UnknownParent)?,
        };
        let mut chain = ChainHasher::resume(ns, parent_key);
        for (block, &hash) in tokens.chunks_exact(block_size).zip(hashes) {
            let key = chain.next_block(block, &[]);
            if let Some(old) = self.by_hash.insert((e, hash), key)
                && old != key
            {
                self.entries.remove(&(e, old));
            }
            self.entries.insert(
                (e, key),
                Entry {
                    expires_ms: None,
                    hash: Some(hash),
                },
            );
        }
        self.shrink();
        Ok(hashes.len())
    }

    /// Forgets the blocks a `BlockRemoved` event of engine `e` names; returns how many it knew.
    pub fn removed(&mut self, e: EngineId, hashes: &[EngineHash]) -> usize {
        let mut n = 0;
        for &h in hashes {
            if let Some(key) = self.by_hash.remove(&(e, h)) {
                self.entries.remove(&(e, key));
                n += 1;
            }
        }
        n
    }

    /// Forgets everything engine `e` holds (it cleared its cache, restarted, or events were lost).
    pub fn clear(&mut self, e: EngineId) {
        self.entries.retain(|(engine, _), _| *engine != e);
        self.by_hash.retain(|(engine, _), _| *engine != e);
    }

    /// Entries held, all engines together.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries engine `e` holds (a scan: for status pages and tests).
    pub fn len_of(&self, e: EngineId) -> usize {
        self.entries
            .keys()
            .filter(|(engine, _)| *engine == e)
            .count()
    }

    /// The budget, in entries.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Entries dropped to stay within the budget, ever.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Heap bytes the index's tables take (their capacity, not just their length).
    pub fn heap_bytes(&self) -> usize {
        // A linked entry holds the key, the value and two links; a hash slot holds a pointer
        // and a control byte.
        let linked =
            size_of::<(EngineId, BlockKey)>() + size_of::<Entry>() + 2 * size_of::<usize>();
        let slot = size_of::<usize>() + 1;
        let by_hash = size_of::<((EngineId, EngineHash), BlockKey)>() + 1;
        self.entries.len() * linked
            + self.entries.capacity() * slot
            + self.by_hash.capacity() * by_hash
    }

    fn shrink(&mut self) {
        while self.entries.len() > self.budget {
            let Some(((e, _), entry)) = self.entries.pop_front() else {
                break;
            };
            if let Some(h) = entry.hash {
                self.by_hash.remove(&(e, h));
            }
            self.evicted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use kvcache_core::{Namespace, chain_keys};

    use super::*;

    fn ns() -> NamespaceId {
        Namespace::new("tiny", "bfloat16", 4).id()
    }

    fn tokens(n: usize) -> Vec<u32> {
        (0..n as u32).map(|t| t * 7 + 3).collect()
    }

    #[test]
    fn events_are_rekeyed_with_our_chain_so_a_prompt_matches_what_the_engine_stored() {
        let mut idx = BlockIndex::new(100);
        let t = tokens(12);
        // The engine stores the first block, then (a later step) the next two after it.
        idx.stored(0, ns(), None, &[EngineHash(10)], &t[..4], 4)
            .unwrap();
        idx.stored(
            0,
            ns(),
            Some(EngineHash(10)),
            &[EngineHash(11), EngineHash(12)],
            &t[4..],
            4,
        )
        .unwrap();
        let keys = chain_keys(&ns(), &tokens(14), 4);
        assert_eq!(idx.matched(0, &keys, 0), 3);
        assert_eq!(idx.matched(1, &keys, 0), 0, "another engine holds nothing");
        // Evicting the middle block leaves only the first as a prefix.
        assert_eq!(idx.removed(0, &[EngineHash(11)]), 1);
        assert_eq!(idx.matched(0, &keys, 0), 1);
    }

    #[test]
    fn a_block_whose_parent_is_unknown_is_refused_not_misfiled() {
        let mut idx = BlockIndex::new(100);
        let err = idx.stored(
            0,
            ns(),
            Some(EngineHash(99)),
            &[EngineHash(1)],
            &tokens(4),
            4,
        );
        assert_eq!(err, Err(StoreError::UnknownParent));
        assert!(idx.is_empty());
        let err = idx.stored(0, ns(), None, &[EngineHash(1)], &tokens(5), 4);
        assert!(matches!(err, Err(StoreError::Shape { .. })));
    }

    #[test]
    fn learned_entries_expire_and_reported_ones_do_not() {
        let mut idx = BlockIndex::new(100);
        let keys = chain_keys(&ns(), &tokens(8), 4);
        idx.learn(0, &keys, 1_000);
        assert_eq!(idx.matched(0, &keys, 999), 2);
        assert_eq!(idx.matched(0, &keys, 1_000), 0);
        idx.stored(0, ns(), None, &[EngineHash(1)], &tokens(4), 4)
            .unwrap();
        idx.learn(0, &keys[..1], 5);
        assert_eq!(
            idx.matched(0, &keys, 1_000_000),
            1,
            "the reported block stays"
        );
    }

    #[test]
    fn the_budget_holds_and_the_least_recently_used_entries_go_first() {
        let mut idx = BlockIndex::new(10);
        let hot = chain_keys(&ns(), &tokens(8), 4);
        idx.learn(0, &hot, u64::MAX);
        for i in 0..50u32 {
            let cold = chain_keys(&ns(), &[i + 1000, 1, 2, 3], 4);
            idx.learn(1, &cold, u64::MAX);
            idx.matched(0, &hot, 0); // keep the hot prefix in use
            assert!(idx.len() <= 10);
        }
        assert_eq!(idx.matched(0, &hot, 0), 2);
        assert_eq!(idx.evicted(), 42);
        // Evicting a reported entry also forgets its engine hash.
        let mut idx = BlockIndex::new(1);
        idx.stored(
            0,
            ns(),
            None,
            &[EngineHash(1), EngineHash(2)],
            &tokens(8),
            4,
        )
        .unwrap();
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.removed(0, &[EngineHash(1)]), 0);
    }

    #[test]
    fn clearing_an_engine_leaves_the_others() {
        let mut idx = BlockIndex::new(100);
        let keys = chain_keys(&ns(), &tokens(8), 4);
        idx.learn(0, &keys, u64::MAX);
        idx.stored(
            1,
            ns(),
            None,
            &[EngineHash(1), EngineHash(2)],
            &tokens(8),
            4,
        )
        .unwrap();
        idx.clear(1);
        assert_eq!(idx.len_of(1), 0);
        assert_eq!(idx.matched(0, &keys, 0), 2);
        assert_eq!(idx.removed(1, &[EngineHash(1)]), 0);
    }
}
