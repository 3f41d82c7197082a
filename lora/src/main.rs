//! The `kvcache-lora` binary: reads the config, starts the reconcile loop, serves the API.

use anyhow::Context;
use clap::Parser;
use kvcache_lora::config::{Args, Config};
use kvcache_lora::http;
use kvcache_lora::manager::Manager;
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVCACHE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = Config::load(Args::parse())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    info!(
        listen = %listener.local_addr()?,
        instances = ?config.instances,
        discover = ?config.discover,
        policy = config.settings.policy.name(),
        adapters = config.adapters.len(),
        "kvcache-lora starting"
    );
    let manager = Manager::new(config);
    tokio::spawn(manager.clone().run());
    http::serve(manager, listener).await?;
    Ok(())
}
