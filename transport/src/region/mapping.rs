//! The mmap/mlock/munmap steps every host-memory region shares.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use super::{LockMode, RegionError};

/// A live mapping of `len` bytes, unmapped on drop.
pub(crate) struct Mapping {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) len: usize,
    pub(crate) locked: bool,
}

// SAFETY: the mapping is plain memory owned by this value; synchronising access to its bytes is
// the job of whoever hands out slices of it (the store's allocator and leases).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` exposes only the base pointer and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes read-write: anonymous private memory when `fd` is `None`, else the
    /// file shared. Huge pages are requested (advisory) and the pages locked per `lock`.
    pub(crate) fn new(
        len: usize,
        fd: Option<BorrowedFd<'_>>,
        lock: LockMode,
    ) -> Result<Self, RegionError> {
        Self::with_prot(len, fd, libc::PROT_READ | libc::PROT_WRITE, lock)
    }

    /// As [`new`](Self::new) with explicit protection bits (`PROT_READ` for a view that must
    /// not write).
    pub(crate) fn with_prot(
        len: usize,
        fd: Option<BorrowedFd<'_>>,
        prot: libc::c_int,
        lock: LockMode,
    ) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Empty);
        }
        let (flags, raw_fd) = match fd {
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
        };
        // SAFETY: a fresh mapping with no address hint; the result is checked below.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw_fd, 0) };
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
        let mut m = Self {
            ptr,
            len,
            locked: false,
        };
        if lock != LockMode::Off {
            // SAFETY: the range is the mapping just created.
            if unsafe { libc::mlock(raw, len) } == 0 {
                m.locked = true;
            } else {
                let source = std::io::Error::last_os_error();
                if lock == LockMode::Required {
                    return Err(RegionError::Lock { len, source });
                }
                tracing::warn!(bytes = len, error = %source, "memory pool not locked in RAM (mlock failed); it may be swapped out");
            }
        }
        Ok(m)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no slices outlive `self`
        // because every borrower holds the region through an `Arc`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `MemoryRegion` for a region type whose memory is its `map: Mapping` field: host and shared
/// regions differ in how they are made, not in what they are once mapped.
macro_rules! region_over_mapping {
    ($region:ty) => {
        impl $crate::region::MemoryRegion for $region {
            fn base(&self) -> *mut u8 {
                self.map.ptr.as_ptr()
            }

            fn len(&self) -> usize {
                self.map.len
            }

            fn is_locked(&self) -> bool {
                self.map.locked
            }
        }
    };
}
pub(crate) use region_over_mapping;
