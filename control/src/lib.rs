//! kvcache-control: the shell the control-plane binaries (gateway, LoRA manager, autoscaler)
//! share. `logging` (tracing from `KVCACHE_LOG`), `serve` (an axum router with a ready line on
//! stdout and a graceful shutdown), `prometheus_text` (reading the exposition format: what the
//! engines and the nodes serve), `render` (writing a registry), `error_chain`.

pub mod logging;
pub mod prometheus_text;
pub mod serve;
#[cfg(feature = "test-support")]
pub mod testing;

/// An error and its sources, on one line ("client error (Connect): tcp connect error: ...").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A registry's exposition text.
pub fn render(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// The content type of [`render`]'s text.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
