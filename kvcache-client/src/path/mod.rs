//! The byte paths a connection moves blocks over, each in its own file with the same three
//! operations (`put`, `get_into`, `get_vecs`): [`tcp`] (payload in the frames), [`shm`] (the
//! node's pool mapped into this process) and `rdma` (one-sided verbs, feature `rdma`).
//! [`Channel`] pairs a connection's control channel with its path and dispatches each
//! operation once; [`staged`] holds what shared memory and RDMA puts share.

#[cfg(feature = "rdma")]
pub(crate) mod rdma;
pub(crate) mod shm;
pub(crate) mod staged;
pub(crate) mod tcp;

use kvcache_core::BlockKey;
use kvcache_core::wire::PutStatus;

use crate::config::GetOutcome;
use crate::connection::Connection;
use crate::error::ClientError;

/// How one connection moves block bytes.
pub(crate) enum Path {
    Tcp,
    Shm(shm::Attached),
    #[cfg(feature = "rdma")]
    Rdma(rdma::Attached),
}

/// A pooled connection: its control channel and its byte path.
pub(crate) struct Channel {
    pub(crate) control: Connection,
    pub(crate) path: Path,
}

impl Channel {
    /// Stores blocks given as segment lists of `lens[i]` bytes in all; `max_payload` is the
    /// node's frame limit, for the path that sends bytes in frames.
    pub(crate) async fn put(
        &mut self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
        lens: &[u64],
        max_payload: u32,
    ) -> Result<Vec<PutStatus>, ClientError> {
        let c = &mut self.control;
        match &mut self.path {
            Path::Tcp => tcp::put(c, keys, values, lens, max_payload).await,
            Path::Shm(a) => shm::put(c, a, keys, values, lens).await,
            #[cfg(feature = "rdma")]
            Path::Rdma(a) => rdma::put(c, a, keys, values, lens).await,
        }
    }

    /// Fetches blocks into caller segments, each checked before it counts as a hit.
    pub(crate) async fn get_into(
        &mut self,
        keys: &[BlockKey],
        dst: &mut [Vec<&mut [u8]>],
    ) -> Result<Vec<GetOutcome>, ClientError> {
        let c = &mut self.control;
        match &mut self.path {
            Path::Tcp => tcp::get_into(c, keys, dst).await,
            Path::Shm(a) => shm::get_into(c, a, keys, dst).await,
            #[cfg(feature = "rdma")]
            Path::Rdma(a) => rdma::get_into(c, a, keys, dst).await,
        }
    }

    /// Fetches blocks into fresh buffers; `None` for a miss.
    pub(crate) async fn get_vecs(
        &mut self,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let c = &mut self.control;
        match &mut self.path {
            Path::Tcp => tcp::get_vecs(c, keys).await,
            Path::Shm(a) => shm::get_vecs(c, a, keys).await,
            #[cfg(feature = "rdma")]
            Path::Rdma(a) => rdma::get_vecs(c, a, keys).await,
        }
    }
}
