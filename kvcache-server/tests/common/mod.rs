//! Test harness: the real `kvcache-server` binary on ephemeral loopback ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvcache_client::{Cluster, GetOutcome, PutBlocks};
use kvcache_core::BlockKey;
use kvcache_core::wire::{self, ErrorCode, ErrorReply, FrameHeader, FrameLimits, Op};
use prost::Message;

/// A running server process, killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub data: String,
    pub metrics: String,
    /// The shared-memory socket's path, or "off".
    pub shm: String,
}

/// The server binary on an ephemeral data port, with no metrics listener, no mlock and
/// error-level logs, plus `args`: for runs that are expected to fail at start, or that need
/// their own environment.
pub fn server_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvcache-server"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--mlock",
        "off",
    ])
    .args(args)
    .env("KVCACHE_LOG", "error");
    cmd
}

impl ServerProcess {
    /// Starts the binary with `args` (plus ephemeral ports) and waits for its ready line.
    pub fn start(args: &[&str]) -> Self {
        Self::start_at("127.0.0.1:0", args)
    }

    /// Starts the binary on a given data address (to restart a node where it was).
    pub fn start_at(listen: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvcache-server"))
            .args([
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
                "--mlock",
                "off",
            ])
            .args(args)
            .env("KVCACHE_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kvcache-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read ready line");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in ready line {line:?}"))
                .to_string()
        };
        let (data, metrics, shm) = (field("data="), field("metrics="), field("shm="));
        Self {
            child,
            data,
            metrics,
            shm,
        }
    }

    /// The body of an HTTP request to the metrics listener.
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.metrics).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        (
            status,
            resp.split_once("\r\n\r\n")
                .map(|x| x.1.to_string())
                .unwrap_or_default(),
        )
    }

    /// The value of one sample line of /metrics (`name{labels}` exactly as rendered).
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.http("GET", "/metrics");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("metric {sample} not found"))
            .parse()
            .unwrap()
    }

    /// Polls a metric until `pred` holds or 10 s pass.
    pub fn wait_metric(&self, sample: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(sample);
            if pred(v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed server cannot remove its socket file; a later server would replace it as
        // stale, but tests should not leave files behind.
        if self.shm != "off" {
            let _ = std::fs::remove_file(&self.shm);
        }
    }
}

/// Deterministic bytes for a key, so any reader can verify any block.
pub fn content(key: BlockKey, len: usize) -> Vec<u8> {
    let mut x = key.low64() | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A put batch for `(key, length)` blocks, borrowing `values` (built with [`contents`]).
pub fn batch<'a>(blocks: &[(BlockKey, usize)], values: &'a [Vec<u8>]) -> Vec<(BlockKey, &'a [u8])> {
    blocks
        .iter()
        .zip(values)
        .map(|(b, v)| (b.0, &v[..]))
        .collect()
}

/// The deterministic content of each `(key, length)` block.
pub fn contents(blocks: &[(BlockKey, usize)]) -> Vec<Vec<u8>> {
    blocks.iter().map(|&(k, l)| content(k, l)).collect()
}

/// A small deterministic generator for test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let x = self.0;
        (x ^ (x >> 33)).wrapping_mul(0xff51afd7ed558ccd)
    }

    pub fn key(&mut self) -> BlockKey {
        BlockKey(((self.next() as u128) << 64) | self.next() as u128)
    }
}

// Cluster helpers: random blocks written and read back through `kvcache_client::Cluster`.

/// `n` random keys with lengths from 1 byte to 16 KiB.
pub fn blocks(seed: u64, n: usize) -> Vec<(BlockKey, usize)> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| (rng.key(), 1 + (rng.next() % 16_384) as usize))
        .collect()
}

pub async fn put_all(c: &Cluster, blocks: &[(BlockKey, usize)]) {
    for chunk in blocks.chunks(50) {
        let values = contents(chunk);
        let batch = batch(chunk, &values);
        assert!(c.put_many(&batch).await.unwrap().iter().all(|s| *s));
    }
}

/// Stores `content(key, len)` under every key through one node's client, 8 keys a call.
pub async fn put_blocks(c: &kvcache_client::Client, keys: &[BlockKey], len: usize) {
    for chunk in keys.chunks(8) {
        let values: Vec<Vec<u8>> = chunk.iter().map(|k| content(*k, len)).collect();
        let batch: Vec<(BlockKey, &[u8])> = chunk
            .iter()
            .zip(&values)
            .map(|(k, v)| (*k, &v[..]))
            .collect();
        c.put_many(&batch).await.unwrap();
    }
}

/// Reads every key back through one node's client, 8 keys a call, checks every hit's bytes
/// against `content(key, len)`, and returns how many were hits.
pub async fn read_blocks(c: &kvcache_client::Client, keys: &[BlockKey], len: usize) -> usize {
    let mut hits = 0;
    for chunk in keys.chunks(8) {
        for (k, v) in chunk.iter().zip(c.get_many(chunk).await.unwrap()) {
            if let Some(v) = v {
                assert_eq!(v, content(*k, len), "wrong bytes for {k}");
                hits += 1;
            }
        }
    }
    hits
}

