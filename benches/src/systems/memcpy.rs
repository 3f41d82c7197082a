//! The memcpy ceiling: the same bytes copied between a store and the caller's buffer inside
//! this process, with no protocol, no verification and no other process. It is what a
//! shared-memory transport could reach at best on this machine.
//!
//! The store is the same kind of memory as kvcache's shared pool (a sealed memfd, huge pages
//! requested), so both pay the same page-table costs: with the kernel's shmem huge pages off
//! (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` = never, Debian's default) both use
//! 4 KiB pages; with `advise` both get 2 MiB pages. Like the TCP ceiling, it keeps one value
//! per key slot (`key mod slots`, up to 1 GiB in all), so a row moves the same working set
//! through DRAM as the stores it bounds.
//!
//! A put stores with streaming (non-temporal) stores where the CPU has AVX2: nobody reads a
//! store's slot soon, so skipping the cache is the fastest copy there is (2-3x glibc's memcpy
//! at 1 MiB here, benches/results/shm-put-streaming-ab.json), and a ceiling must be the best
//! copy, not the handiest one. A get copies with `copy_from_slice`, which measured as fast.

use std::sync::{Arc, Mutex};

use kvcache_transport::{LockMode, MemoryRegion, ShmRegion};

use super::ceiling::{MAX_SLOTS, slots_for};

/// The store every memcpy-ceiling connection shares.
pub struct MemcpyStore {
    region: ShmRegion,
    /// One lock per slot: a put never overlaps a get of the same slot.
    slots: Vec<Mutex<()>>,
}

impl MemcpyStore {
    pub fn new() -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            region: ShmRegion::new("kvcache-bench-memcpy", 1 << 30, LockMode::Off)?,
            slots: (0..MAX_SLOTS).map(|_| Mutex::new(())).collect(),
        }))
    }

    /// Runs `f` on slot `key`'s bytes for values of `len` bytes.
    fn with_slot<T>(&self, key: u64, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        let slot = key as usize % slots_for(len);
        let _held = self.slots[slot].lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: slots_for keeps slot * len + len within 1 GiB, the region's size; the slot's
        // lock makes this the only reference to these bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(self.region.base().add(slot * len), len) };
        f(bytes)
    }
}

/// One "connection": a handle on the shared store.
pub struct MemcpyConn {
    store: Arc<MemcpyStore>,
}

impl MemcpyConn {
    pub fn new(store: &Arc<MemcpyStore>) -> Self {
        Self {
            store: Arc::clone(store),
        }
    }

    pub fn put(&mut self, key: u64, value: &[u8]) {
        self.store
            .with_slot(key, value.len(), |s| stream_copy(value, s));
    }

    pub fn get(&mut self, key: u64, buf: &mut [u8]) {
        self.store
            .with_slot(key, buf.len(), |s| buf.copy_from_slice(s));
    }
}

/// Copies `src` into `dst` (equal lengths) bypassing the caches where it can.
fn stream_copy(src: &[u8], dst: &mut [u8]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if dst.as_ptr().align_offset(32) == 0 && src.len() == dst.len() {
        use std::arch::x86_64::*;
        let body = src.len() / 64 * 64;
        // SAFETY: AVX2 is enabled for this build; every load reads 32 bytes below `body`
        // within `src`, every store writes the same offsets of `dst` (same length), which is
        // 32-byte aligned (checked) as streaming stores need; the fence orders them before
        // the slot's lock is released.
        unsafe {
            for at in (0..body).step_by(64) {
                let p = src.as_ptr().add(at);
                let q = dst.as_mut_ptr().add(at);
                let a = _mm256_loadu_si256(p.cast());
                let b = _mm256_loadu_si256(p.add(32).cast());
                _mm256_stream_si256(q.cast(), a);
                _mm256_stream_si256(q.add(32).cast(), b);
            }
            _mm_sfence();
        }
        dst[body..].copy_from_slice(&src[body..]);
        return;
    }
    dst.copy_from_slice(src);
}
