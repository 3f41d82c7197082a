//! Landing buffers: where a TCP put's payload arrives from the socket, one chunk at a time,
//! before it is copied into the pool and checksummed in one pass.
//!
//! Reading straight into the pool made the kernel write cold pool pages and the checksum read
//! them back; a chunk-sized buffer that is reused stays in cache, and the copy into the pool
//! bypasses the caches (`Allocation::fill_chunk`), as shared-memory puts do. At 1 MiB x4 the
//! node spent 0.16 CPU-s per GB against 0.18 (benches/results/tcp-landing-ab.json).

use std::sync::Mutex;

use kvcache_core::checksum;

/// Idle buffers kept for reuse; puts beyond this many at once allocate and free their own.
const KEEP: usize = 64;

/// A free list of chunk-sized buffers shared by every connection (so memory follows the puts
/// in flight, not the connections open).
#[derive(Default)]
pub struct LandingBuffers {
    idle: Mutex<Vec<Box<[u8]>>>,
}

impl LandingBuffers {
    /// A buffer of one chunk, returned to the list when dropped.
    pub fn take(&self) -> Landing<'_> {
        let buf = self.lock().pop();
        Landing {
            buf: Some(buf.unwrap_or_else(|| vec![0u8; checksum::CHUNK].into_boxed_slice())),
            home: self,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<[u8]>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One chunk-sized buffer on loan from [`LandingBuffers`].
pub struct Landing<'a> {
    buf: Option<Box<[u8]>>,
    home: &'a LandingBuffers,
}

impl std::ops::Deref for Landing<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Landing<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().expect("present until dropped")
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let mut idle = self.home.lock();
        if idle.len() < KEEP
            && let Some(buf) = self.buf.take()
        {
            idle.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_lent_again_and_the_list_is_bounded() {
        let list = LandingBuffers::default();
        let first = list.take();
        let at = first.as_ptr();
        assert_eq!(first.len(), checksum::CHUNK);
        drop(first);
        assert_eq!(list.take().as_ptr(), at, "the idle buffer is reused");
        let many: Vec<_> = (0..KEEP + 10).map(|_| list.take()).collect();
        drop(many);
        assert_eq!(list.lock().len(), KEEP);
    }
}
