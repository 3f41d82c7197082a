//! What a client of one node does with memory registered for RDMA: the caller's host memory
//! (gets land there, puts leave from there, no copy) and, with GPU-direct, GPU memory (READ
//! into and WRITE from device memory, the node checking what this process cannot read).
//! Without an RDMA connection registration is a no-op and GPU-direct is an error that says to
//! stage through pinned host memory.

use kvcache_core::BlockKey;
use kvcache_core::wire::PutStatus;

use super::Client;
use crate::config::{DeviceSpan, GetOutcome};
#[cfg(feature = "rdma")]
use crate::deadline;
use crate::error::{self, ClientError};
#[cfg(feature = "rdma")]
use crate::path::Path;
#[cfg(feature = "rdma")]
use crate::path::rdma;

impl Client {
    /// Registers `len` bytes at `addr` (e.g. a KV cache tensor) with this client's RDMA
    /// device, once: gets then land straight in that memory and puts read straight from it.
    /// Does nothing (and succeeds) when the client does not use RDMA.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Client::unregister_memory`] or the client is dropped.
    pub unsafe fn register_memory(&self, addr: usize, len: usize) -> Result<(), ClientError> {
        #[cfg(feature = "rdma")]
        if let Some(shared) = &self.inner.rdma {
            // SAFETY: upheld by the caller.
            return unsafe { shared.register(addr, len) };
        }
        let _ = (addr, len);
        Ok(())
    }

    /// Registers `len` bytes of `gpu`'s memory at device address `addr` (e.g. a KV cache
    /// tensor) for GPU-direct RDMA, once: [`Client::get_many_into_gpu`] then READs blocks
    /// straight into it and [`Client::put_many_from_gpu`] WRITEs them straight from it.
    /// Returns how it was registered (dmabuf, else NVIDIA's peer-memory module). Fails, saying
    /// why, when this client does not use RDMA or the stack cannot register GPU memory: then
    /// stage through pinned host memory.
    ///
    /// # Safety
    /// The memory must stay allocated until [`Client::unregister_memory`] or the client is
    /// dropped.
    #[cfg(all(feature = "rdma", feature = "cuda"))]
    pub unsafe fn register_gpu_memory(
        &self,
        gpu: &kvcache_transport::cuda::Gpu,
        addr: u64,
        len: usize,
    ) -> Result<kvcache_transport::rdma::gpudirect::Method, ClientError> {
        let Some(shared) = &self.inner.rdma else {
            return Err(self.no_gpu_direct());
        };
        // SAFETY: upheld by the caller.
        unsafe { shared.register_gpu(gpu, addr, len) }
    }

    /// Fetches blocks straight into GPU memory registered with
    /// [`Client::register_gpu_memory`] (GPU-direct RDMA): `dst[i]` lists key i's destination
    /// spans (device address, length), filled in order. The node checks each block as it leases
    /// it, since this process cannot read GPU memory to check it. Without an RDMA connection
    /// this is an error that says to stage through pinned host memory.
    pub async fn get_many_into_gpu(
        &self,
        keys: &[BlockKey],
        dst: &[Vec<DeviceSpan>],
    ) -> Result<Vec<GetOutcome>, ClientError> {
        error::same_len(keys.len(), dst.len(), "destinations")?;
        #[cfg(feature = "rdma")]
        if self.inner.rdma.is_some() {
            return deadline::within(self.inner.cfg.timeout, async {
                let mut out = Vec::with_capacity(keys.len());
                let max_keys = self.inner.cfg.max_get_keys;
                for (chunk, dst) in keys.chunks(max_keys).zip(dst.chunks(max_keys)) {
                    let got = with_conn!(self, "get", |c| match &mut c.path {
                        Path::Rdma(a) => rdma::get_into_gpu(&mut c.control, a, chunk, dst).await,
                        _ => Err(self.no_gpu_direct()),
                    })?;
                    out.extend(got);
                }
                Ok(out)
            })
            .await;
        }
        Err(self.no_gpu_direct())
    }

    /// Stores blocks straight from GPU memory registered with [`Client::register_gpu_memory`]
    /// (GPU-direct RDMA): `src[i]` lists key i's spans (device address, length), gathered in
    /// order. Without an RDMA connection this is an error that says to stage through pinned
    /// host memory.
    pub async fn put_many_from_gpu(
        &self,
        keys: &[BlockKey],
        src: &[Vec<DeviceSpan>],
    ) -> Result<Vec<PutStatus>, ClientError> {
        error::same_len(keys.len(), src.len(), "sources")?;
        let lens: Vec<u64> = src.iter().map(|s| s.iter().map(|s| s.1).sum()).collect();
        self.check_lens(&lens)?;
        #[cfg(feature = "rdma")]
        if self.inner.rdma.is_some() {
            return with_conn!(self, "put", |c| match &mut c.path {
                Path::Rdma(a) => rdma::put_from_gpu(&mut c.control, a, keys, src, &lens).await,
                _ => Err(self.no_gpu_direct()),
            });
        }
        Err(self.no_gpu_direct())
    }

    fn no_gpu_direct(&self) -> ClientError {
        ClientError::InvalidArgument(format!(
            "GPU-direct needs an RDMA connection to the node, and this client uses {}; \
             stage GPU memory through pinned host memory",
            self.path()
        ))
    }

    /// Drops the registration made at `addr`; false if there was none.
    pub fn unregister_memory(&self, addr: usize) -> bool {
        #[cfg(feature = "rdma")]
        if let Some(shared) = &self.inner.rdma {
            return shared.unregister(addr);
        }
        let _ = addr;
        false
    }
}
