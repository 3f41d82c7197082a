//! GPU memory through the CUDA driver (cargo feature `cuda`): cudarc loads `libcuda.so` at run
//! time, so the build needs no toolkit and a machine without a driver gets [`CudaError::NoDriver`]
//! from every entry point, never a panic.
//!
//! The staged path: device memory is copied to pinned (page-locked) host memory on a stream,
//! and from there into the cache, and back the same way. For GPU-direct RDMA the driver exports
//! device memory as a dmabuf ([`Gpu::export_dmabuf`]), which `rdma::gpudirect` registers with
//! the RDMA device.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice, sys};

/// Bytes on a GPU.
pub type DeviceBuffer = CudaSlice<u8>;

/// Why a CUDA call could not run.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver on this machine (libcuda.so was not found)")]
    NoDriver,
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("copy of {src} bytes into {dst} bytes")]
    SizeMismatch { src: usize, dst: usize },
    #[error("{len} bytes at offset {offset} lie outside a {size}-byte device buffer")]
    OutOfBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
}

/// Whether a CUDA driver library is present (checked before any other call, which would
/// otherwise panic inside cudarc).
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One GPU and a stream of its own for copies.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    /// Opens device `ordinal`.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count()?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Ok(Self { ctx, stream })
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> Result<String, CudaError> {
        Ok(self.ctx.name()?)
    }

    /// The device address of `buf` (unified with host addresses: no host pointer has it).
    pub fn address(&self, buf: &DeviceBuffer) -> u64 {
        buf.device_ptr(&self.stream).0
    }

    /// Whether the driver can export this device's memory as a dmabuf (CUDA 11.7+ with the
    /// open kernel modules), which is how GPU-direct RDMA registers it.
    pub fn supports_dmabuf(&self) -> Result<bool, CudaError> {
        let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED;
        Ok(self.ctx.attribute(attr)? != 0)
    }

    /// Exports `len` bytes of device memory at `addr` as a dmabuf file descriptor. Both must be
    /// multiples of the host page size and lie in one allocation.
    pub fn export_dmabuf(&self, addr: u64, len: usize) -> Result<OwnedFd, CudaError> {
        self.ctx.bind_to_thread()?;
        let mut fd: i32 = -1;
        // SAFETY: the driver writes one int; the range is checked by the driver.
        unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut i32).cast(),
                addr,
                len,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        }
        .result()?;
        // SAFETY: on success the driver handed us a new descriptor, which we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Page-locks existing host memory (e.g. the server's pool) with the driver, so copies
    /// between it and the device are DMA rather than staged by the driver.
    ///
    /// # Safety
    /// The memory must stay mapped until [`HostRegistration`] is dropped.
    pub unsafe fn register_host(
        &self,
        addr: *mut u8,
        len: usize,
    ) -> Result<HostRegistration, CudaError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: upheld by the caller.
        unsafe { sys::cuMemHostRegister_v2(addr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()?;
        Ok(HostRegistration {
            ctx: Arc::clone(&self.ctx),
            addr,
        })
    }

    /// Zeroes `buf`, asynchronously on this GPU's stream.
    pub fn zero(&self, buf: &mut DeviceBuffer) -> Result<(), CudaError> {
        Ok(self.stream.memset_zeros(buf)?)
    }

    /// Zeroed device memory.
    pub fn alloc(&self, len: usize) -> Result<CudaSlice<u8>, CudaError> {
        Ok(self.stream.alloc_zeros::<u8>(len)?)
    }

    /// Pinned host memory for staging, registered with the driver (so copies are DMA).
    pub fn pinned(&self, len: usize) -> Result<PinnedHostSlice<u8>, CudaError> {
        // SAFETY: the memory is zeroed right after allocation.
        let mut p = unsafe { self.ctx.alloc_pinned::<u8>(len)? };
        p.as_mut_slice()?.fill(0);
        Ok(p)
    }

    /// Host → device, asynchronous on this GPU's stream.
    pub fn upload(&self, src: &[u8], dst: &mut CudaSlice<u8>) -> Result<(), CudaError> {
        if src.len() != dst.len() {
            return Err(CudaError::SizeMismatch {
                src: src.len(),
                dst: dst.len(),
            });
        }
        Ok(self.stream.memcpy_htod(src, dst)?)
    }

    /// Device → host, asynchronous on this GPU's stream.
    pub fn download(&self, src: &CudaSlice<u8>, dst: &mut [u8]) -> Result<(), CudaError> {
        if src.len() != dst.len() {
            return Err(CudaError::SizeMismatch {
                src: src.len(),
                dst: dst.len(),
            });
        }
        Ok(self.stream.memcpy_dtoh(src, dst)?)
    }

    /// Host → device, into `dst` at `offset`, asynchronous on this GPU's stream.
    pub fn upload_at(
        &self,
        src: &[u8],
        dst: &mut DeviceBuffer,
        offset: usize,
    ) -> Result<(), CudaError> {
        let range = in_bounds(offset, src.len(), dst.len())?;
        Ok(self.stream.memcpy_htod(src, &mut dst.slice_mut(range))?)
    }

    /// Device → host, from `src` at `offset`, asynchronous on this GPU's stream.
    pub fn download_at(
        &self,
        src: &DeviceBuffer,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), CudaError> {
        let range = in_bounds(offset, dst.len(), src.len())?;
        Ok(self.stream.memcpy_dtoh(&src.slice(range), dst)?)
    }

    /// Waits for this GPU's copies.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}

/// Host memory page-locked with the driver; unregistered on drop.
pub struct HostRegistration {
    ctx: Arc<CudaContext>,
    addr: *mut u8,
}

// SAFETY: the registration is a handle the driver keeps per context; dropping it from any
// thread (with the context bound) is allowed.
unsafe impl Send for HostRegistration {}
unsafe impl Sync for HostRegistration {}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let rc = self
            .ctx
            .bind_to_thread()
            // SAFETY: registered once in `register_host`, unregistered once here.
            .and_then(|()| unsafe { sys::cuMemHostUnregister(self.addr.cast()) }.result());
        if let Err(e) = rc {
            tracing::warn!(error = %e, "cuMemHostUnregister failed");
        }
    }
}

