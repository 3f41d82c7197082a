//! The `kvcache-gateway` binary: reads the config, loads the tokenizer, starts the probes, the
//! KV-event feeds and the shared-tier connection, and serves.

use anyhow::Context;
use clap::Parser;
use kvcache_gateway::config::{Args, Config};
use kvcache_gateway::prompt::PromptTokenizer;
use kvcache_gateway::state::Gateway;
use kvcache_gateway::{discovery, feed, http, lora_feed, probe};
use tracing::{info, warn};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kvcache_control::logging::init();
    let config = Config::load(Args::parse())?;
    let tokenizer = match &config.tokenizer {
        Some(dir) => {
            let t = PromptTokenizer::load(dir)?;
            if !t.has_chat_template() {
                warn!(dir = %dir.display(), "the model has no chat template: chat requests are routed without prefixes");
            }
            Some(t)
        }
        None => {
            warn!(
                "no --tokenizer: text prompts cannot be tokenized, so routing sees prefixes only of token-id prompts"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    info!(
        strategy = config.strategy.name(),
        backends = ?config.backends.iter().map(|b| b.url.as_str()).collect::<Vec<_>>(),
        cache = ?config.cache,
        discover = config.discover.is_some(),
        lora = ?config.lora,
        api_keys = config.api_keys.len(),
        index_budget_blocks = config.index_budget_blocks,
        "kvcache-gateway starting"
    );
    let gw = Gateway::new(config, tokenizer);
    if let Some(tier) = &gw.shared {
        tokio::spawn(tier.clone().connect_loop());
    }
    let _feeds = feed::start(&gw);
    if let Some(url) = gw.config.discover.clone() {
        tokio::spawn(discovery::run(gw.clone(), url));
    }
    if let Some(url) = gw.config.lora.clone() {
        tokio::spawn(lora_feed::run(gw.clone(), url));
    }
    tokio::spawn(probe::run(gw.clone()));
    http::serve(gw, listener).await?;
    Ok(())
}
