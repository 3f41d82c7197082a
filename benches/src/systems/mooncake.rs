//! Mooncake Store, measured in the same interleaved run as our server. Mooncake is driven only
//! through its own Python API: `benches/mooncake/mooncake_bench.py serve`, run by the Python of
//! a venv with PyPI's `mooncake-transfer-engine-non-cuda`, starts `mooncake_master` and a holder
//! process that mounts the pool, and measures each slice with worker processes of its own (each a
//! client with no segment, so every value crosses Mooncake's TCP transport). This side sends it
//! one JSON line per command and reads one JSON line back.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The driver, built into this binary so `compare` runs from any directory.
const SCRIPT: &str = include_str!("../../mooncake/mooncake_bench.py");

/// Master and holder start, and each worker sets up its client and registers its buffer.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How to make the venv `--mooncake-venv` names.
pub const VENV_HINT: &str = "python3 -m venv DIR && DIR/bin/pip install \
     mooncake-transfer-engine-non-cuda==0.3.13 nvidia-cuda-runtime-cu12 (the second because \
     Mooncake's non-CUDA store.so still links libcudart.so.12; no GPU is used)";

/// A running `mooncake_bench.py serve` (with its master and holder).
pub struct Mooncake {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    script: PathBuf,
    /// Mooncake's own logs (the C++ library writes to stderr).
    pub log: PathBuf,
}

/// One measured slice: every call's latency and the longest worker's measured span.
pub struct Slice {
    pub lat_ns: Vec<u64>,
    pub span: Duration,
}

#[derive(Deserialize)]
struct Answer {
    error: Option<String>,
    #[serde(default)]
    lat_ns: Vec<u64>,
    #[serde(default)]
    span_s: f64,
    #[serde(default)]
    errors: u64,
    #[serde(default)]
    wrong: u64,
    #[serde(default)]
    first_error: String,
}

impl Mooncake {
    /// Starts the driver with the venv's Python and a pool of `pool_bytes`.
    pub async fn start(venv: &Path, pool_bytes: u64) -> anyhow::Result<Self> {
        let python = venv.join("bin").join("python");
        if !python.exists() {
            bail!(
                "no Python at {}: --mooncake-venv names a venv made with: {VENV_HINT}",
                python.display()
            );
        }
        let tag = format!("kvcache-bench-mooncake-{}", std::process::id());
        let script = std::env::temp_dir().join(format!("{tag}.py"));
        std::fs::write(&script, SCRIPT)
            .with_context(|| format!("cannot write {}", script.display()))?;
        let log = std::env::temp_dir().join(format!("{tag}.log"));
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = tokio::process::Command::new(&python)
            .arg(&script)
            .args(["serve", "--segment-bytes", &pool_bytes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", python.display()))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .context("no stdout of the Mooncake driver")?;
        let mut m = Mooncake {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
            script,
            log,
        };
        let ready = m.read_line(START_TIMEOUT, "start").await?;
        if !ready.contains("\"ready\"") {
            bail!("the Mooncake driver said {ready:?} instead of ready");
        }
        Ok(m)
    }

    /// Starts the workers of a row (and, for gets, puts its working set).
    pub async fn row(
        &mut self,
        op: &str,
        size: usize,
        batch: usize,
        concurrency: usize,
    ) -> anyhow::Result<()> {
        let cmd = json!({"cmd": "row", "op": op, "size": size, "batch": batch,
            "concurrency": concurrency});
        self.call(&cmd, START_TIMEOUT).await.map(drop)
    }

    /// One slice of `seconds` (after the same warm-up as ours); fails on any error or wrong byte.
    pub async fn slice(&mut self, seconds: f64) -> anyhow::Result<Slice> {
        let cmd = json!({"cmd": "slice", "seconds": seconds});
        let a = self
            .call(&cmd, START_TIMEOUT + Duration::from_secs_f64(seconds * 2.0))
            .await?;
        if a.wrong > 0 {
            bail!(
                "mooncake returned {} wrong bytes: {}",
                a.wrong,
                a.first_error
            );
        }
        if a.errors > 0 {
            bail!("mooncake failed {} values: {}", a.errors, a.first_error);
        }
        Ok(Slice {
            lat_ns: a.lat_ns,
            span: Duration::from_secs_f64(a.span_s.max(0.0)),
        })
    }

    /// Ends the row's workers (they remove their keys, so the next row starts empty).
    pub async fn end_row(&mut self) -> anyhow::Result<()> {
        self.call(&json!({"cmd": "end"}), START_TIMEOUT)
            .await
            .map(drop)
    }

    async fn call(&mut self, cmd: &serde_json::Value, timeout: Duration) -> anyhow::Result<Answer> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the Mooncake driver's stdin is closed")?;
        stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        stdin.flush().await?;
        let what = cmd["cmd"].as_str().unwrap_or("command");
        let line = self.read_line(timeout, what).await?;
        let a: Answer = serde_json::from_str(&line)
            .with_context(|| format!("the Mooncake driver answered {line:?}"))?;
        if let Some(e) = a.error {
            bail!("mooncake {what}: {e} (logs: {})", self.log.display());
        }
        Ok(a)
    }

    async fn read_line(&mut self, timeout: Duration, what: &str) -> anyhow::Result<String> {
        match tokio::time::timeout(timeout, self.lines.next_line()).await {
            Err(_) => bail!(
                "the Mooncake driver did not answer `{what}` within {timeout:?} (logs: {})",
                self.log.display()
            ),
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!(
                "the Mooncake driver exited during `{what}`; see {}",
                self.log.display()
            ),
            Ok(Err(e)) => Err(e).context("reading the Mooncake driver"),
        }
    }
}

impl Drop for Mooncake {
    /// Closes stdin, which ends the driver's loop: it stops its workers, holder and master. A
    /// driver that does not leave within 20 s gets SIGTERM (its clean-up still runs), then SIGKILL.
    fn drop(&mut self) {
        self.stdin = None;
        let mut waited = Duration::ZERO;
        let step = Duration::from_millis(50);
        while waited < Duration::from_secs(25) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if waited == Duration::from_secs(20)
                && let Some(pid) = self.child.id()
            {
                // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            std::thread::sleep(step);
            waited += step;
        }
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.script);
    }
}
