//! The `kvcache-lora` binary: reads the config, starts the reconcile loop, serves the API.

use anyhow::Context;
use clap::Parser;
use kvcache_lora::config::{Args, Config};
use kvcache_lora::http;
use kvcache_lora::manager::Manager;
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kvcache_control::logging::init();
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
