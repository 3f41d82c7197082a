//! The raw TCP ceiling: the same bytes through a plain loopback socket pair with the least
//! protocol possible (a 9-byte request header, a 1-byte put ack), served by one blocking thread
//! per connection in its own process. Sockets get the same options as kvcache's.
//!
//! Like a real store, the ceiling keeps one buffer per key slot (`key mod SLOTS`, up to 1 GiB in
//! all), so it moves the same working set through DRAM as the systems it bounds; answering
//! every request from one cache-hot buffer would measure the CPU cache, not a store. The slots
//! lie in the same kind of memory as kvcache's pool and the memcpy ceiling's store (one sealed
//! memfd, huge pages requested, so the host's `shmem_enabled` setting applies to all three).
//! With a heap buffer per slot, as before 2026-12-04, the kernel's copy into a put's slot cost
//! 2.4 times as much per byte as our node's, and the ceiling's puts ran at 0.6x of kvcache's;
//! anonymous memory with huge pages was better, the memfd best
//! (benches/results/tcp-ceiling-memory-ab.json).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};

use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use kvcache_transport::frame_io::{tune, write_all_vectored};
use kvcache_transport::{LockMode, MemoryRegion, ShmRegion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Managed, free_port, wait_listening};

/// Starts the ceiling server as a child process of this binary (`kvcache-bench serve-ceiling`).
pub fn start() -> anyhow::Result<(Managed, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let child = Command::new(std::env::current_exe()?)
        .args(["serve-ceiling", "--listen", &addr])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the tcp-ceiling server")?;
    let mut m = Managed(child);
    wait_listening(&addr, &mut m.0)?;
    Ok((m, addr))
}

pub const MAX_SLOTS: usize = 256;

/// Largest value a slot of the shared mapping holds; larger values use a buffer of their
/// connection's own.
const SLOT_BYTES: usize = 4 << 20;

/// Slots used for values of `len` bytes: at most 256, at most 1 GiB together.
pub fn slots_for(len: usize) -> usize {
    ((1usize << 30) / len.max(1)).clamp(1, MAX_SLOTS)
}

/// The slots' memory: one shared mapping of `MAX_SLOTS * SLOT_BYTES` (touched only as used),
/// slot `i` at `i * SLOT_BYTES`, each behind its own lock.
struct Slots {
    region: ShmRegion,
    locks: Vec<Mutex<()>>,
}

impl Slots {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            region: ShmRegion::new(
                "kvcache-bench-tcp-ceiling",
                MAX_SLOTS * SLOT_BYTES,
                LockMode::Off,
            )?,
            locks: (0..MAX_SLOTS).map(|_| Mutex::new(())).collect(),
        })
    }

    /// Runs `f` on the first `len` bytes of `key`'s slot, holding the slot's lock; `None` if
    /// `len` exceeds a slot.
    fn with<T>(&self, key: usize, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> Option<T> {
        if len > SLOT_BYTES {
            return None;
        }
        let slot = key % slots_for(len);
        let _held = self.locks[slot].lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: slot ranges are disjoint and inside the mapping (slot < MAX_SLOTS, len <=
        // SLOT_BYTES), the mapping lives as long as `self`, and the slot's lock is held until
        // `f` returns, so this is the only reference to these bytes.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(self.region.base().add(slot * SLOT_BYTES), len)
        };
        Some(f(buf))
    }
}

/// Runs the ceiling server in this process until killed.
pub fn serve(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let slots = Arc::new(Slots::new()?);
    for stream in listener.incoming() {
        let mut s = stream?;
        let slots = Arc::clone(&slots);
        std::thread::spawn(move || {
            let _ = tune(&s);
            let mut head = [0u8; 9];
            let mut own = Vec::new();
            while s.read_exact(&mut head).is_ok() {
                let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
                let key = u32::from_le_bytes([head[5], head[6], head[7], head[8]]) as usize;
                let op = head[0];
                let mut serve = |buf: &mut [u8]| match op {
                    b'P' => s.read_exact(buf).and_then(|_| s.write_all(&[1])).is_ok(),
                    b'G' => s.write_all(buf).is_ok(),
                    _ => false,
                };
                let ok = match slots.with(key, len, &mut serve) {
                    Some(ok) => ok,
                    None => {
                        own.resize(len, 0);
                        serve(&mut own)
                    }
                };
                if !ok {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// One connection to the ceiling server.
pub struct CeilingConn {
    s: TcpStream,
}

impl CeilingConn {
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        tune(&s)?;
        Ok(Self { s })
    }

    fn head(op: u8, len: usize, key: u64) -> [u8; 9] {
        let l = (len as u32).to_le_bytes();
        let k = (key as u32).to_le_bytes();
        [op, l[0], l[1], l[2], l[3], k[0], k[1], k[2], k[3]]
    }

    pub async fn put(&mut self, key: u64, value: &[u8]) -> anyhow::Result<()> {
        write_all_vectored(&mut self.s, &[&Self::head(b'P', value.len(), key), value]).await?;
        let mut ack = [0u8; 1];
        self.s.read_exact(&mut ack).await?;
        if ack[0] != 1 {
            bail!("bad ack");
        }
        Ok(())
    }

    /// Writes every request, then reads every value.
    pub async fn get(&mut self, keys: &[u64], bufs: &mut [Vec<u8>]) -> anyhow::Result<()> {
        let heads: Vec<[u8; 9]> = keys
            .iter()
            .zip(bufs.iter())
            .map(|(&k, b)| Self::head(b'G', b.len(), k))
            .collect();
        self.s.write_all(&heads.concat()).await?;
        for b in bufs.iter_mut() {
            self.s.read_exact(b).await?;
        }
        Ok(())
    }
}
