//! The `kvcache-server` command: logging, runtime, signals around [`crate::server`].

use std::io::IsTerminal;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::settings::Settings;

/// Runs a server from parsed command-line settings until SIGTERM or SIGINT: the whole
/// `kvcache-server` binary, callable from other binaries (the benchmark starts it this way).
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let settings = settings.merge_file()?;
    let filter = settings
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cfg = settings.resolve()?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = settings.threads {
        rt.worker_threads(n.max(1));
    }
    rt.build()?.block_on(async {
        // Handlers first: a SIGTERM that arrives as soon as we report ready must still mean a
        // graceful shutdown, not the default action (immediate death).
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let server = crate::server::RunningServer::start(&cfg).await?;
        // One line on stdout when ready, for scripts and tests that start us on port 0.
        let metrics = server
            .metrics_addr()
            .map_or("off".to_string(), |a| a.to_string());
        let shm = server
            .shm_socket()
            .map_or("off".to_string(), |p| p.display().to_string());
        println!(
            "kvcache-server ready data={} metrics={metrics} shm={shm}",
            server.data_addr()
        );
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = which,
            "shutting down: no new connections, finishing in-flight requests"
        );
        server.shutdown().await;
        Ok(())
    })
}
