//! Prefill/decode disaggregation, the pure part: backend roles, when to skip the prefill leg,
//! and the two request bodies of vLLM's contract (its toy proxy, llm-d's sidecar and AIBrix's
//! router drive it the same way): the prefill engine gets the request with `max_tokens` 1, no
//! streaming and `kv_transfer_params.do_remote_decode`; the decode engine gets the original
//! request plus the `kv_transfer_params` the prefill engine answered, verbatim. With the
//! kvcache connector the KV goes through the cache: the prefill engine saves every prompt block
//! (also on `kvcache_near`, the cache node on the decode engine's host) before it answers, and
//! the decode engine loads them as prefix hits. The legs themselves run in `legs.rs`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// What work a backend takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Whole requests, or either leg.
    #[default]
    Both,
    /// Prefill legs only (its connector's `kv_role` is `kv_producer`).
    Prefill,
    /// Decode legs only (`kv_consumer`).
    Decode,
}

impl Role {
    /// Parses a role as the config writes it, or as an engine's record does (its `kv_role`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "both" | "kv_both" => Some(Role::Both),
            "prefill" | "kv_producer" => Some(Role::Prefill),
            "decode" | "kv_consumer" => Some(Role::Decode),
            _ => None,
        }
    }

    /// The work a backend of this role is picked for.
    pub fn need(self) -> Need {
        match self {
            Role::Both => Need::Any,
            Role::Prefill => Need::Prefill,
            Role::Decode => Need::Decode,
        }
    }

    /// The name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Role::Both => "both",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    /// Whether a backend of this role takes work of kind `need`.
    pub fn takes(self, need: Need) -> bool {
        match need {
            Need::Any => true,
            Need::Prefill => self != Role::Decode,
            Need::Decode => self != Role::Prefill,
        }
    }
}

/// The kind of work a pick is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// A whole request (no disaggregation).
    Any,
    Prefill,
    Decode,
}

/// When the gateway disaggregates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PdConfig {
    /// Skip the prefill leg when fewer prompt tokens than this are uncached on the decode
    /// instance (its own cache and, with cache-aware routing, the shared tier) ...
    pub bypass_tokens: usize,
    /// ... and they are less than this fraction of the prompt (Dynamo's rule: 2048, 0.7).
    pub bypass_fraction: f64,
    /// How long the prefill leg may take before the request goes decode-only.
    pub prefill_timeout: Duration,
}

impl Default for PdConfig {
    fn default() -> Self {
        Self {
            bypass_tokens: 2048,
            bypass_fraction: 0.7,
            prefill_timeout: Duration::from_secs(60),
        }
    }
}

/// Whether a request of `prompt_tokens` (None: unknown, no tokenizer) whose decode instance
/// would have `cached_tokens` of it skips the prefill leg: little is left to compute.
pub fn bypass(cfg: &PdConfig, prompt_tokens: Option<usize>, cached_tokens: usize) -> bool {
    let Some(prompt) = prompt_tokens.filter(|&n| n > 0) else {
        return false;
    };
    let uncached = prompt.saturating_sub(cached_tokens);
    uncached < cfg.bypass_tokens && (uncached as f64) < cfg.bypass_fraction * prompt as f64
}

/// Whether the prefill leg pays, or the prefill instance is so far behind that the decode
/// instance would have computed the prompt itself (`decode_cost`, the one cost) before the
/// prefill instance even started on it (`prefill_wait`: its cost less what it must compute).
/// Under a prefill-heavy load this sends work where the queue is shorter, so a small prefill
/// pool stops growing its queue (Dynamo's "prefill busy" bypass, from the same cost instead of
/// a threshold). An idle pair always disaggregates: the point is the decode instance's
/// inter-token latency, which the cost does not see. Strategies that do not score (a decode
/// cost of 0) always disaggregate.
pub fn prefill_pays(prefill_wait: f64, decode_cost: f64) -> bool {
    decode_cost == 0.0 || prefill_wait < decode_cost
}

/// The prefill leg's body: the request with one output token, not streamed, and
/// `kv_transfer_params` asking for a remote decode (placed near `near`, a cache node).
/// `body` is a JSON object (checked before routing).
pub fn prefill_body(body: &[u8], near: Option<&str>) -> Result<Vec<u8>, String> {
    let mut req = object(body)?;
    req.insert("max_tokens".into(), json!(1));
    if req.contains_key("max_completion_tokens") {
        req.insert("max_completion_tokens".into(), json!(1));
    }
    req.insert("stream".into(), json!(false));
    for k in ["stream_options", "min_tokens", "min_completion_tokens"] {
        req.remove(k);
    }
    let mut params = json!({
        "do_remote_decode": true,
        "do_remote_prefill": false,
        "remote_engine_id": null,
        "remote_block_ids": null,
        "remote_host": null,
        "remote_port": null,
    });
    if let Some(near) = near {
        params["kvcache_near"] = json!(near);
    }
    req.insert("kv_transfer_params".into(), params);
    serde_json::to_vec(&req).map_err(|e| e.to_string())
}

