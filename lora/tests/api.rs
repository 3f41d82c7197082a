//! The kvcache-lora binary without an engine: `--help`, configs it refuses with the reason, and
//! its API over a real socket telling the truth when no instance answers (the end-to-end tests
//! with real vLLM instances are in `tests/e2e`, run by scripts/test.sh).

use std::path::PathBuf;
use std::time::Duration;

use kvcache_control::testing::{self, Running, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_kvcache-lora");

fn run(args: &[&str]) -> (bool, String) {
    testing::run(BIN, "KVCACHE_LORA_CONFIG", args)
}

fn start(args: &[&str]) -> (String, Running) {
    testing::start(BIN, args)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvcache-lora-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One request; the status and the JSON body (Null when it is not JSON).
fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) = testing::request(addr, method, path, body);
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn help_names_every_flag() {
    let (ok, text) = run(&["--help"]);
    assert!(ok, "{text}");
    for flag in [
        "--config",
        "--listen",
        "--instance",
        "--discover",
        "--policy",
        "--max-loras",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
    assert!(
        text.contains("least-loaded") && text.contains("bin-pack"),
        "{text}"
    );
}

#[test]
fn configs_it_cannot_run_with_are_refused_with_the_reason() {
    let adapter = "[[adapter]]\nname = \"a\"\nbase_model = \"m\"\npath = \"/a\"\n";
    let cases = [
        ("listen = \"127.0.0.1:0\"\n".to_string(), "no instances"),
        (
            "instances = [\"http://127.0.0.1:1\"]\nbogus = 1\n".to_string(),
            "bogus",
        ),
        (
            format!("instances = [\"http://127.0.0.1:1\"]\n{adapter}{adapter}"),
            "declared twice",
        ),
        (
            format!("instances = [\"http://127.0.0.1:1\"]\n{adapter}replicas = 0\n"),
            "replicas must be at least 1",
        ),
        (
            "instances = [\"127.0.0.1:1\"]\n".to_string(),
            "not an http:// URL",
        ),
    ];
    let (ok, text) = run(&["--instance", "http://127.0.0.1:1", "--discover", "etcd://"]);
    assert!(!ok && text.contains("discover"), "{text}");
    testing::assert_configs_refused(BIN, "KVCACHE_LORA_CONFIG", &cases);
}

#[test]
fn with_no_instance_answering_the_api_tells_the_truth_and_refuses_bad_declarations() {
    let dir = temp_dir("api");
    let adapter_dir = dir.join("sql-lora");
    std::fs::create_dir_all(&adapter_dir).unwrap();
    std::fs::write(adapter_dir.join("adapter_config.json"), "{}").unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let file_adapter = format!(
        "[[adapter]]\nname = \"sql-lora\"\nbase_model = \"tiny\"\npath = \"{}\"\n",
        adapter_dir.display()
    );
    let config = dir.join("lora.toml");
    let head = format!(
        "listen = \"127.0.0.1:0\"\ninstances = [\"{dead_url}\"]\n[reconcile]\ninterval_ms = 100\n"
    );
    std::fs::write(&config, format!("{head}{file_adapter}")).unwrap();
    let (addr, _running) = start(&["--config", config.to_str().unwrap()]);

    wait_until("the instance seen down", || {
        let (_, v) = request(&addr, "GET", "/v1/instances", None);
        v["instances"][0]["up"] == false && v["instances"][0]["error"].is_string()
    });
    let (status, v) = request(&addr, "GET", "/v1/adapters", None);
    assert_eq!(status, 200);
    let a = &v["adapters"][0];
    assert_eq!(
        (
            a["name"].as_str(),
            a["phase"].as_str(),
            a["origin"].as_str()
        ),
        (Some("sql-lora"), Some("Pending"), Some("file"))
    );
    wait_until("the reason it is Pending", || {
        let (_, v) = request(&addr, "GET", "/v1/adapters/sql-lora", None);
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("no live instance serves the base model `tiny`"))
    });

    let (status, v) = request(&addr, "POST", "/v1/adapters", Some("{\"name\": \"x\""));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (status, v) = request(
        &addr,
        "POST",
        "/v1/adapters",
        Some(r#"{"name":"x","base_model":"tiny","path":"/no/such/dir"}"#),
    );
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{v}"
    );
    let (status, v) = request(
        &addr,
        "POST",
        "/v1/adapters",
        Some(r#"{"name":"x","base_model":"tiny","path":"/a","colour":1}"#),
    );
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("colour"),
        "{v}"
    );
    let body = format!(
        r#"{{"name":"api-lora","base_model":"tiny","path":"{}","replicas":"all"}}"#,
        adapter_dir.display()
    );
    let (status, v) = request(&addr, "POST", "/v1/adapters", Some(&body));
    assert_eq!((status, v["replicas"].as_str()), (201, Some("all")), "{v}");
    let (status, _) = request(&addr, "GET", "/v1/adapters/nope", None);
    assert_eq!(status, 404);
    let (status, v) = request(&addr, "DELETE", "/v1/adapters/sql-lora", None);
    assert_eq!(status, 409);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("config file"),
        "{v}"
    );
    let (status, v) = request(&addr, "DELETE", "/v1/adapters/api-lora", None);
    assert_eq!((status, v["phase"].as_str()), (202, Some("Unloading")));
    wait_until("api-lora forgotten (nothing was loaded)", || {
        request(&addr, "GET", "/v1/adapters/api-lora", None).0 == 404
    });

    // The file is watched: its adapter goes when it goes.
    std::fs::write(&config, &head).unwrap();
    wait_until("sql-lora gone with the file's table", || {
        request(&addr, "GET", "/v1/adapters", None).1["adapters"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let (status, _) = request(&addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let (_, text) = testing::request(&addr, "GET", "/metrics", None);
    assert!(
        text.contains(&format!(
            "kvcache_lora_instance_up{{instance=\"{dead_url}\"}} 0"
        )),
        "{text}"
    );
    assert!(
        text.contains("kvcache_lora_adapters{phase=\"Pending\"} 0"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn instances_registered_in_etcd_are_managed_while_their_record_lives() {
    let Some(etcd) = kvcache_membership::testing::EtcdProcess::start() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = kvcache_membership::Etcd::new(&etcd.client_url, Duration::from_secs(2)).unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let key = format!(
        "{}{}",
        kvcache_membership::ENGINES_PREFIX,
        &url["http://".len()..]
    );
    let record = format!(r#"{{"url":"{url}","model":"tiny","role":"both"}}"#);
    rt.block_on(client.put(&key, &record, None)).unwrap();
    let discover = etcd.client_url.replace("http://", "etcd://");
    let (addr, _running) = start(&["--listen", "127.0.0.1:0", "--discover", &discover]);
    wait_until("the registered instance managed", || {
        let (_, v) = request(&addr, "GET", "/v1/instances", None);
        v["instances"][0]["url"] == url.as_str() && v["instances"][0]["up"] == false
    });
    rt.block_on(client.delete(&key)).unwrap();
    wait_until("the instance gone with its record", || {
        request(&addr, "GET", "/v1/instances", None).1["instances"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}
