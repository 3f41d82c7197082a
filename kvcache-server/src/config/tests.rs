use clap::Parser;
use kvcache_store::eviction::PolicyKind;

use super::*;
use crate::config::settings::load_file;

#[test]
fn flags_override_file_and_file_overrides_defaults() {
    let dir = std::env::temp_dir().join(format!("kvcache-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        "memory = \"64MiB\"\nlisten = \"127.0.0.1:9000\"\neviction = \"s3fifo\"\n",
    )
    .unwrap();
    let s = Settings::parse_from([
        "kvcache-server",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:9100",
    ]);
    let cfg = s.merge_file().unwrap().resolve().unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:9100", "flag wins over file");
    assert_eq!(cfg.store.capacity, 64 << 20, "file wins over default");
    assert_eq!(cfg.store.policy, PolicyKind::S3fifo);
    assert_eq!(
        cfg.metrics_listen.as_deref(),
        Some("127.0.0.1:7401"),
        "default"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn unknown_file_keys_and_bad_sizes_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("kvcache-config-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "memroy = \"1GiB\"\n").unwrap();
    let err = load_file(&path).unwrap_err();
    assert!(format!("{err:#}").contains("memroy"), "{err:#}");
    let e = Settings::try_parse_from(["kvcache-server", "--memory", "lots"]).unwrap_err();
    assert!(e.to_string().contains("invalid size"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn shared_memory_settings_resolve_and_bad_modes_are_refused() {
    let cfg = Settings::parse_from(["kvcache-server"]).resolve().unwrap();
    let shm = cfg.shm.expect("on by default");
    assert_eq!((shm.socket, shm.mode), (ShmSocket::Auto, 0o600));
    assert!(cfg.store.shared);
    let off = Settings::parse_from(["kvcache-server", "--shm-socket", "off"]);
    let off = off.resolve().unwrap();
    assert!(off.shm.is_none() && !off.store.shared);
    let bad = Settings::parse_from(["kvcache-server", "--shm-mode", "rw"]);
    assert!(format!("{:#}", bad.resolve().unwrap_err()).contains("octal"));
    let path = Settings::parse_from([
        "kvcache-server",
        "--shm-socket",
        "/run/kv.sock",
        "--shm-mode",
        "0o660",
    ]);
    let shm = path.resolve().unwrap().shm.unwrap();
    assert_eq!(
        (shm.socket, shm.mode),
        (ShmSocket::Path("/run/kv.sock".into()), 0o660)
    );
}

#[test]
fn cluster_flags_resolve_and_contradictions_are_refused() {
    let err = |args: &[&str]| {
        let s = Settings::parse_from(std::iter::once("kvcache-server").chain(args.iter().copied()));
        format!("{:#}", s.resolve().unwrap_err())
    };
    let single = Settings::parse_from(["kvcache-server"]).resolve().unwrap();
    assert!(single.cluster.is_none());
    let cfg = Settings::parse_from([
        "kvcache-server",
        "--peers",
        "10.0.0.1:7400, 10.0.0.2:7400",
        "--replicas",
        "2",
        "--warm",
        "false",
    ])
    .resolve()
    .unwrap()
    .cluster
    .unwrap();
    assert!(
        matches!(&cfg.membership, Membership::Peers(p) if p == &["10.0.0.1:7400", "10.0.0.2:7400"])
    );
    assert_eq!((cfg.replicas, cfg.warm), (2, false));
    assert!(err(&["--replicas", "2"]).contains("only apply to a cluster"));
    assert!(err(&["--peers", "a:1", "--etcd", "http://127.0.0.1:2379"]).contains("give one"));
    assert!(err(&["--peers", "nohost"]).contains("HOST:PORT"));
    assert!(err(&["--peers", "a:1", "--replicas", "0"]).contains("between 1 and 16"));
    assert!(err(&["--peers", "a:1", "--node-id", "x"]).contains("only apply with --etcd"));
}

#[test]
fn gpu_tier_flags_resolve_or_say_what_is_missing() {
    let s = Settings::parse_from(["kvcache-server", "--gpu-tier", "1GiB", "--gpu-device", "1"]);
    let resolved = s.resolve();
    if cfg!(feature = "cuda") {
        assert_eq!(resolved.unwrap().gpu_tier, Some((1, 1 << 30)));
    } else {
        let e = resolved.unwrap_err();
        assert!(format!("{e:#}").contains("--features cuda"), "{e:#}");
    }
    let alone = Settings::parse_from(["kvcache-server", "--gpu-device", "0"]);
    assert!(format!("{:#}", alone.resolve().unwrap_err()).contains("only applies with --gpu-tier"));
    if cfg!(feature = "cuda") {
        let small = Settings::parse_from(["kvcache-server", "--gpu-tier", "1MiB"]);
        assert!(format!("{:#}", small.resolve().unwrap_err()).contains("at least 8MiB"));
    }
}

#[test]
fn disk_flags_resolve_or_say_what_is_missing() {
    let s = Settings::parse_from([
        "kvcache-server",
        "--disk",
        "/var/kv",
        "--disk-capacity",
        "2GiB",
    ]);
    let resolved = s.resolve();
    if cfg!(feature = "disk") {
        assert_eq!(resolved.unwrap().disk, Some(("/var/kv".into(), 2 << 30)));
    } else {
        let e = resolved.unwrap_err();
        assert!(format!("{e:#}").contains("--features disk"), "{e:#}");
    }
    let alone = Settings::parse_from(["kvcache-server", "--disk-capacity", "2GiB"]);
    assert!(format!("{:#}", alone.resolve().unwrap_err()).contains("only applies with --disk"));
}

#[test]
fn metrics_listener_can_be_turned_off() {
    let s = Settings::parse_from(["kvcache-server", "--metrics-listen", "off"]);
    assert_eq!(s.resolve().unwrap().metrics_listen, None);
}
