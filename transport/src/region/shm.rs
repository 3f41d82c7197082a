//! Shared host memory: a sealed memfd mapped by the node and, read-only, by same-node clients.
//!
//! The file is sealed against shrinking and growing before anyone else sees it, so a peer that
//! maps it can never be hit by SIGBUS from a truncation. A region made with [`ShmRegion::new`]
//! is also sealed against future writes (`F_SEAL_FUTURE_WRITE`) once this process has mapped
//! it: from then on only that first mapping can change a byte. No descriptor a peer holds,
//! however it reopens it (`/proc/PID/fd/N` with `O_RDWR`, even as root), can `write(2)`, map
//! it writable and shared, `mprotect` a mapping to writable, or punch holes into it. A staging
//! window that peers must write is made with [`ShmRegion::new_writable_by_peers`].

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::mapping::{Mapping, region_over_mapping};
use super::{LockMode, RegionError};

/// A memfd of fixed size, mapped read-write into this process.
pub struct ShmRegion {
    map: Mapping,
    fd: OwnedFd,
}

impl ShmRegion {
    /// Creates a zeroed shared memory file of `len` bytes named `name` (shown in
    /// `/proc/PID/maps`), seals its size, maps it, and then seals it against every write but
    /// this mapping's: peers can only read it.
    pub fn new(name: &str, len: usize, lock: LockMode) -> Result<Self, RegionError> {
        Self::create(name, len, lock, libc::F_SEAL_FUTURE_WRITE)
    }

    /// Like [`ShmRegion::new`], but a peer given [`ShmRegion::fd`] may write it too (a staging
    /// window): only its size is sealed.
    pub fn new_writable_by_peers(
        name: &str,
        len: usize,
        lock: LockMode,
    ) -> Result<Self, RegionError> {
        Self::create(name, len, lock, 0)
    }

    fn create(name: &str, len: usize, lock: LockMode, seals: i32) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Empty);
        }
        let shared = |source| RegionError::SharedFile { len, source };
        let fd = sealed_memfd(name, len).map_err(shared)?;
        let map = Mapping::new(len, Some(fd.as_fd()), lock)?;
        // After the mapping: F_SEAL_FUTURE_WRITE leaves mappings made before it writable and
        // refuses every later way to write. F_SEAL_SEAL last, so nobody can add or drop seals.
        add_seals(fd.as_fd(), seals | libc::F_SEAL_SEAL).map_err(shared)?;
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
    // SAFETY: a plain syscall on a descriptor we own; the result is checked.
    if unsafe { libc::ftruncate(raw, len_off) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    add_seals(fd.as_fd(), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)?;
    Ok(fd)
}

fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> std::io::Result<()> {
    // SAFETY: fcntl(F_ADD_SEALS) on a borrowed, open descriptor; the result is checked.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

region_over_mapping!(ShmRegion);

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
    use crate::region::MemoryRegion;

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

    /// Every way a peer holding any descriptor of the pool could write it, tried as this
    /// process (root in CI): each must fail and the byte must stay.
    #[test]
    fn no_descriptor_of_a_node_only_region_can_write_it() {
        let r = ShmRegion::new("kvcache-test", 1 << 20, LockMode::Off).unwrap();
        // SAFETY: in-bounds write to our own live mapping from one thread.
        unsafe { *r.base().add(100) = 7 };
        let ro = r.read_only_fd().unwrap();
        let path = CString::new(format!("/proc/self/fd/{}", ro.as_raw_fd())).unwrap();
        // SAFETY: open(2) of a NUL-terminated path; checked and owned below.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(
            raw >= 0,
            "the reopen itself is allowed: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` was just opened and is owned here.
        let rw = unsafe { OwnedFd::from_raw_fd(raw) };
        for fd in [rw.as_fd(), r.fd()] {
            let byte = [1u8];
            // SAFETY: pwrite of one byte from a live buffer.
            let n = unsafe { libc::pwrite(fd.as_raw_fd(), byte.as_ptr().cast(), 1, 100) };
            assert_eq!(n, -1, "write(2) through a descriptor");
            // SAFETY: fallocate on an open descriptor; it must fail.
            let punched = unsafe {
                libc::fallocate(
                    fd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    1 << 20,
                )
            };
            assert_ne!(punched, 0, "punching a hole");
            assert!(
                ShmView::map(fd, 1 << 20, true).is_err(),
                "a writable shared mapping"
            );
        }
        let view = ShmView::map(rw.as_fd(), 1 << 20, false).unwrap();
        // SAFETY: mprotect of our own live read-only mapping; it must fail.
        let upgraded = unsafe {
            libc::mprotect(
                view.base().cast(),
                view.len(),
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        assert_ne!(upgraded, 0, "mprotect to writable");
        // SAFETY: in-bounds reads of live mappings.
        assert_eq!(
            unsafe { (*r.base().add(100), *view.base().add(100)) },
            (7, 7)
        );
    }

    #[test]
    fn a_staging_region_stays_writable_by_peers() {
        let r = ShmRegion::new_writable_by_peers("kvcache-test", 4096, LockMode::Off).unwrap();
        let view = ShmView::map(r.fd(), 4096, true).unwrap();
        // SAFETY: in-bounds write and read of live mappings of one file.
        unsafe {
            *view.base().add(9) = 3;
            assert_eq!(*r.base().add(9), 3);
        }
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
