//! Redis (Debian's `redis-server`), persistence off, spoken to in RESP by a minimal client.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{Managed, free_port, wait_listening};

/// Starts `redis-server` from PATH on a free loopback port with persistence off and an LRU
/// memory cap equal to our pool, so both evict under the same budget.
pub fn start(maxmemory_bytes: u64) -> anyhow::Result<(Managed, String)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
        .args(["--protected-mode", "no", "--maxmemory", &maxmemory_bytes.to_string()])
        .args(["--maxmemory-policy", "allkeys-lru", "--daemonize", "no", "--loglevel", "warning"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "redis-server not found on PATH: install it (`apt-get install redis-server`) or leave \
                     redis out with --systems kvcache-tcp,tcp-ceiling"
                )
            } else {
                anyhow::Error::new(e).context("cannot start redis-server")
            }
        })?;
    let mut m = Managed(child);
    let addr = format!("127.0.0.1:{port}");
    wait_listening(&addr, &mut m.0)?;
    Ok((m, addr))
}

/// One RESP connection.
pub struct RedisConn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    line: Vec<u8>,
}

impl RedisConn {
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to redis at {addr}"))?;
        s.set_nodelay(true)?;
        let (rd, wr) = s.into_split();
        Ok(Self {
            rd: BufReader::with_capacity(64 * 1024, rd),
            wr,
            line: Vec::new(),
        })
    }

    async fn read_line(&mut self) -> anyhow::Result<&[u8]> {
        self.line.clear();
        self.rd.read_until(b'\n', &mut self.line).await?;
        if !self.line.ends_with(b"\r\n") {
            bail!("redis closed the connection");
        }
        Ok(&self.line[..self.line.len() - 2])
    }

    /// Empties the database, so every row starts from the same state and memory stays bounded.
    pub async fn flush_all(&mut self) -> anyhow::Result<()> {
        self.wr.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n").await?;
        let line = self.read_line().await?;
        if line != b"+OK" {
            bail!("redis FLUSHALL failed: {}", String::from_utf8_lossy(line));
        }
        Ok(())
    }

    pub async fn set(&mut self, key: u64, value: &[u8]) -> anyhow::Result<()> {
        let key = key.to_string();
        let head = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
            key.len(),
            value.len()
        );
        self.wr.write_all(head.as_bytes()).await?;
        self.wr.write_all(value).await?;
        self.wr.write_all(b"\r\n").await?;
        let line = self.read_line().await?;
        if line != b"+OK" {
            bail!("redis SET failed: {}", String::from_utf8_lossy(line));
        }
        Ok(())
    }

    /// `MGET` of every key, each value read straight into its buffer.
    pub async fn get(&mut self, keys: &[u64], bufs: &mut [Vec<u8>]) -> anyhow::Result<()> {
        let mut req = format!("*{}\r\n$4\r\nMGET\r\n", keys.len() + 1);
        for k in keys {
            let k = k.to_string();
            req.push_str(&format!("${}\r\n{k}\r\n", k.len()));
        }
        self.wr.write_all(req.as_bytes()).await?;
        let count = self.reply_len(b'*').await?;
        if count != keys.len() as i64 {
            bail!("redis MGET answered {count} values for {} keys", keys.len());
        }
        for (key, buf) in keys.iter().zip(bufs.iter_mut()) {
            let len = self.reply_len(b'$').await?;
            if len != buf.len() as i64 {
                bail!("redis GET {key}: {len} bytes, expected {}", buf.len());
            }
            self.rd.read_exact(buf).await?;
            let mut crlf = [0u8; 2];
            self.rd.read_exact(&mut crlf).await?;
        }
        Ok(())
    }

    /// Reads a `<kind><number>` reply line (`*` array length, `$` bulk length).
    async fn reply_len(&mut self, kind: u8) -> anyhow::Result<i64> {
        let line = self.read_line().await?;
        std::str::from_utf8(line.strip_prefix(&[kind]).unwrap_or(b"x"))
            .ok()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected redis reply {}", String::from_utf8_lossy(line)))
    }
}
