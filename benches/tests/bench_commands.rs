//! The benchmark binary's commands run end to end: every system starts, is measured, stops,
//! and the JSON has the documented shape. (The figures in a debug build mean nothing; the
//! committed results come from release builds, see benches/results/README.md.)

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvcache-bench"))
}

#[test]
fn compare_measures_every_system_and_writes_the_documented_json() {
    let out = std::env::temp_dir().join(format!("kvcache-compare-{}.json", std::process::id()));
    let status = bench()
        .args([
            "compare",
            "--seconds",
            "0.3",
            "--rounds",
            "2",
            "--sizes",
            "64KiB",
            "--concurrency",
            "1,2",
        ])
        // Each client rotates through 16 values (the gets check every value they read).
        .args(["--memory", "256MiB", "--client-buffers", "1MiB", "--json"])
        .arg(&out)
        // Mooncake has its own test below; this one counts the five built-in systems.
        .env_remove("KVCACHE_MOONCAKE_VENV")
        .status()
        .expect("run kvcache-bench");
    assert!(
        status.success(),
        "kvcache-bench compare failed (is redis-server installed? scripts/test.sh installs it)"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let rows = doc["results"].as_array().expect("results array");
    assert_eq!(
        rows.len(),
        5 * 2 * 2,
        "5 systems x 2 concurrencies x put/get"
    );
    for system in [
        "kvcache-shm",
        "kvcache-tcp",
        "redis",
        "tcp-ceiling",
        "memcpy-ceiling",
    ] {
        for op in ["put", "get"] {
            for conc in [1, 2] {
                let row = rows
                    .iter()
                    .find(|r| r["system"] == system && r["op"] == op && r["concurrency"] == conc)
                    .unwrap_or_else(|| panic!("no row for {system} {op} x{conc}"));
                assert_eq!(row["value_bytes"], 65536);
                for field in ["ops_per_s", "gb_per_s", "p50_us", "p99_us"] {
                    assert!(
                        row[field].as_f64().unwrap() > 0.0,
                        "{system} {op} x{conc}: {field} = {}",
                        row[field]
                    );
                }
                assert!(row["p99_us"].as_f64() >= row["p50_us"].as_f64());
                // CPU per GB: read for the benchmark process always, and for the server
                // process of every system that has one.
                let cpu = |field: &str| row[field].as_f64().filter(|c| *c >= 0.0);
                assert!(
                    cpu("client_cpu_s_per_gb").is_some(),
                    "{system} {op} x{conc}: {row}"
                );
                assert_eq!(
                    cpu("node_cpu_s_per_gb").is_some(),
                    system != "memcpy-ceiling",
                    "{system} {op} x{conc}: {row}"
                );
            }
        }
    }
    assert!(doc["command"].as_str().unwrap().contains("compare"));
    std::fs::remove_file(out).unwrap();
}

#[test]
fn index_memory_stays_under_100_bytes_per_block() {
    let out = bench()
        .args(["index-memory", "--blocks", "200000"])
        .output()
        .expect("run kvcache-bench");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for line in text.lines() {
        let per_block: f64 = line
            .split(": ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        assert!(per_block < 100.0, "{line}");
    }
    assert_eq!(
        text.lines().count(),
        2,
        "one line per eviction policy: {text}"
    );
}

/// On a GPU the benchmark runs and checks every byte; elsewhere it refuses, naming what is
/// missing (the feature, or the driver).
#[test]
fn cuda_runs_on_a_gpu_and_otherwise_names_what_is_missing() {
    let out_json = std::env::temp_dir().join(format!("kvcache-cuda-{}.json", std::process::id()));
    let out = bench()
        .args(["cuda", "--total", "64MiB", "--rounds", "1", "--json"])
        .arg(&out_json)
        .output()
        .expect("run kvcache-bench");
    let err = String::from_utf8_lossy(&out.stderr);
    if !cfg!(feature = "cuda") {
        assert!(!out.status.success());
        assert!(err.contains("without the `cuda` feature"), "{err}");
        return;
    }
    #[cfg(feature = "cuda")]
    if !kvcache_transport::cuda::driver_present() {
        eprintln!("skipped the GPU run: no CUDA driver (libcuda.so); checking the refusal");
        assert!(!out.status.success());
        assert!(err.contains("no CUDA driver"), "{err}");
        return;
    }
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_json).unwrap()).unwrap();
    let r = &doc["results"];
    assert_eq!(r["verified"], true);
    for field in [
        "save_gbps",
        "load_gbps",
        "cumemcpy_dtoh_slices_gbps",
        "cumemcpy_htod_slices_gbps",
    ] {
        assert!(r[field].as_f64().unwrap() > 0.0, "{field} = {}", r[field]);
    }
    std::fs::remove_file(out_json).unwrap();
}

