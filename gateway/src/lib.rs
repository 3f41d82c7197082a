//! kvcache-gateway: an OpenAI-compatible router in front of vLLM instances.
//!
//! The rooms: `route` (the pure decision: one cost per candidate instance), `index` (what each
//! engine's own cache holds, under one memory budget), `events` (vLLM's KV events over ZMQ),
//! `prompt` (engine-exact tokens: the model's tokenizer and chat template), `config` (the TOML
//! file and flags) and `metrics` (the Prometheus families and their names).
//!
//! Work in progress: the HTTP shell (proxy, health checks, API keys) comes next.

pub mod config;
pub mod events;
pub mod index;
pub mod metrics;
pub mod prompt;
pub mod route;
