//! Writing a block: [`Store::allocate`] reserves its pages (evicting if needed), the transfer
//! step fills them through the [`Allocation`], and [`Allocation::commit`] checksums what is
//! left and makes the block visible at once. Dropped uncommitted, an allocation frees its pages.

use std::sync::Arc;

use kvcache_core::BlockKey;
use kvcache_core::checksum;

use crate::allocator::PageRun;
use crate::config::{AllocError, CommitOutcome};
use crate::index::Location;
use crate::store::Store;

impl Store {
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
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: empty blocks cannot be allocated.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of checksum chunks; a transport may [`fill`](Self::fill_chunk) them in order.
    #[inline]
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
    #[inline]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.raw()[..len]
    }

    /// Checksums chunk `i`, already in place; chunks are sealed in order (commit seals
    /// whatever `fill_chunk` left).
    fn seal_chunk(&mut self, i: usize) {
        if i != self.sealed {
            return;
        }
        let (len, range) = (self.len, checksum::chunk_range(self.len, i));
        let (data, trailer) = self.raw().split_at_mut(checksum::trailer_offset(len));
        checksum::record(trailer, i, checksum::chunk_checksum(&data[range]));
        self.sealed += 1;
    }

    /// Copies `src` into chunk `i` and seals it in the same pass over the bytes
    /// ([`chunk_hash::copy_and_hash_streaming`](kvcache_core::chunk_hash::copy_and_hash_streaming),
    /// whose stores bypass the caches: the pool is not read soon): the checksum covers exactly
    /// what was stored, even if `src` changes meanwhile. Chunks must be filled
    /// in order; one filled out of order is sealed at commit.
    #[inline]
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
        let sum = kvcache_core::chunk_hash::copy_and_hash_streaming(src, &mut data[range]);
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
