//! Logs to stderr through `tracing`, filtered by `KVCACHE_LOG` (as RUST_LOG; default `info`),
//! coloured only on a terminal.

/// Installs the subscriber; call once at start.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVCACHE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
