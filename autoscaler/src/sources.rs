//! Where a target's numbers come from, each tick: Prometheus text scraped from every source (the
//! listed URLs and the engines registered in etcd), or one instant query per metric to a
//! Prometheus server. Every source's health is kept and shown; a failed one makes the tick's
//! observation a failure, so no decision is taken on part of the data.

use std::collections::BTreeMap;
use std::time::Duration;

use kvcache_membership::{ENGINES_PREFIX, Etcd};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::SourceConfig;
use crate::metric::{MetricSpec, Reading};
use crate::target::Observation;
use kvcache_control::{error_chain, prometheus_text};

/// One source's last answer, as /status shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceHealth {
    pub url: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An engine's record in etcd (the connector's; other fields are the gateway's).
#[derive(Deserialize)]
struct EngineRecord {
    url: String,
    role: Option<String>,
}

/// A target's sources and their last readings.
pub struct Sources {
    config: SourceConfig,
    etcd: Option<Etcd>,
    /// The engines last read from etcd (kept when etcd does not answer).
    discovered: Vec<String>,
    /// Per source URL: when it was read, and each metric's reading.
    last: BTreeMap<String, (u64, Vec<Reading>)>,
    http: reqwest::Client,
}

/// The value of a Prometheus `/api/v1/query` answer: a scalar, or a vector's values summed.
pub fn query_value(body: &[u8]) -> Result<f64, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not a query answer: {e}"))?;
    if v.get("status").and_then(Value::as_str) != Some("success") {
        let why = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no status");
        return Err(format!("query failed: {why}"));
    }
    let data = v.get("data").ok_or("no data")?;
    let number = |x: &Value| {
        x.get(1)
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<f64>().ok())
    };
    match data.get("resultType").and_then(Value::as_str) {
        Some("scalar") => data
            .get("result")
            .and_then(number)
            .ok_or_else(|| "a scalar without a value".into()),
        Some("vector") => {
            let items = data
                .get("result")
                .and_then(Value::as_array)
                .ok_or("a vector without result")?;
            if items.is_empty() {
                return Err("the query matched no series".into());
            }
            items
                .iter()
                .map(|i| {
                    i.get("value")
                        .and_then(number)
                        .ok_or("a sample without a value")
                })
                .sum::<Result<f64, _>>()
                .map_err(str::to_string)
        }
        other => Err(format!(
            "unsupported result type {other:?}: use a query that gives a scalar or a vector"
        )),
    }
}

impl Sources {
    pub fn new(config: SourceConfig, timeout: Duration) -> Self {
        let etcd = match &config {
            SourceConfig::Scrape {
                discover: Some(url),
                ..
            } => Etcd::new(url, Duration::from_secs(2)).ok(),
            _ => None,
        };
        Self {
            config,
            etcd,
            discovered: Vec::new(),
            last: BTreeMap::new(),
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("a client without TLS builds"),
        }
    }

