//! A vLLM engine's LoRA face: `GET /v1/models` (what it serves: base models without a
//! parent, adapters with one), `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`
//! and, from `/metrics`, which adapters have requests running or waiting. The engine must run
//! with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`. The readers of the
//! answers are pure and tested here; [`Engines`] does the HTTP.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use kvcache_control::error_chain;
use kvcache_control::prometheus_text::{self, Sample};

use crate::reconcile::Outcome;

/// What an instance's /v1/models lists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Models {
    pub base: Vec<String>,
    pub adapters: BTreeSet<String>,
}

/// Reads an OpenAI /v1/models answer: entries with a `parent` are adapters of that model.
pub fn read_models(body: &[u8]) -> Result<Models, String> {
    #[derive(Deserialize)]
    struct Card {
        id: String,
        #[serde(default)]
        parent: Option<String>,
    }
    #[derive(Deserialize)]
    struct List {
        data: Vec<Card>,
    }
    let list: List =
        serde_json::from_slice(body).map_err(|e| format!("/v1/models is not a model list: {e}"))?;
    let mut out = Models::default();
    for card in list.data {
        match card.parent {
            Some(_) => {
                out.adapters.insert(card.id);
            }
            None => out.base.push(card.id),
        }
    }
    Ok(out)
}

/// What the engine's metrics say about LoRA.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Activity {
    /// Adapters with requests running or waiting.
    pub busy: BTreeSet<String>,
    /// The engine's `--max-loras`, when it has reported it.
    pub max_loras: Option<usize>,
}

/// Reads vLLM's Prometheus text. `vllm:lora_requests_info` keeps one sample per label set ever
/// seen, valued with the time it was set: the newest one is the present. An engine with no
/// request running or waiting at all has nothing busy, whatever a stale sample says.
pub fn read_activity(text: &str) -> Activity {
    let samples = prometheus_text::parse(text);
    let requests: f64 = samples
        .iter()
        .filter(|s| s.name == "vllm:num_requests_running" || s.name == "vllm:num_requests_waiting")
        .map(|s| s.value)
        .sum();
    let newest = samples
        .iter()
        .filter(|s| s.name == "vllm:lora_requests_info")
        .max_by(|a, b| a.value.total_cmp(&b.value));
    let label = |s: &Sample, key: &str| {
        s.labels
            .iter()
            .find(|(k, _)| k == key)
            .map_or(String::new(), |(_, v)| v.clone())
    };
    let mut busy = BTreeSet::new();
    if let Some(s) = newest.filter(|_| requests > 0.0) {
        for key in ["running_lora_adapters", "waiting_lora_adapters"] {
            busy.extend(
                label(s, key)
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string),
            );
        }
    }
    Activity {
        busy,
        max_loras: newest.and_then(|s| label(s, "max_lora").parse().ok()),
    }
}

/// The outcome of a load or unload from the engine's status and body.
pub fn read_outcome(status: u16, body: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(body);
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| text.trim().chars().take(500).collect());
    match status {
        200..=299 => Outcome::Done,
        // A manager restarted mid-load, or two loads crossed: the adapter is there.
        400 if message.contains("has already been loaded") => Outcome::Done,
        502..=504 => Outcome::Unreachable(format!("HTTP {status}: {message}")),
        _ => Outcome::Refused(format!("HTTP {status}: {message}")),
    }
}

/// The HTTP client toward the engines.
#[derive(Clone)]
pub struct Engines {
    http: reqwest::Client,
    /// Loads read the adapter's weights: slower than a probe.
    load_timeout: Duration,
    api_key: Option<String>,
}

