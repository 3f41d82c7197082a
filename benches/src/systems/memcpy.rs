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
            .with_slot(key, value.len(), |s| s.copy_from_slice(value));
    }

    pub fn get(&mut self, key: u64, buf: &mut [u8]) {
        self.store
            .with_slot(key, buf.len(), |s| buf.copy_from_slice(s));
    }
}