    async fn get(&self, url: &str) -> Result<String, String> {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| error_chain(&e))?;
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        Ok(text)
    }

    /// The source URLs now (listed, and registered in etcd with the wanted role).
    async fn urls(&mut self) -> (Vec<String>, Option<String>) {
        let SourceConfig::Scrape { urls, role, .. } = &self.config else {
            return (Vec::new(), None);
        };
        let mut out = urls.clone();
        let mut etcd_error = None;
        if let Some(etcd) = &self.etcd {
            match etcd.range_prefix(ENGINES_PREFIX).await {
                Ok(records) => {
                    self.discovered = records
                        .iter()
                        .filter_map(|(_, v)| serde_json::from_str::<EngineRecord>(v).ok())
                        .filter(|r| {
                            role.as_ref()
                                .is_none_or(|want| r.role.as_deref().unwrap_or("both") == want)
                        })
                        .map(|r| format!("{}/metrics", r.url.trim_end_matches('/')))
                        .collect();
                }
                Err(e) => etcd_error = Some(format!("etcd: {e}")),
            }
        }
        for u in &self.discovered {
            if !out.contains(u) {
                out.push(u.clone());
            }
        }
        (out, etcd_error)
    }

    /// This tick's observation of `metrics` at `now_ms`, and each source's health.
    pub async fn observe(
        &mut self,
        metrics: &[MetricSpec],
        now_ms: u64,
    ) -> (Observation, Vec<SourceHealth>) {
        if let SourceConfig::Prometheus { url, queries } = &self.config {
            return self.query(url.clone(), queries.clone(), now_ms).await;
        }
        let (urls, etcd_error) = self.urls().await;
        let answers = futures_util::future::join_all(urls.iter().map(|u| self.get(u))).await;
        let mut health = Vec::with_capacity(urls.len());
        let mut failure = etcd_error.clone();
        let mut per_metric: Vec<Vec<f64>> = vec![Vec::new(); metrics.len()];
        let mut ready = 0;
        for (url, answer) in urls.iter().zip(answers) {
            let readings = answer.and_then(|text| {
                let samples = prometheus_text::parse(&text);
                metrics
                    .iter()
                    .map(|m| m.read(&samples))
                    .collect::<Result<Vec<_>, _>>()
            });
            match readings {
                Ok(cur) => {
                    ready += 1;
                    let prev = self.last.get(url);
                    for (i, m) in metrics.iter().enumerate() {
                        let dt =
                            prev.map_or(0.0, |(t, _)| now_ms.saturating_sub(*t) as f64 / 1000.0);
                        if let Some(v) = m.value(prev.map(|(_, r)| &r[i]), &cur[i], dt) {
                            per_metric[i].push(v);
                        }
                    }
                    self.last.insert(url.clone(), (now_ms, cur));
                    health.push(SourceHealth {
                        url: url.clone(),
                        ok: true,
                        error: None,
                    });
                }
                Err(why) => {
                    failure.get_or_insert_with(|| format!("{url}: {why}"));
                    self.last.remove(url);
                    health.push(SourceHealth {
                        url: url.clone(),
                        ok: false,
                        error: Some(why),
                    });
                }
            }
        }
        self.last.retain(|u, _| urls.contains(u));
        if urls.is_empty() {
            failure.get_or_insert_with(|| "no source: none listed and none registered".into());
        }
        if let Some(e) = etcd_error {
            health.push(SourceHealth {
                url: "etcd".into(),
                ok: false,
                error: Some(e),
            });
        }
        let values = per_metric
            .iter()
            .map(|vs| (!vs.is_empty()).then(|| vs.iter().sum::<f64>()))
            .collect();
        (
            Observation {
                at_ms: now_ms,
                ready,
                values,
                failure,
            },
            health,
        )
    }

    async fn query(
        &mut self,
        url: String,
        queries: Vec<String>,
        now_ms: u64,
    ) -> (Observation, Vec<SourceHealth>) {
        let answers = futures_util::future::join_all(queries.iter().map(|q| {
            let request = self
                .http
                .get(format!("{url}/api/v1/query"))
                .query(&[("query", q)]);
            async move {
                let r = request.send().await.map_err(|e| error_chain(&e))?;
                let body = r.bytes().await.map_err(|e| error_chain(&e))?;
                query_value(&body)
            }
        }))
        .await;
        let mut failure = None;
        let mut values = Vec::new();
        for (q, a) in queries.iter().zip(answers) {
            match a {
                Ok(v) => values.push(Some(v)),
                Err(why) => {
                    failure.get_or_insert(format!("{url} query {q:?}: {why}"));
                    values.push(None);
                }
            }
        }
        let health = vec![SourceHealth {
            url,
            ok: failure.is_none(),
            error: failure.clone(),
        }];
        // A query answers for the whole pool (a total, such as sum(...)): the replicas it
        // covers are the ones the actuator set (the scaler fills `ready` in).
        (
            Observation {
                at_ms: now_ms,
                ready: 0,
                values,
                failure,
            },
            health,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_answers_become_one_number_or_a_reason() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"instance":"a"},"value":[1700000000.1,"1.5"]},
            {"metric":{"instance":"b"},"value":[1700000000.1,"2.5"]}]}}"#;
        assert_eq!(query_value(vector), Ok(4.0));
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000.1,"0.25"]}}"#;
        assert_eq!(query_value(scalar), Ok(0.25));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(query_value(empty).unwrap_err().contains("no series"));
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 4"}"#;
        assert!(query_value(bad).unwrap_err().contains("parse error"));
    }
}