/// The `kv_transfer_params` of a prefill response: an object that asks for a remote prefill.
pub fn transfer_params(response: &[u8]) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(response)
        .map_err(|e| format!("the prefill response is not JSON: {e}"))?;
    match v.get("kv_transfer_params") {
        Some(p @ Value::Object(m)) if m.get("do_remote_prefill") == Some(&Value::Bool(true)) => {
            Ok(p.clone())
        }
        Some(Value::Object(_)) => Err("its kv_transfer_params do not ask for a remote prefill (is the engine's kv_role kv_producer or kv_both?)".into()),
        _ => Err("it has no kv_transfer_params (does the engine run a KV connector?)".into()),
    }
}

/// The decode leg's body: the original request with the prefill's `kv_transfer_params`.
pub fn decode_body(body: &[u8], params: Value) -> Result<Vec<u8>, String> {
    let mut req = object(body)?;
    req.insert("kv_transfer_params".into(), params);
    serde_json::to_vec(&req).map_err(|e| e.to_string())
}

fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("the request body is not a JSON object".into()),
        Err(e) => Err(format!("the request body is not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_from_the_config_and_from_an_engines_kv_role() {
        assert_eq!(Role::parse("prefill"), Some(Role::Prefill));
        assert_eq!(Role::parse("kv_producer"), Some(Role::Prefill));
        assert_eq!(Role::parse("kv_consumer"), Some(Role::Decode));
        assert_eq!(Role::parse("kv_both"), Some(Role::Both));
        assert_eq!(Role::parse("leader"), None);
        assert!(Role::Both.takes(Need::Prefill) && Role::Both.takes(Need::Decode));
        assert!(!Role::Prefill.takes(Need::Decode) && !Role::Decode.takes(Need::Prefill));
    }

    #[test]
    fn bypass_needs_few_uncached_tokens_and_a_small_fraction_of_the_prompt() {
        let cfg = PdConfig::default();
        // Nothing cached: disaggregate, however short the prompt.
        assert!(!bypass(&cfg, Some(300), 0));
        // Most of the prompt cached on the decode instance: skip the prefill leg.
        assert!(bypass(&cfg, Some(300), 256));
        // Few uncached tokens, but 70 % of the prompt or more: disaggregate.
        assert!(!bypass(&cfg, Some(300), 90));
        // A long uncached tail: disaggregate even when it is a small fraction.
        assert!(!bypass(&cfg, Some(100_000), 90_000));
        // Unknown prompt length: disaggregate.
        assert!(!bypass(&cfg, None, 0));
    }

    #[test]
    fn the_prefill_leg_pays_unless_the_prefill_instance_is_far_behind() {
        // An idle prefill instance: disaggregate, even when the decode instance is idle too.
        assert!(prefill_pays(0.0, 15.0));
        // Its backlog alone is longer than the decode instance's whole cost: compute there.
        assert!(!prefill_pays(200.0, 20.0));
        assert!(prefill_pays(19.0, 20.0));
        // Strategies that do not score.
        assert!(prefill_pays(0.0, 0.0));
    }

    #[test]
    fn the_prefill_body_asks_for_one_unstreamed_token_and_a_remote_decode() {
        let body = br#"{"model":"m","prompt":"hi","max_tokens":50,"max_completion_tokens":50,
            "stream":true,"stream_options":{"include_usage":true},"min_tokens":3,"temperature":0}"#;
        let out: Value =
            serde_json::from_slice(&prefill_body(body, Some("10.0.0.1:7400")).unwrap()).unwrap();
        assert_eq!(out["max_tokens"], 1);
        assert_eq!(out["max_completion_tokens"], 1);
        assert_eq!(out["stream"], false);
        assert!(out.get("stream_options").is_none() && out.get("min_tokens").is_none());
        assert_eq!(out["temperature"], 0);
        assert_eq!(out["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(out["kv_transfer_params"]["kvcache_near"], "10.0.0.1:7400");
        assert!(prefill_body(b"[1]", None).is_err());
    }

    #[test]
    fn the_decode_body_carries_the_prefills_params_verbatim() {
        let prefill = br#"{"choices":[],"kv_transfer_params":{"do_remote_prefill":true,"kvcache":{"blocks":3}}}"#;
        let params = transfer_params(prefill).unwrap();
        let body = br#"{"model":"m","prompt":"hi","stream":true,"max_tokens":50}"#;
        let out: Value =
            serde_json::from_slice(&decode_body(body, params.clone()).unwrap()).unwrap();
        assert_eq!(out["kv_transfer_params"], params);
        assert_eq!(out["stream"], true);
        assert_eq!(out["max_tokens"], 50);
    }

    #[test]
    fn a_prefill_answer_without_usable_params_is_refused_with_the_reason() {
        assert!(
            transfer_params(b"{}")
                .unwrap_err()
                .contains("no kv_transfer_params")
        );
        let not_remote = br#"{"kv_transfer_params":{"do_remote_prefill":false}}"#;
        assert!(transfer_params(not_remote).unwrap_err().contains("kv_role"));
        assert!(transfer_params(b"<html>").unwrap_err().contains("not JSON"));
    }
}
