//! The shared-memory transport's plumbing: passing file descriptors over a Unix socket
//! (SCM_RIGHTS) and telling whether a node runs on this host.
//!
//! The protocol itself is the TCP framing over a Unix stream socket; only the transfer step
//! differs: bytes move through [`ShmRegion`](crate::region::ShmRegion) mappings instead of the
//! socket. See docs/ARCHITECTURE.md, "Shared memory".

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// Most descriptors one message may carry; the protocol sends two.
pub const MAX_FDS: usize = 4;

/// Sends `bytes` with `fds` attached to the first byte, in one `sendmsg`. Returns the bytes
/// sent (possibly fewer than `bytes.len()`; the caller writes the rest without descriptors).
/// Fails with `WouldBlock` on a full non-blocking socket.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors");
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let data_len = std::mem::size_of_val(raw.as_slice());
    let mut cmsg_buf = [0u64; 8]; // 64 bytes, aligned for cmsghdr; room for MAX_FDS.
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call, and the
    // control buffer is large enough for one cmsghdr with MAX_FDS descriptors (CMSG_SPACE).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            let space = libc::CMSG_SPACE(data_len as u32) as usize;
            debug_assert!(space <= std::mem::size_of_val(&cmsg_buf));
            msg.msg_control = cmsg_buf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                data_len,
            );
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Receives up to `buf.len()` bytes; descriptors that arrive with them are appended to `fds`
/// (close-on-exec). Returns the bytes received, 0 at end of stream. Fails with `WouldBlock` on
/// an empty non-blocking socket.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut cmsg_buf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `send_with_fds`; the kernel writes at most `msg_controllen` bytes of control
    // data, and every descriptor it reports is new and ours to own.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg_buf);
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                    let fd = data
                        .add(i * std::mem::size_of::<libc::c_int>())
                        .cast::<libc::c_int>()
                        .read_unaligned();
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(std::io::Error::other(
                "file descriptors were truncated in transit",
            ));
        }
        Ok(n as usize)
    }
}

/// This host's identity for same-host checks: the kernel's boot id, shared by every process
/// (and container) on one running kernel and different everywhere else. `None` if unreadable.
pub fn host_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Where a node listening on TCP `port` puts its shared-memory socket by default:
/// `$XDG_RUNTIME_DIR/kvcache-PORT.sock`, else `/tmp/kvcache-UID/kvcache-PORT.sock` (a directory
/// of the node's uid, so no other user can take the name first; the node creates it and checks
/// it).
pub fn default_socket_path(port: u16) -> PathBuf {
    let name = format!("kvcache-{port}.sock");
    match std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
    {
        Some(dir) => dir.join(name),
        // SAFETY: geteuid has no preconditions.
        None => std::env::temp_dir()
            .join(format!("kvcache-{}", unsafe { libc::geteuid() }))
            .join(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::{LockMode, MemoryRegion, ShmRegion, ShmView};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_cross_a_socket_pair_and_map_the_same_memory() {
        let (a, b) = UnixStream::pair().unwrap();
        let region = ShmRegion::new("kvcache-test", 8192, LockMode::Off).unwrap();
        // SAFETY: in-bounds write to our own mapping.
        unsafe { *region.base().add(100) = 77 };
        let ro = region.read_only_fd().unwrap();
        let sent = send_with_fds(a.as_fd(), b"hello", &[ro.as_fd(), region.fd()]).unwrap();
        assert_eq!(sent, 5);
        let (mut buf, mut fds) = ([0u8; 16], Vec::new());
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        let view = ShmView::map(fds[0].as_fd(), 8192, false).unwrap();
        // SAFETY: in-bounds read of a live mapping.
        assert_eq!(unsafe { *view.base().add(100) }, 77);
        assert!(ShmView::map(fds[0].as_fd(), 8192, true).is_err());
        // Sealed against future writes: not even the node's own descriptor maps it writable.
        assert!(ShmView::map(fds[1].as_fd(), 8192, true).is_err());
    }

    #[test]
    fn plain_bytes_arrive_without_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(a.as_fd(), b"xy", &[]).unwrap();
        let (mut buf, mut fds) = ([0u8; 4], Vec::new());
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap(), 2);
        assert!(fds.is_empty());
    }

    #[test]
    fn host_id_is_stable() {
        assert_eq!(host_id(), host_id());
        assert!(
            host_id().is_some(),
            "/proc/sys/kernel/random/boot_id readable on Linux"
        );
    }
}
