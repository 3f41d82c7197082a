//! The `kvcache-autoscaler` binary: reads the config, runs one loop per target, serves /status.

use anyhow::Context;
use clap::Parser;
use kvcache_autoscaler::config::{Args, Config};
use kvcache_autoscaler::http;
use kvcache_autoscaler::scaler::Scaler;
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kvcache_control::logging::init();
    let config = Config::load(&Args::parse())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    for t in &config.targets {
        info!(
            target = %t.name,
            algorithm = t.rules.algorithm.name(),
            actuator = t.actuator.name(),
            min = t.rules.min_replicas,
            max = t.rules.max_replicas,
            metrics = ?t.rules.metrics.iter().map(|m| m.describe()).collect::<Vec<_>>(),
            "target"
        );
    }
    let scaler = Scaler::new(&config);
    for (i, t) in config.targets.iter().enumerate() {
        tokio::spawn(scaler.clone().run_target(i, t.clone()));
    }
    http::serve(scaler, listener).await?;
    Ok(())
}
