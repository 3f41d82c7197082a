//! The kvcache-autoscaler binary without an engine: `--help`, configs it refuses with the
//! reason, and, over a real socket, a target whose source does not answer: frozen, with the
//! reason, in /status and /metrics (the end-to-end tests with real vLLM instances and cache
//! nodes are in `tests/e2e`, run by scripts/test.sh).

use std::time::{Duration, Instant};

use kvcache_control::testing::{self, Running};

const BIN: &str = env!("CARGO_BIN_EXE_kvcache-autoscaler");

fn run(args: &[&str]) -> (bool, String) {
    testing::run(BIN, "KVCACHE_AUTOSCALER_CONFIG", args)
}

fn start(args: &[&str]) -> (String, Running) {
    testing::start(BIN, args)
}

fn get(addr: &str, path: &str) -> String {
    testing::request(addr, "GET", path, None).1
}

#[test]
fn help_names_every_flag_and_the_file_keys() {
    let (ok, text) = run(&["--help"]);
    assert!(ok, "{text}");
    for word in [
        "--config",
        "--listen",
        "--dry-run",
        "kpa",
        "apa",
        "slo",
        "scale_command",
        "min_replicas",
        "[[target.metrics]]",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

#[test]
fn configs_it_cannot_run_with_are_refused_with_the_reason() {
    let good = "[[target]]\nname = \"e\"\nsources = [\"http://127.0.0.1:1/metrics\"]\nmetric = \"m\"\ntarget_value = 1.0\n";
    let cases = [
        ("listen = \"127.0.0.1:0\"\n".to_string(), "no [[target]]"),
        (format!("{good}colour = 1\n"), "colour"),
        (format!("{good}actuator = \"command\"\n"), "scale_command"),
        (
            good.replace("target_value = 1.0", "target_value = 0.0"),
            "positive target_value",
        ),
        (
            format!("{good}panic_window_s = 100\nstable_window_s = 10\n"),
            "panic_window_s",
        ),
    ];
    testing::assert_configs_refused(BIN, "KVCACHE_AUTOSCALER_CONFIG", &cases);
}

#[test]
fn a_source_that_does_not_answer_freezes_its_target_and_status_says_why() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", dead.local_addr().unwrap());
    drop(dead);
    let path = std::env::temp_dir().join(format!(
        "kvcache-autoscaler-dead-{}.toml",
        std::process::id()
    ));
    let config = format!(
        "listen = \"127.0.0.1:0\"\ninterval_s = 0.1\n[[target]]\nname = \"engines\"\nsources = [\"{url}\"]\n\
         metric = \"vllm:num_requests_running\"\ntarget_value = 2.0\nmin_replicas = 2\nmax_replicas = 5\n"
    );
    std::fs::write(&path, config).unwrap();
    let (addr, _running) = start(&["--config", path.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let v: serde_json::Value = serde_json::from_str(&get(&addr, "/status")).unwrap();
        let t = v["targets"][0].clone();
        if !t["sources"].as_array().is_some_and(Vec::is_empty) {
            break t;
        }
        assert!(Instant::now() < deadline, "no observation in 10 s: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["name"], "engines");
    assert_eq!(
        (status["frozen"].as_bool(), status["source_ok"].as_bool()),
        (Some(true), Some(false)),
        "{status}"
    );
    assert_eq!(
        (status["current"].as_u64(), status["desired"].as_u64()),
        (Some(2), Some(2)),
        "min_replicas when nothing answers: {status}"
    );
    let reason = status["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("frozen") && reason.contains("Connection refused"),
        "{reason}"
    );
    assert_eq!(status["sources"][0]["url"], url.as_str());
    let metrics = get(&addr, "/metrics");
    for sample in [
        "kvcache_autoscaler_desired_replicas{target=\"engines\"} 2".to_string(),
        "kvcache_autoscaler_current_replicas{target=\"engines\"} 2".to_string(),
        format!("kvcache_autoscaler_source_up{{target=\"engines\",source=\"{url}\"}} 0"),
    ] {
        assert!(metrics.contains(&sample), "no {sample} in:\n{metrics}");
    }
    assert!(
        metrics
            .contains("kvcache_autoscaler_decisions_total{target=\"engines\",action=\"frozen\"}"),
        "{metrics}"
    );
    std::fs::remove_file(&path).ok();
}

#[test]
fn a_pool_target_watches_only_the_registered_engines_of_its_role() {
    let Some(etcd) = kvcache_membership::testing::EtcdProcess::start() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = kvcache_membership::Etcd::new(&etcd.client_url, Duration::from_secs(2)).unwrap();
    let mut urls = Vec::new();
    for role in ["prefill", "decode", "decode"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let key = format!("{}127.0.0.1:{port}", kvcache_membership::ENGINES_PREFIX);
        rt.block_on(client.put(
            &key,
            &format!(r#"{{"url":"{url}","model":"tiny","role":"{role}"}}"#),
            None,
        ))
        .unwrap();
        urls.push(url);
    }
    let path = std::env::temp_dir().join(format!(
        "kvcache-autoscaler-role-{}.toml",
        std::process::id()
    ));
    let discover = etcd.client_url.replace("http://", "etcd://");
    let target = |name: &str, role: &str| {
        format!(
            "[[target]]\nname = \"{name}\"\ndiscover = \"{discover}\"\nrole = \"{role}\"\nmetric = \"vllm:num_requests_waiting\"\ntarget_value = 1.0\n"
        )
    };
    let config = format!(
        "listen = \"127.0.0.1:0\"\ninterval_s = 0.1\n{}{}",
        target("prefill", "prefill"),
        target("decode", "decode")
    );
    std::fs::write(&path, config).unwrap();
    let (addr, _running) = start(&["--config", path.to_str().unwrap()]);
    let sources = |v: &serde_json::Value, i: usize| -> Vec<String> {
        v["targets"][i]["sources"].as_array().map_or(vec![], |a| {
            a.iter()
                .map(|s| s["url"].as_str().unwrap().to_string())
                .collect()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value = serde_json::from_str(&get(&addr, "/status")).unwrap();
        let (prefill, decode) = (sources(&v, 0), sources(&v, 1));
        if prefill == [format!("{}/metrics", urls[0])] && decode.len() == 2 {
            let mut want = vec![
                format!("{}/metrics", urls[1]),
                format!("{}/metrics", urls[2]),
            ];
            want.sort();
            let mut got = decode.clone();
            got.sort();
            assert_eq!(got, want);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pools' sources never matched the roles: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&path).ok();
}

#[test]
fn a_kubernetes_target_without_a_cluster_reports_its_decisions_and_says_why_it_cannot_act() {
    let path = std::env::temp_dir().join(format!(
        "kvcache-autoscaler-k8s-{}.toml",
        std::process::id()
    ));
    let config = "listen = \"127.0.0.1:0\"\ninterval_s = 0.1\n[[target]]\nname = \"engines\"\n\
        sources = [\"http://127.0.0.1:1/metrics\"]\nmetric = \"m\"\ntarget_value = 1.0\nactuator = \"kubernetes\"\n\
        [target.kubernetes]\nname = \"vllm\"\n";
    std::fs::write(&path, config).unwrap();
    // Neither in a cluster nor with a kubeconfig (and, in the plain build, without the feature).
    let (addr, _running) = start(&["--config", path.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value = serde_json::from_str(&get(&addr, "/status")).unwrap();
        let t = &v["targets"][0];
        if let Some(why) = t["actuator_error"].as_str()
            && !t["sources"].as_array().is_some_and(Vec::is_empty)
        {
            assert!(why.to_lowercase().contains("kubernetes"), "{why}");
            assert_eq!(t["actuator"], "kubernetes");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no actuator error in /status: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&path).ok();
}
