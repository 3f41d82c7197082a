//! Shared host memory: a sealed memfd mapped by the node and, read-only, by same-node clients.
//!
//! The file is sealed against shrinking and growing before anyone else sees it, so a peer that
//! maps it can never be hit by SIGBUS from a truncation, and a peer given a read-only file
//! description (see [`ShmRegion::read_only_fd`]) cannot map it writable or resize it.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::mapping::Mapping;
use super::{LockMode, MemoryRegion, RegionError};

/// A memfd of fixed size, mapped read-write into this process.
pub struct ShmRegion {
    map: Mapping,
    fd: OwnedFd,
}

impl ShmRegion {
    /// Creates a zeroed shared memory file of `len` bytes named `name` (shown in
    /// `/proc/PID/maps`), seals its size and maps it.
    pub fn new(name: &str, len: usize, lock: LockMode) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Empty);
        }
        let fd =
            sealed_memfd(name, len).map_err(|source| RegionError::SharedFile { len, source })?;
        let map = Mapping::new(len, Some(fd.as_fd()), lock)?;
        Ok(Self { map, fd })
    }

    /// The read-write file descriptor (for this process, or a peer trusted to write).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A new read-only file description of the same memory: a peer holding it can map the
    /// region to read but can neither map it writable nor resize it.
    pub fn read_only_fd(&self) -> std::io::Result<OwnedFd> {
        let path = CString::new(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
            .expect("no NUL in a path built from a number");
        // SAFETY: a plain open(2) of a NUL-terminated path; the result is checked.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a file descriptor we just opened and own.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

fn sealed_memfd(name: &str, len: usize) -> std::io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a file descriptor we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len_off = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: plain syscalls on a descriptor we own; results are checked.
    unsafe {
        if libc::ftruncate(raw, len_off) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if libc::fcntl(raw, libc::F_ADD_SEALS, seals) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

impl MemoryRegion for ShmRegion {
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

/// A peer's view of a shared memory file received from elsewhere: mapped once, whole, read-only
/// or read-write. The file must be sealed against shrinking, so the view can never fault.
pub struct ShmView {
    map: Mapping,
}

impl ShmView {
    /// Maps all of `fd`, which must be a sealed file of exactly `expected_len` bytes.
    pub fn map(
        fd: BorrowedFd<'_>,
        expected_len: usize,
        writable: bool,
    ) -> Result<Self, RegionError> {
        let fail = |source| RegionError::Map {
            len: expected_len,
            source,
        };
        // SAFETY: fstat/fcntl on a borrowed, open descriptor into a local buffer.
        let (size, seals) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return Err(fail(std::io::Error::last_os_error()));
            }
            (
                st.st_size as u64,
                libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS),
            )
        };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(fail(std::io::Error::other(
                "the shared memory file is not sealed against shrinking",
            )));
        }
        if size != expected_len as u64 {
            return Err(fail(std::io::Error::other(format!(
                "the shared memory file has {size} bytes, not the {expected_len} announced"
            ))));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        Ok(Self {
            map: Mapping::with_prot(expected_len, Some(fd), prot, LockMode::Off)?,
        })
    }

    /// First byte of the view.
    pub fn base(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Never true: empty files are refused.
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_peer_sees_writes_but_cannot_write_or_resize() {
        let r = ShmRegion::new("kvcache-test", 1 << 20, LockMode::Off).unwrap();
        // SAFETY: in-bounds write to our own live mapping from one thread.
        unsafe { *r.base().add(4242) = 9 };
        let ro = r.read_only_fd().unwrap();
        let view = ShmView::map(ro.as_fd(), 1 << 20, false).unwrap();
        // SAFETY: in-bounds read of a live mapping.
        assert_eq!(unsafe { *view.base().add(4242) }, 9);
        assert!(
            ShmView::map(ro.as_fd(), 1 << 20, true).is_err(),
            "writable map of a read-only fd"
        );
        // SAFETY: ftruncate on a descriptor we own; it must fail.
        assert_ne!(unsafe { libc::ftruncate(ro.as_raw_fd(), 10) }, 0);
        assert!(
            ShmView::map(ro.as_fd(), 1 << 19, false).is_err(),
            "size mismatch"
        );
    }

    #[test]
    fn unsealed_files_are_refused() {
        let name = CString::new("plain").unwrap();
        // SAFETY: memfd_create with a valid name; checked; owned below.
        let fd =
            unsafe { OwnedFd::from_raw_fd(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC)) };
        // SAFETY: ftruncate on a descriptor we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        assert!(ShmView::map(fd.as_fd(), 4096, false).is_err());
    }
}
