//! Reading a block: [`Store::lease`] pins it (it cannot be evicted or reused while leased) and
//! checks its trailer; its bytes are reachable only through verification. A block that fails
//! a check is dropped and reported as a miss, never returned.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kvcache_core::BlockKey;
use kvcache_core::checksum;

use crate::config::AllocError;
use crate::index::{LeaseOutcome, Location};
use crate::store::{Store, chunk_intact};

impl Store {
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
}

/// A read lease on a committed block: its bytes stay put until the lease is dropped (release).
/// The bytes are reachable only through verification, here or by a reader that checks them
/// where they land against [`chunk_sums`](Lease::chunk_sums).
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
    #[inline]
    pub fn len(&self) -> usize {
        self.location.len as usize
    }

    /// Where the block starts in the pool, for a peer that maps the shared pool; it reads the
    /// bytes and checks them itself against [`trailer_checksum`](Self::trailer_checksum).
    #[inline]
    pub fn pool_offset(&self) -> u64 {
        self.location.run.start as u64 * self.store.page_size
    }

    /// The checksum of the block's trailer, as the index records it.
    #[inline]
    pub fn trailer_checksum(&self) -> u64 {
        self.location.checksum
    }

    /// Never true: empty blocks are not stored.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.location.len == 0
    }

    /// Number of checksum chunks.
    #[inline]
    pub fn chunk_count(&self) -> usize {
        checksum::chunk_count(self.len())
    }

    /// Chunk `i`, verified just now. On a mismatch the block is dropped from the index.
    #[inline]
    pub fn verified_chunk(&self, i: usize) -> Result<&[u8], Corrupt> {
        if !chunk_intact(self.raw(), self.len(), i) {
            return Err(self.corrupt());
        }
        Ok(&self.raw()[checksum::chunk_range(self.len(), i)])
    }

    /// Chunk `i` as stored, unchecked: only for a reader that checks it where it lands,
    /// against [`chunk_sums`](Self::chunk_sums).
    #[inline]
    pub fn unverified_chunk(&self, i: usize) -> &[u8] {
        &self.raw()[checksum::chunk_range(self.len(), i)]
    }

    /// Every chunk's checksum, from the trailer, which is checked against the index first. On
    /// a mismatch the block is dropped from the index.
    pub fn chunk_sums(&self) -> Result<Vec<u64>, Corrupt> {
        // Check a private copy, so the sums returned are the ones checked.
        let trailer = self.trailer().to_vec();
        if checksum::trailer_checksum(&trailer) != self.location.checksum {
            return Err(self.corrupt());
        }
        Ok((0..self.chunk_count())
            .map(|i| checksum::recorded(&trailer, i))
            .collect())
    }

    /// The whole block, every chunk verified.
    #[inline]
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
