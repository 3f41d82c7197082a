//! Anonymous host memory from mmap, optionally locked with mlock and backed by huge pages.

use std::ptr::NonNull;

use super::{MemoryRegion, RegionError};

/// Whether to pin the region's pages in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Never lock.
    Off,
    /// Try to lock; on failure log a warning and continue unlocked.
    #[default]
    BestEffort,
    /// Lock or fail.
    Required,
}

/// Anonymous private mmap of host memory.
pub struct HostRegion {
    ptr: NonNull<u8>,
    len: usize,
    locked: bool,
}

// SAFETY: the region is plain memory owned by this value; synchronising access to its bytes is
// the job of whoever hands out slices of it (the store's allocator and leases).
unsafe impl Send for HostRegion {}
// SAFETY: as above; `&HostRegion` exposes only the base pointer and length.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Maps `len` bytes of zeroed anonymous memory.
    pub fn new(len: usize, lock: LockMode) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Empty);
        }
        // SAFETY: anonymous private mapping with no address hint; the result is checked below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(RegionError::Map {
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(raw.cast::<u8>()).expect("mmap returned null without MAP_FAILED");
        // Huge pages cut TLB misses on large copies; purely advisory.
        // SAFETY: the range is the mapping just created.
        unsafe { libc::madvise(raw, len, libc::MADV_HUGEPAGE) };
        let mut region = Self {
            ptr,
            len,
            locked: false,
        };
        if lock != LockMode::Off {
            // SAFETY: the range is the mapping just created.
            if unsafe { libc::mlock(raw, len) } == 0 {
                region.locked = true;
            } else {
                let source = std::io::Error::last_os_error();
                if lock == LockMode::Required {
                    return Err(RegionError::Lock { len, source });
                }
                tracing::warn!(bytes = len, error = %source, "memory pool not locked in RAM (mlock failed); it may be swapped out");
            }
        }
        Ok(region)
    }
}

impl MemoryRegion for HostRegion {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no slices outlive `self`
        // because every borrower holds the region through an `Arc`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zeroed_writable_memory() {
        let r = HostRegion::new(1 << 20, LockMode::Off).unwrap();
        // SAFETY: in-bounds accesses of a live mapping from a single thread.
        unsafe {
            assert_eq!(*r.base().add(12345), 0);
            *r.base().add(12345) = 7;
            assert_eq!(*r.base().add(12345), 7);
        }
        assert_eq!(r.len(), 1 << 20);
        assert!(!r.is_locked());
    }

    #[test]
    fn empty_region_is_an_error() {
        assert!(matches!(
            HostRegion::new(0, LockMode::Off),
            Err(RegionError::Empty)
        ));
    }
}
