//! Anonymous host memory from mmap, optionally locked with mlock and backed by huge pages.

use super::mapping::{Mapping, region_over_mapping};
use super::{LockMode, RegionError};

/// Anonymous private mmap of host memory.
pub struct HostRegion {
    map: Mapping,
}

impl HostRegion {
    /// Maps `len` bytes of zeroed anonymous memory.
    pub fn new(len: usize, lock: LockMode) -> Result<Self, RegionError> {
        Ok(Self {
            map: Mapping::new(len, None, lock)?,
        })
    }
}

region_over_mapping!(HostRegion);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::MemoryRegion;

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
