//! The soak's cache nodes: `kvcache-server` processes (this binary's `serve-kvcache`) that
//! register in etcd, each killed with SIGKILL and restarted at the same addresses, with their
//! resident memory read from /proc and their counters from /metrics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kvcache_control::prometheus_text;

use crate::systems::{Managed, free_port, wait_listening};

/// One cache node; its process is `None` between a kill and its restart.
pub struct Node {
    pub addr: String,
    pub metrics_addr: String,
    /// Server flags besides the addresses.
    args: Vec<String>,
    process: Option<Managed>,
    /// Starts so far (1 for the first); an RSS sample names the process it came from.
    pub instance: u32,
}

impl Node {
    /// Starts a node on fresh loopback ports with `args` (memory, etcd, ...).
    pub fn start(args: Vec<String>) -> anyhow::Result<Self> {
        let mut n = Node {
            addr: format!("127.0.0.1:{}", free_port()?),
            metrics_addr: format!("127.0.0.1:{}", free_port()?),
            args,
            process: None,
            instance: 0,
        };
        n.restart()?;
        Ok(n)
    }

    /// Starts the process again where it was (after [`kill`](Self::kill)).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.process.is_none(), "node {} is running", self.addr);
        let child = Command::new(std::env::current_exe()?)
            .args(["serve-kvcache", "--listen", &self.addr])
            .args(["--metrics-listen", &self.metrics_addr])
            .args(&self.args)
            // Warnings only, unless KVCACHE_LOG says more (e.g. `info` for the warming lines).
            .env(
                "KVCACHE_LOG",
                std::env::var("KVCACHE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start kvcache-server")?;
        let mut m = Managed(child);
        wait_listening(&self.addr, &mut m.0)?;
        self.process = Some(m);
        self.instance += 1;
        Ok(())
    }

    /// kill -9: no goodbye to etcd or to clients.
    pub fn kill(&mut self) {
        if let Some(mut m) = self.process.take() {
            let _ = m.0.kill();
            let _ = m.0.wait();
        }
    }

    /// Resident memory of the running process (VmRSS), if it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.process.as_ref()?.0.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(kib * 1024)
    }

    /// One metric of the node, summed over its label sets (0 when absent).
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(&self.metrics_addr, name)
    }
}

/// One metric of the node whose /metrics is at `metrics_addr`, summed over its label sets (0
/// when absent).
pub fn metric(metrics_addr: &str, name: &str) -> anyhow::Result<f64> {
    let text = http_get(metrics_addr, "/metrics")
        .with_context(|| format!("reading the metrics at {metrics_addr}"))?;
    Ok(prometheus_text::sum(&prometheus_text::parse(&text), name, &[]).unwrap_or(0.0))
}

/// Waits until the node whose /metrics is at `metrics_addr` is registered in etcd and has
/// finished warming (`kvcache_cluster_warm_state` 2), at most `limit`; how long that took.
pub fn wait_registered_and_warm(metrics_addr: &str, limit: Duration) -> anyhow::Result<Duration> {
    use kvcache_core::metric_names as names;
    let begin = Instant::now();
    loop {
        let registered = metric(metrics_addr, names::CLUSTER_REGISTERED).unwrap_or(0.0) == 1.0;
        let warm = metric(metrics_addr, names::CLUSTER_WARM_STATE).unwrap_or(0.0) == 2.0;
        if registered && warm {
            return Ok(begin.elapsed());
        }
        if begin.elapsed() > limit {
            bail!(
                "the node of {metrics_addr} is not {} after {limit:?}",
                if registered { "warm" } else { "registered" }
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A plain HTTP/1.0 GET on loopback: the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "GET {path} answered {:?}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(body.to_string())
}
