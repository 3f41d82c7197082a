//! GPU-direct RDMA: device memory registered with the RDMA device, so READs land in GPU memory
//! and WRITEs leave from it with no copy through host memory.
//!
//! Two ways, tried in this order:
//! - **dmabuf**: the CUDA driver exports the memory as a dmabuf and `ibv_reg_dmabuf_mr`
//!   registers it. Upstream kernels (5.12+) and rdma-core (34+) support it; the driver needs
//!   CUDA 11.7+ and reports it per device (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`, true with
//!   the open kernel modules).
//! - **peer memory**: plain `ibv_reg_mr` on the device address, which works when NVIDIA's
//!   peer-memory kernel module (`nvidia_peermem`, formerly `nv_peer_mem`) is loaded.
//!
//! Where neither is there, [`register`] says why and the caller stages through pinned host
//! memory instead. The choice ([`methods`]) and the page arithmetic ([`page_span`]) need no
//! device and are unit-tested; [`register`] needs the features `rdma` and `cuda`.

use std::fmt;

/// How device memory was registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    DmaBuf,
    PeerMemory,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::DmaBuf => "dmabuf",
            Method::PeerMemory => "peer memory (nvidia_peermem)",
        })
    }
}

/// The registrations worth trying, best first, given what the driver and the kernel offer;
/// the reason to stage when there is none.
pub fn methods(dmabuf: bool, peer_memory: bool) -> Result<Vec<Method>, String> {
    let ways: Vec<Method> = [(dmabuf, Method::DmaBuf), (peer_memory, Method::PeerMemory)]
        .into_iter()
        .filter_map(|(has, m)| has.then_some(m))
        .collect();
    if ways.is_empty() {
        return Err(
            "the CUDA driver cannot export this GPU's memory as a dmabuf and no \
                    peer-memory module (nvidia_peermem) is loaded"
                .into(),
        );
    }
    Ok(ways)
}

/// Whether NVIDIA's peer-memory kernel module is loaded.
pub fn peer_memory_loaded() -> bool {
    ["/sys/module/nvidia_peermem", "/sys/module/nv_peer_mem"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
}

/// The page-aligned range a dmabuf must cover for `len` bytes at `addr`: its start, its
/// length, and where `addr` lies in it. `None` when the range wraps the address space.
pub fn page_span(addr: u64, len: u64, page: u64) -> Option<(u64, u64, u64)> {
    debug_assert!(page.is_power_of_two());
    let start = addr & !(page - 1);
    let end = addr.checked_add(len)?.checked_add(page - 1)? & !(page - 1);
    Some((start, end - start, addr - start))
}

#[cfg(all(feature = "rdma", feature = "cuda"))]
pub use registration::{GpuDirectError, register};

#[cfg(all(feature = "rdma", feature = "cuda"))]
mod registration {
    use std::os::fd::AsFd;
    use std::sync::Arc;

    use super::{Method, methods, page_span, peer_memory_loaded};
    use crate::cuda::{CudaError, Gpu};
    use crate::rdma::verbs::{Device, Registration};

    /// Why device memory could not be registered for GPU-direct RDMA.
    #[derive(Debug, thiserror::Error)]
    pub enum GpuDirectError {
        #[error("GPU-direct RDMA is not available: {0}; stage through pinned host memory")]
        Unavailable(String),
        #[error("GPU-direct RDMA registration failed ({0}); stage through pinned host memory")]
        Failed(String),
        #[error(transparent)]
        Cuda(#[from] CudaError),
    }

    /// Registers `len` bytes of `gpu`'s memory at `addr` with `device`, by the best method
    /// the stack offers; a failed method falls through to the next one.
    ///
    /// # Safety
    /// The memory must stay allocated for as long as the registration lives.
    pub unsafe fn register(
        device: &Arc<Device>,
        gpu: &Gpu,
        addr: u64,
        len: usize,
        remote_read: bool,
        remote_write: bool,
    ) -> Result<(Registration, Method), GpuDirectError> {
        let ways = methods(gpu.supports_dmabuf()?, peer_memory_loaded())
            .map_err(GpuDirectError::Unavailable)?;
        let (read, write) = (remote_read, remote_write);
        let mut failures = Vec::new();
        for way in ways {
            let done = match way {
                Method::DmaBuf => {
                    // SAFETY: sysconf has no preconditions.
                    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
                    page_span(addr, len as u64, page)
                        .ok_or_else(|| "the range wraps the address space".to_string())
                        .and_then(|(start, span, offset)| {
                            let fd = gpu
                                .export_dmabuf(start, span as usize)
                                .map_err(|e| e.to_string())?;
                            // SAFETY: upheld by the caller; the registration keeps its own
                            // reference to the dmabuf, so `fd` may close after this.
                            unsafe {
                                device.register_dmabuf(fd.as_fd(), offset, len, addr, read, write)
                            }
                            .map_err(|e| e.to_string())
                        })
                }
                // SAFETY: upheld by the caller; the peer-memory module pins the GPU pages.
                Method::PeerMemory => unsafe { device.register(addr as *mut u8, len, read, write) }
                    .map_err(|e| e.to_string()),
            };
            match done {
                Ok(reg) => {
                    tracing::info!(%way, bytes = len, "registered GPU memory for GPU-direct RDMA");
                    return Ok((reg, way));
                }
                Err(why) => failures.push(format!("{way}: {why}")),
            }
        }
        Err(GpuDirectError::Failed(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmabuf_is_tried_before_peer_memory_and_neither_names_both() {
        assert_eq!(
            methods(true, true).unwrap(),
            [Method::DmaBuf, Method::PeerMemory]
        );
        assert_eq!(methods(true, false).unwrap(), [Method::DmaBuf]);
        assert_eq!(methods(false, true).unwrap(), [Method::PeerMemory]);
        let why = methods(false, false).unwrap_err();
        assert!(
            why.contains("dmabuf") && why.contains("nvidia_peermem"),
            "{why}"
        );
    }

    #[test]
    fn the_dmabuf_covers_whole_pages_around_the_range() {
        // Already aligned.
        assert_eq!(
            page_span(0x10000, 0x2000, 0x1000),
            Some((0x10000, 0x2000, 0))
        );
        // Unaligned start and end: rounded out, the offset locates the range.
        assert_eq!(
            page_span(0x10010, 0x1ff0 + 1, 0x1000),
            Some((0x10000, 0x3000, 0x10))
        );
        // One byte.
        assert_eq!(page_span(0x1fff, 1, 0x1000), Some((0x1000, 0x1000, 0xfff)));
        // Wrapping the address space is refused, not wrapped.
        assert_eq!(page_span(u64::MAX - 10, 100, 0x1000), None);
    }
}