impl Engines {
    /// A client whose probes give up after `probe_timeout` and loads after `load_timeout`;
    /// `api_key` is sent as a bearer token (engines started with `--api-key`).
    pub fn new(probe_timeout: Duration, load_timeout: Duration, api_key: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(probe_timeout)
            .connect_timeout(probe_timeout)
            .build()
            .expect("a client without TLS or proxies builds");
        Self {
            http,
            load_timeout,
            api_key,
        }
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url);
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn get(&self, url: String) -> Result<bytes::Bytes, String> {
        let response = self
            .request(reqwest::Method::GET, url.clone())
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| error_chain(&e))?;
        if !status.is_success() {
            return Err(format!("{url} answered {status}"));
        }
        Ok(body)
    }

    /// What `base` serves.
    pub async fn models(&self, base: &str) -> Result<Models, String> {
        read_models(&self.get(format!("{base}/v1/models")).await?)
    }

    /// Its LoRA activity (empty when its /metrics cannot be read: nothing known busy).
    pub async fn activity(&self, base: &str) -> Result<Activity, String> {
        let body = self.get(format!("{base}/metrics")).await?;
        Ok(read_activity(&String::from_utf8_lossy(&body)))
    }

    async fn post(&self, url: String, body: Value, timeout: Duration) -> Outcome {
        let sent = self
            .request(reqwest::Method::POST, url)
            .timeout(timeout)
            .json(&body)
            .send()
            .await;
        match sent {
            Err(e) => Outcome::Unreachable(error_chain(&e)),
            Ok(r) => {
                let status = r.status().as_u16();
                match r.bytes().await {
                    Ok(body) => read_outcome(status, &body),
                    Err(e) => Outcome::Unreachable(error_chain(&e)),
                }
            }
        }
    }

    /// Loads adapter `name` from `path` on `base`.
    pub async fn load(&self, base: &str, name: &str, path: &str) -> Outcome {
        let body = json!({"lora_name": name, "lora_path": path});
        self.post(
            format!("{base}/v1/load_lora_adapter"),
            body,
            self.load_timeout,
        )
        .await
    }

    /// Unloads adapter `name` from `base`.
    pub async fn unload(&self, base: &str, name: &str) -> Outcome {
        let body = json!({"lora_name": name});
        self.post(
            format!("{base}/v1/unload_lora_adapter"),
            body,
            self.load_timeout,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_with_a_parent_are_adapters() {
        let body = br#"{"object":"list","data":[
            {"id":"tiny","root":"/m","parent":null},
            {"id":"sql-lora","root":"/a","parent":"tiny"}]}"#;
        let m = read_models(body).unwrap();
        assert_eq!(m.base, ["tiny"]);
        assert_eq!(m.adapters.iter().collect::<Vec<_>>(), ["sql-lora"]);
        assert!(
            read_models(b"<html>")
                .unwrap_err()
                .contains("not a model list")
        );
    }

    #[test]
    fn the_newest_lora_info_sample_is_the_present_and_an_idle_engine_has_nothing_busy() {
        let text = "# TYPE vllm:lora_requests_info gauge\n\
            vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.7e9\n\
            vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"a\",waiting_lora_adapters=\"c\"} 1.8e9\n\
            vllm:num_requests_running{engine=\"0\"} 1.0\n";
        let a = read_activity(text);
        assert_eq!(a.busy.iter().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(a.max_loras, Some(2));
        let idle = text.replace(
            "vllm:num_requests_running{engine=\"0\"} 1.0",
            "vllm:num_requests_running 0.0",
        );
        assert!(read_activity(&idle).busy.is_empty());
        assert_eq!(read_activity(""), Activity::default());
    }

    #[test]
    fn engine_answers_become_outcomes() {
        assert_eq!(read_outcome(200, b"Success"), Outcome::Done);
        let already =
            br#"{"error":{"message":"The lora adapter 'a' has already been loaded.","code":400}}"#;
        assert_eq!(read_outcome(400, already), Outcome::Done);
        let broken = br#"{"error":{"message":"Loading lora a failed: No adapter found","type":"InternalServerError","code":500}}"#;
        assert_eq!(
            read_outcome(500, broken),
            Outcome::Refused("HTTP 500: Loading lora a failed: No adapter found".into())
        );
        assert!(
            matches!(read_outcome(503, b"busy"), Outcome::Unreachable(m) if m.contains("busy"))
        );
    }
}
