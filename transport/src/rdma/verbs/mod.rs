//! The verbs data path (feature `rdma`), on `ibverbs-sys`: one device context and protection
//! domain per process, memory registered once, and one RC queue pair per connection whose
//! owner posts one-sided READs and WRITEs.
//!
//! Completions are taken without pinning a core: a transfer polls its completion queue for a
//! short spin (a block of a few MiB lands in well under that on a 100 Gb/s link), then arms
//! the queue's completion channel and sleeps on its file descriptor through tokio until the
//! device signals, bounded by the caller's timeout. A failed or timed-out transfer marks the
//! link broken: the caller reports misses and drops the connection, never reads half-landed
//! bytes as a hit (every get is verified against its checksums after it lands anyway).
//!
//! The rooms: `error` ([`VerbsError`]), `device` (the [`Device`] and its [`Registration`]s)
//! and `link` (one queue pair, [`Link`]).

mod device;
mod error;
mod link;

pub use self::device::{Device, Registration};
pub use self::error::VerbsError;
pub use self::link::{Direction, Link};