fn in_bounds(offset: usize, len: usize, size: usize) -> Result<std::ops::Range<usize>, CudaError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset..end),
        _ => Err(CudaError::OutOfBounds { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_opening_is_an_error_not_a_panic() {
        if driver_present() {
            eprintln!("skipped: a CUDA driver is present (the GPU tests cover it)");
            return;
        }
        let err = Gpu::open(0).err().expect("no driver");
        assert!(err.to_string().contains("no CUDA driver"), "{err}");
    }

    #[test]
    fn bytes_go_to_the_gpu_and_back_through_pinned_memory() {
        if !driver_present() {
            eprintln!("skipped: no CUDA driver (libcuda.so) on this machine");
            return;
        }
        let gpu = Gpu::open(0).unwrap();
        let data: Vec<u8> = (0..(8 << 20)).map(|i| (i * 31 % 251) as u8).collect();
        let mut staged = gpu.pinned(data.len()).unwrap();
        staged.as_mut_slice().unwrap().copy_from_slice(&data);
        let mut dev = gpu.alloc(data.len()).unwrap();
        gpu.upload(staged.as_slice().unwrap(), &mut dev).unwrap();
        let mut back = gpu.pinned(data.len()).unwrap();
        gpu.download(&dev, back.as_mut_slice().unwrap()).unwrap();
        gpu.synchronize().unwrap();
        assert!(back.as_slice().unwrap() == &data[..]);
        assert!(matches!(
            gpu.upload(&data[1..], &mut dev),
            Err(CudaError::SizeMismatch { .. })
        ));
        // Pieces at offsets, as the GPU tier writes them.
        gpu.upload_at(&data[..4096], &mut dev, 1 << 20).unwrap();
        let mut piece = vec![0u8; 4096];
        gpu.download_at(&dev, 1 << 20, &mut piece).unwrap();
        gpu.synchronize().unwrap();
        assert_eq!(piece, data[..4096]);
        assert!(matches!(
            gpu.download_at(&dev, data.len() - 10, &mut piece),
            Err(CudaError::OutOfBounds { .. })
        ));
    }
}
