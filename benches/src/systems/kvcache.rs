//! Our server, over TCP or shared memory, driven through `kvcache-client`'s zero-copy get path.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use kvcache_client::{Client, ClientConfig, GetOutcome, TransportChoice};
use kvcache_core::BlockKey;
use kvcache_core::wire::PutStatus;

use super::{Managed, free_port, wait_listening};

/// Starts `kvcache-server` as a child process of this binary (`kvcache-bench serve-kvcache`).
pub fn start(memory: &str) -> anyhow::Result<(Managed, String)> {
    start_with(memory, &[])
}

/// [`start`] with more server flags.
pub fn start_with(memory: &str, extra: &[&str]) -> anyhow::Result<(Managed, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args([
            "serve-kvcache",
            "--listen",
            &addr,
            "--metrics-listen",
            "off",
            "--memory",
            memory,
        ])
        .args(extra)
        .env("KVCACHE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start kvcache-server")?;
    let mut m = Managed(child);
    wait_listening(&addr, &mut m.0)?;
    Ok((m, addr))
}

/// One client (with a single pooled connection) per benchmark task.
pub struct KvConn {
    client: Client,
}

impl KvConn {
    pub async fn connect(addr: &str, transport: TransportChoice) -> anyhow::Result<Self> {
        let mut cfg = ClientConfig::new(addr);
        cfg.max_connections = 1;
        cfg.transport = transport;
        Ok(Self {
            client: Client::connect(cfg).await?,
        })
    }

    pub async fn put(&mut self, key: u64, value: &[u8]) -> anyhow::Result<()> {
        match self.client.put(BlockKey(key as u128), value).await? {
            PutStatus::Stored | PutStatus::AlreadyPresent => Ok(()),
            other => bail!("put refused: {other:?}"),
        }
    }

    pub async fn get(&mut self, keys: &[u64], bufs: &mut [Vec<u8>]) -> anyhow::Result<()> {
        let ks: Vec<BlockKey> = keys.iter().map(|&k| BlockKey(k as u128)).collect();
        let mut dst: Vec<Vec<&mut [u8]>> = bufs.iter_mut().map(|b| vec![&mut b[..]]).collect();
        let out = self.client.get_many_into(&ks, &mut dst).await?;
        match out.iter().position(|o| *o != GetOutcome::Hit) {
            None => Ok(()),
            Some(i) => bail!("get of key {}: {:?}", keys[i], out[i]),
        }
    }
}