/// Mooncake is measured only with a venv that has it: without one the run says so and goes
/// on; with a wrong one it stops and says what to make; with a real one (KVCACHE_MOONCAKE_VENV)
/// its rows sit beside ours in the same JSON.
#[test]
fn compare_names_why_mooncake_is_not_measured_and_measures_it_given_a_venv() {
    let small = [
        "compare",
        "--seconds",
        "0.2",
        "--rounds",
        "1",
        "--sizes",
        "64KiB",
        "--concurrency",
        "1",
        "--systems",
        "memcpy-ceiling",
    ];
    let out = bench()
        .args(small)
        .env_remove("KVCACHE_MOONCAKE_VENV")
        .output()
        .expect("run kvcache-bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("mooncake: not measured (no --mooncake-venv"),
        "{err}"
    );

    let out = bench()
        .args(small)
        .args(["--mooncake-venv", "/nonexistent-venv"])
        .output()
        .expect("run kvcache-bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no Python at /nonexistent-venv/bin/python"),
        "{err}"
    );
    assert!(
        err.contains("pip install mooncake-transfer-engine-non-cuda"),
        "{err}"
    );

    let Ok(venv) = std::env::var("KVCACHE_MOONCAKE_VENV") else {
        eprintln!("skipped the Mooncake rows: KVCACHE_MOONCAKE_VENV names no venv with Mooncake");
        return;
    };
    let json = std::env::temp_dir().join(format!("kvcache-mooncake-{}.json", std::process::id()));
    let out = bench()
        .args(small)
        .args(["--memory", "256MiB", "--mooncake-venv", &venv, "--json"])
        .arg(&json)
        .output()
        .expect("run kvcache-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = doc["results"].as_array().unwrap();
    for op in ["put", "get"] {
        let row = rows
            .iter()
            .find(|r| r["system"] == "mooncake" && r["op"] == op)
            .unwrap_or_else(|| panic!("no mooncake {op} row: {rows:?}"));
        assert!(row["ops_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    std::fs::remove_file(json).unwrap();
}

/// The soak's short form: three nodes in etcd, clients over TCP and shared memory, nodes
/// killed and restarted and etcd restarted; the command itself fails on any error, wrong
/// byte, miss of a stored key, leaked lease or page, or RSS growth, and its report says what
/// it did.
#[test]
fn a_short_soak_through_node_kills_and_an_etcd_restart_loses_and_leaks_nothing() {
    if std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_err()
    {
        let why = "etcd not found: install Debian's etcd-server (scripts/test.sh does)";
        assert!(
            std::env::var("KVCACHE_REQUIRE_ETCD").as_deref() != Ok("1"),
            "{why}"
        );
        eprintln!("skipping: {why}");
        return;
    }
    let json = std::env::temp_dir().join(format!("kvcache-soak-{}.json", std::process::id()));
    let out = bench()
        .args([
            "soak",
            "--seconds",
            "60",
            "--kill-every",
            "4",
            "--etcd-every",
            "3",
        ])
        .args([
            "--tcp-clients",
            "3",
            "--shm-clients",
            "3",
            "--memory",
            "64MiB",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run kvcache-bench");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let r = &doc["results"];
    assert!(r["node_kills"].as_u64().unwrap() >= 2, "{text}");
    assert!(r["etcd_restarts"].as_u64().unwrap() >= 1, "{text}");
    assert!(r["totals"]["hits"].as_u64().unwrap() > 100, "{text}");
    assert_eq!(r["totals"]["misses"], 0, "{text}");
    assert_eq!(r["ends"].as_array().unwrap().len(), 3);
    assert!(
        !r["rss_growth"].as_array().unwrap().is_empty(),
        "RSS was judged: {text}"
    );
    assert_eq!(r["failures"].as_array().unwrap().len(), 0, "{text}");
    std::fs::remove_file(json).unwrap();
}
