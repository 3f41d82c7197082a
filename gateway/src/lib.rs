//! kvcache-gateway: an OpenAI-compatible router in front of vLLM instances.
//!
//! The pure rooms: `route` (one cost per candidate instance), `index` (what each engine's own
//! cache holds, under one memory budget), `pool` (each backend's health, ejection and load),
//! `access` (API keys and rate limits), `openai` (error bodies and the request fields routing
//! reads), `adapters` (the LoRA manager's answer: where each adapter is Ready), `prompt` (engine-exact tokens: the model's tokenizer and chat template), `pd` (P/D
//! roles, the bypass rule and the two legs' bodies), `config`.
//! The shell around them: `http` (the axum routes) imports `legs` (the P/D path: decode pick,
//! bypass, prefill leg) and `forward` (pick, send, retry), which use `dispatch` (a request's
//! keys, candidates and pick) and `proxy` (send, relay); `probe` (health checks and engine
//! load), `feed` (KV events into the index, from `events`), `discovery` (backends registered
//! in etcd), `lora_feed` (the LoRA manager's adapter states, read by `adapters`), `shared_tier` (the cache nodes'
//! prefix lookup), `upstream` (the HTTP client), `state` (what they share), `metrics`.

pub mod access;
pub mod adapters;
pub mod config;
pub mod discovery;
pub mod dispatch;
pub mod events;
pub mod feed;
pub mod forward;
pub mod http;
pub mod index;
pub mod legs;
pub mod lora_feed;
pub mod metrics;
pub mod openai;
pub mod pd;
pub mod pool;
pub mod probe;
pub mod prompt;
pub mod proxy;
pub mod route;
pub mod shared_tier;
pub mod state;
pub mod upstream;
