//! The systems `compare` measures, each behind the same two calls. Every server runs in its own
//! process, started and stopped by the benchmark: our server over TCP (`kvcache-tcp`) and over
//! shared memory (`kvcache-shm`), Redis (`redis`), and a raw TCP echo of the same bytes
//! (`tcp-ceiling`). The `memcpy-ceiling` copies the same bytes within this process. Mooncake
//! (`mooncake`) is driven by processes of its own, through its Python API.

pub mod ceiling;
pub mod kvcache;
pub mod memcpy;
pub mod mooncake;
pub mod redis;

use std::net::TcpListener;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One client connection to a system under test.
pub enum Conn {
    Kvcache(kvcache::KvConn),
    Redis(redis::RedisConn),
    Ceiling(ceiling::CeilingConn),
    Memcpy(memcpy::MemcpyConn),
}

/// No single benchmark operation may take longer: a stuck system fails the run, never hangs it.
const OP_DEADLINE: Duration = Duration::from_secs(10);

async fn bounded<T>(what: &str, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(OP_DEADLINE, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what} took over {OP_DEADLINE:?}"))?
}

impl Conn {
    /// Stores `value` under `key`.
    pub async fn put(&mut self, key: u64, value: &[u8]) -> anyhow::Result<()> {
        bounded("put", async {
            match self {
                Conn::Kvcache(c) => c.put(key, value).await,
                Conn::Redis(c) => c.set(key, value).await,
                Conn::Ceiling(c) => c.put(key, value).await,
                Conn::Memcpy(c) => {
                    c.put(key, value);
                    // Let the other clients of this row run between copies, as a socket wait
                    // would: without it one task hogs a worker and the spans overlap wrongly.
                    tokio::task::yield_now().await;
                    Ok(())
                }
            }
        })
        .await
    }

    /// Drops stored data where the system allows it (Redis), so rows start from the same state.
    pub async fn reset(&mut self) -> anyhow::Result<()> {
        match self {
            Conn::Redis(c) => bounded("reset", c.flush_all()).await,
            Conn::Kvcache(_) | Conn::Ceiling(_) | Conn::Memcpy(_) => Ok(()),
        }
    }

    /// Reads the values of `keys` into `bufs` (each the value's exact length) in one batch:
    /// one request for all keys where the system has one (kvcache `get_many_into`, Redis
    /// `MGET`), the requests written back to back for the TCP ceiling, copies in a row for
    /// memcpy.
    pub async fn get(&mut self, keys: &[u64], bufs: &mut [Vec<u8>]) -> anyhow::Result<()> {
        bounded("get", async {
            match self {
                Conn::Kvcache(c) => c.get(keys, bufs).await,
                Conn::Redis(c) => c.get(keys, bufs).await,
                Conn::Ceiling(c) => c.get(keys, bufs).await,
                Conn::Memcpy(c) => {
                    for (&k, b) in keys.iter().zip(bufs.iter_mut()) {
                        c.get(k, b);
                    }
                    tokio::task::yield_now().await;
                    Ok(())
                }
            }
        })
        .await
    }
}

/// A child process stopped when dropped: SIGTERM (so our server removes its socket file),
/// then SIGKILL if it has not exited within 5 s.
pub struct Managed(pub Child);

impl Drop for Managed {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user and system, every thread) a process has used so far, from
/// `/proc/PID/stat` (`"self"` for this one); `None` where that cannot be read.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces, start at field 3 (the state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

/// A free loopback port (bound and released; the child binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_listening(addr: &str, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("process exited with {status} before listening on {addr}");
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(anyhow::anyhow!("nothing listening on {addr} after 20 s"))
        .context("system under test did not start")
}

/// Writes the key into the first and last 8 bytes of a value, so a reader can check it got
/// the right block without a full comparison on the hot path.
pub fn stamp(value: &mut [u8], key: u64) {
    let n = value.len();
    value[..8].copy_from_slice(&key.to_le_bytes());
    value[n - 8..].copy_from_slice(&key.to_le_bytes());
}

/// Checks a value read back carries `key`'s stamp.
pub fn check_stamp(value: &[u8], key: u64) -> anyhow::Result<()> {
    let n = value.len();
    if value[..8] != key.to_le_bytes() || value[n - 8..] != key.to_le_bytes() {
        bail!("wrong bytes returned for key {key}");
    }
    Ok(())
}
