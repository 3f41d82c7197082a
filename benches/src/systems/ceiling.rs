//! The raw TCP ceiling: the same bytes through a plain loopback socket pair with the least
//! protocol possible (a 9-byte request header, a 1-byte put ack), served by one blocking thread
//! per connection in its own process. Sockets get the same options as kvcache's.
//!
//! Like a real store, the ceiling keeps one buffer per key slot (`key mod SLOTS`, up to 1 GiB in
//! all), so it moves the same working set through DRAM as the systems it bounds; answering
//! every request from one cache-hot buffer would measure the CPU cache, not a store.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};

use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use kvcache_transport::frame_io::{tune, write_all_vectored};
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

/// Slots used for values of `len` bytes: at most 256, at most 1 GiB together.
pub fn slots_for(len: usize) -> usize {
    ((1usize << 30) / len.max(1)).clamp(1, MAX_SLOTS)
}

/// Runs the ceiling server in this process until killed.
pub fn serve(addr: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let slots: Arc<Vec<Mutex<Vec<u8>>>> =
        Arc::new((0..MAX_SLOTS).map(|_| Mutex::new(Vec::new())).collect());
    for stream in listener.incoming() {
        let mut s = stream?;
        let slots = Arc::clone(&slots);
        std::thread::spawn(move || {
            let _ = tune(&s);
            let mut head = [0u8; 9];
            while s.read_exact(&mut head).is_ok() {
                let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
                let key = u32::from_le_bytes([head[5], head[6], head[7], head[8]]) as usize;
                let mut buf = slots[key % slots_for(len)]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if buf.len() < len {
                    buf.resize(len, 0x5a);
                }
                let ok = match head[0] {
                    b'P' => s
                        .read_exact(&mut buf[..len])
                        .and_then(|_| s.write_all(&[1])),
                    b'G' => s.write_all(&buf[..len]),
                    _ => return,
                };
                if ok.is_err() {
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
