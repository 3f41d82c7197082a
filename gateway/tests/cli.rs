//! The gateway binary's start-up: `--help` names every flag, and a config it cannot run with
//! is refused at once with the reason (the end-to-end tests with real vLLM instances are in
//! `tests/e2e`, run by scripts/test.sh).

use kvcache_control::testing::{self, raw_http};

const BIN: &str = env!("CARGO_BIN_EXE_kvcache-gateway");

fn run(args: &[&str]) -> (bool, String) {
    testing::run(BIN, "KVCACHE_GATEWAY_CONFIG", args)
}

#[test]
fn help_names_every_flag() {
    let (ok, text) = run(&["--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--config",
        "--listen",
        "--backend",
        "--strategy",
        "--tokenizer",
        "--cache",
        "--cache-token",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
    assert!(text.contains("cache-aware"), "{text}");
}

#[test]
fn configs_it_cannot_run_with_are_refused_with_the_reason() {
    let cases = [
        ("listen = \"127.0.0.1:0\"\n", "no backends"),
        (
            "bogus_key = 1\n[[backend]]\nurl = \"http://127.0.0.1:1\"\n",
            "bogus_key",
        ),
        (
            "[[backend]]\nurl = \"https://127.0.0.1:1\"\n",
            "only http://",
        ),
        (
            "tokenizer = \"/nonexistent\"\n[[backend]]\nurl = \"http://127.0.0.1:1\"\n",
            "cannot load the tokenizer",
        ),
    ];
    testing::assert_configs_refused(BIN, "KVCACHE_GATEWAY_CONFIG", &cases);
}

#[test]
fn with_its_backends_down_health_and_requests_answer_503_with_retry_after() {
    // A backend nobody listens on: the gateway starts, says it is not ready, and answers a
    // request with OpenAI's error body instead of hanging.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (addr, _running) =
        testing::start(BIN, &["--listen", "127.0.0.1:0", "--backend", &dead_url]);
    let health = raw_http(
        &addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("\"backends_up\":0"), "{health}");
    let body = r#"{"model":"tiny","prompt":"hi"}"#;
    let answer = raw_http(
        &addr,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    // No backend is up to say which models exist: 503 with Retry-After, not a 404.
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("no_backend_available"), "{answer}");
}
