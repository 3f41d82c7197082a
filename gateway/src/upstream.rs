//! The HTTP client toward the backends (hyper's own pooled client: responses stream, nothing
//! is buffered whole), and the small GETs the probes make.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kvcache_control::error_chain;

/// The client every request and probe goes through.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1 client whose connection attempts give up after `connect_timeout`.
pub fn client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Largest probe answer read (vLLM's /metrics is tens of KiB).
const PROBE_BODY_LIMIT: usize = 4 << 20;

/// GETs `url` within `timeout`; the status and body, or why not.
pub async fn get(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let request = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad URL {url}: {e}"))?;
    let fetch = async {
        let response = client.request(request).await.map_err(|e| error_chain(&e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), PROBE_BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("no answer in {timeout:?}"))?
}
