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
        .args(["--memory", "256MiB", "--json"])
        .arg(&out)
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