/// Reads every block back into fresh buffers; returns the outcomes and checks every hit's bytes.
pub async fn get_all(c: &Cluster, blocks: &[(BlockKey, usize)]) -> Vec<GetOutcome> {
    let mut out = Vec::new();
    for chunk in blocks.chunks(40) {
        let keys: Vec<BlockKey> = chunk.iter().map(|b| b.0).collect();
        let mut bufs: Vec<Vec<u8>> = chunk.iter().map(|b| vec![0u8; b.1]).collect();
        let mut dst: Vec<Vec<&mut [u8]>> = bufs.iter_mut().map(|b| vec![&mut b[..]]).collect();
        let got = c
            .get_many_into(&keys, &mut dst)
            .await
            .expect("a cluster read never errors");
        for ((o, (k, l)), b) in got.iter().zip(chunk).zip(&bufs) {
            if *o == GetOutcome::Hit {
                assert_eq!(b, &content(*k, *l), "wrong bytes for {k}");
            }
        }
        out.extend(got);
    }
    out
}

/// A real etcd (Debian's `etcd-server`) on free loopback ports with its own data directory,
/// killed on drop.
#[allow(unused_imports)]
pub use kvcache_membership::testing::{EtcdProcess, free_port};

/// Polls `cond` every 50 ms until it holds or `within` passes; returns how long it took.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Writes `blocks` through `c` from `writers` concurrent tasks.
pub async fn put_concurrently(
    c: &std::sync::Arc<Cluster>,
    blocks: &[(BlockKey, usize)],
    writers: usize,
) {
    let tasks: Vec<_> = blocks
        .chunks(blocks.len().div_ceil(writers))
        .map(|part| {
            let (c, part) = (std::sync::Arc::clone(c), part.to_vec());
            tokio::spawn(async move { put_all(&c, &part).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Asserts every server holds exactly the blocks the client's ring makes it primary for (one
/// owner per block), and that the ring spreads them within ±30% of the mean. The exact count is
/// the check of placement; the bound only catches a broken ring: how even a ring of 512
/// virtual nodes per member is depends on the members' ids, here ephemeral ports (a ±15% bound
/// failed now and then, with every block where the ring put it).
pub fn assert_spread_follows_ring(
    c: &Cluster,
    servers: &[ServerProcess],
    blocks: &[(BlockKey, usize)],
) {
    let mut share: std::collections::HashMap<String, usize> = Default::default();
    for (key, _) in blocks {
        let owner = c
            .owners(*key)
            .into_iter()
            .next()
            .expect("a ring with members");
        *share.entry(owner).or_default() += 1;
    }
    let mean = blocks.len() as f64 / servers.len() as f64;
    for s in servers {
        let stored = s.metric("kvcache_blocks_stored");
        let expected = share.get(&s.data).copied().unwrap_or(0) as f64;
        assert_eq!(
            stored, expected,
            "{} holds {stored} blocks; the ring makes it primary for {expected} (ring shares: {share:?})",
            s.data
        );
        assert!(
            (stored - mean).abs() <= 0.3 * mean,
            "{} nodes: one holds {stored} blocks, mean {mean}",
            servers.len()
        );
    }
}

/// Writes `blocks` through `c` and reads every one back: all must hit, with the right bytes.
pub async fn put_then_read_all(c: &Cluster, blocks: &[(BlockKey, usize)]) {
    put_all(c, blocks).await;
    let got = get_all(c, blocks).await;
    assert!(
        got.iter().all(|o| *o == GetOutcome::Hit),
        "every block written reads back"
    );
}

/// Writes one request frame (header and control message, no payload) to a raw socket, as a
/// client the library would never be.
pub fn send_request(s: &mut impl Write, op: Op, id: u32, msg: &impl Message) {
    let control = msg.encode_to_vec();
    let mut frame = FrameHeader::request(op, id, control.len(), 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&control);
    s.write_all(&frame).unwrap();
}

/// Reads one reply frame from a raw socket: (header, control), or None if the node closed
/// the connection. The payload, if any, is left unread.
pub fn read_frame(s: &mut impl Read) -> Option<(FrameHeader, Vec<u8>)> {
    let mut head = [0u8; wire::HEADER_LEN];
    s.read_exact(&mut head).ok()?;
    let limits = FrameLimits {
        max_control: 64 << 20,
        max_payload: u32::MAX,
    };
    let h = FrameHeader::decode(&head, &limits).unwrap();
    let mut control = vec![0u8; h.control_len as usize];
    s.read_exact(&mut control).ok()?;
    Some((h, control))
}

/// The code and message of an `ErrorReply` control message.
pub fn error_reply(control: &[u8]) -> (ErrorCode, String) {
    let err = ErrorReply::decode(control).unwrap();
    (ErrorCode::try_from(err.code).unwrap(), err.message)
}

/// The code of an `ErrorReply` control message.
pub fn error_code(control: &[u8]) -> ErrorCode {
    error_reply(control).0
}
