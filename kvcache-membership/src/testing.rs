//! A real etcd for tests (feature `test-support`): Debian's `etcd` binary on free loopback
//! ports and a private data directory, restartable in place, killed and removed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An etcd process of one test.
pub struct EtcdProcess {
    child: Option<Child>,
    pub client_url: String,
    peer_url: String,
    data_dir: std::path::PathBuf,
}

impl EtcdProcess {
    /// Starts etcd, or returns None (after saying why) when the binary is missing and
    /// KVCACHE_REQUIRE_ETCD is not 1 (`scripts/test.sh` sets it and installs etcd-server).
    pub fn start() -> Option<Self> {
        if Command::new("etcd").arg("--version").output().is_err() {
            let why = "etcd not found: install Debian's etcd-server (scripts/test.sh does)";
            assert!(
                std::env::var("KVCACHE_REQUIRE_ETCD").as_deref() != Ok("1"),
                "{why}"
            );
            eprintln!("skipping: {why}");
            return None;
        }
        let data_dir = std::env::temp_dir().join(format!(
            "kvcache-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        let mut etcd = Self {
            child: None,
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            data_dir,
        };
        etcd.restart();
        Some(etcd)
    }

    /// (Re)starts etcd on its ports and data directory and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--listen-client-urls",
                &self.client_url,
                "--advertise-client-urls",
                &self.client_url,
                "--listen-peer-urls",
                &self.peer_url,
                "--initial-advertise-peer-urls",
                &self.peer_url,
                "--initial-cluster",
                &format!("test={}", self.peer_url),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let addr = self.client_url.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = TcpStream::connect(&addr).and_then(|mut s| {
                let body = "{\"key\":\"AA==\"}";
                write!(
                    s,
                    "POST /v3/kv/range HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )?;
                let mut r = String::new();
                s.read_to_string(&mut r)?;
                // Any answer: with authentication on, an anonymous range is refused.
                Ok(r.starts_with("HTTP/1.1 "))
            });
            if ok.unwrap_or(false) {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not start in 20 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes the data directory of a stopped etcd: the next start knows no keys or leases.
    pub fn wipe(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
