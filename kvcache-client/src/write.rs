//! The one write every front provides: blocks given as segment lists. Puts of whole blocks
//! (one slice each) are derived from it, once, for the node client and the cluster alike.

use std::future::Future;

use kvcache_core::BlockKey;

use crate::error::ClientError;

/// Stores blocks. A front implements [`put_many_segments`](Self::put_many_segments);
/// [`put_many`](Self::put_many) comes with it.
pub trait PutBlocks: Sync {
    /// What a put reports per block: a node says how ([`kvcache_core::wire::PutStatus`]), a
    /// cluster whether at least one owner stored it.
    type Stored: Send;

    /// Stores blocks whose bytes are gathered from several segments each (e.g. one block's
    /// slices in many per-layer KV tensors): `values[i]` is key i's list of segments, in order.
    /// One report per key, in order.
    fn put_many_segments(
        &self,
        keys: &[BlockKey],
        values: &[&[&[u8]]],
    ) -> impl Future<Output = Result<Vec<Self::Stored>, ClientError>> + Send;

    /// Stores blocks of one slice each; one report per block, in order.
    fn put_many(
        &self,
        blocks: &[(BlockKey, &[u8])],
    ) -> impl Future<Output = Result<Vec<Self::Stored>, ClientError>> + Send {
        async move {
            let blocks = OneSegment::new(blocks);
            self.put_many_segments(&blocks.keys, &blocks.segments())
                .await
        }
    }
}

/// Blocks of one slice each, viewed as the segment lists the `*_segments` calls take.
struct OneSegment<'a> {
    keys: Vec<BlockKey>,
    values: Vec<[&'a [u8]; 1]>,
}

impl<'a> OneSegment<'a> {
    fn new(blocks: &[(BlockKey, &'a [u8])]) -> Self {
        Self {
            keys: blocks.iter().map(|b| b.0).collect(),
            values: blocks.iter().map(|b| [b.1]).collect(),
        }
    }

    fn segments(&self) -> Vec<&[&'a [u8]]> {
        self.values.iter().map(|v| &v[..]).collect()
    }
}
