//! The CUDA paths against a real server process (cargo feature `cuda`): KV-shaped blocks go
//! GPU → cache → GPU through pinned host memory, and the server's GPU tier (`--gpu-tier`) holds
//! blocks beyond its memory pool. Both need a CUDA driver and a GPU; without them they skip and
//! say so, and the refusal of `--gpu-tier` is checked instead.
#![cfg(feature = "cuda")]

mod common;

use common::{ServerProcess, content, put_blocks, read_blocks};
use kvcache_client::{Client, ClientConfig, GetOutcome, PutBlocks, TransportChoice};
use kvcache_core::BlockKey;
use kvcache_transport::cuda::{Gpu, driver_present};

/// A vLLM-shaped block: 16 layers × (K, V) × 16 tokens × 8 heads × 128 × bf16 = 64 KiB per
/// layer and half, 2 MiB in all, saved and loaded as one value per layer.
const LAYERS: usize = 16;
const PER_LAYER: usize = 2 * 16 * 8 * 128 * 2;

fn gpu_or_skip(what: &str) -> Option<Gpu> {
    if !driver_present() {
        eprintln!("skipped {what}: no CUDA driver (libcuda.so) on this machine");
        return None;
    }
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("skipped {what}: {e}");
            None
        }
    }
}

async fn client(server: &ServerProcess, transport: TransportChoice) -> Client {
    let mut cfg = ClientConfig::new(&server.data);
    cfg.transport = transport;
    Client::connect(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_blocks_go_gpu_to_cache_to_gpu_unchanged() {
    let Some(gpu) = gpu_or_skip("the GPU → cache → GPU round trip") else {
        return;
    };
    let server = ServerProcess::start(&["--memory", "256MiB"]);
    for (t, transport) in [TransportChoice::Shm, TransportChoice::Tcp]
        .into_iter()
        .enumerate()
    {
        let name = format!("{transport:?}");
        let c = client(&server, transport).await;
        let keys: Vec<BlockKey> = (0..LAYERS as u128)
            .map(|l| BlockKey((t as u128 + 1) << 64 | l))
            .collect();
        // The "KV cache" on the GPU: every layer's block, distinct bytes.
        let host: Vec<u8> = keys.iter().flat_map(|k| content(*k, PER_LAYER)).collect();
        let mut kv = gpu.alloc(host.len()).unwrap();
        gpu.upload(&host, &mut kv).unwrap();
        gpu.synchronize().unwrap();

        // Save: device → pinned staging → cache, one value per layer.
        let mut staging = gpu.pinned(host.len()).unwrap();
        gpu.download(&kv, staging.as_mut_slice().unwrap()).unwrap();
        gpu.synchronize().unwrap();
        let staged = staging.as_slice().unwrap();
        let batch: Vec<(BlockKey, &[u8])> = keys
            .iter()
            .enumerate()
            .map(|(l, k)| (*k, &staged[l * PER_LAYER..(l + 1) * PER_LAYER]))
            .collect();
        c.put_many(&batch).await.unwrap();

        // Load into a second GPU buffer: cache → pinned staging (zero-copy into its segments)
        // → device.
        let mut landing = gpu.pinned(host.len()).unwrap();
        let mut dst: Vec<Vec<&mut [u8]>> = landing
            .as_mut_slice()
            .unwrap()
            .chunks_mut(PER_LAYER)
            .map(|s| vec![s])
            .collect();
        let out = c.get_many_into(&keys, &mut dst).await.unwrap();
        assert!(out.iter().all(|o| *o == GetOutcome::Hit), "{out:?}");
        let mut loaded = gpu.alloc(host.len()).unwrap();
        gpu.upload(landing.as_slice().unwrap(), &mut loaded)
            .unwrap();
        let mut back = vec![0u8; host.len()];
        gpu.download(&loaded, &mut back).unwrap();
        gpu.synchronize().unwrap();
        assert!(back == host, "{name}: bytes changed on the way");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_beyond_memory_come_back_from_the_gpu_tier() {
    if gpu_or_skip("the GPU tier").is_none() {
        // Without a driver the server must refuse the flag at start, naming why.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcache-server"))
            .args(["--memory", "16MiB", "--gpu-tier", "64MiB"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--mlock",
                "off",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("no CUDA driver"), "{err}");
        return;
    }
    const BLOCK: usize = 256 << 10;
    let server = ServerProcess::start(&["--memory", "32MiB", "--gpu-tier", "256MiB"]);
    let c = client(&server, TransportChoice::Tcp).await;
    let keys: Vec<BlockKey> = (1..=400u128).map(|i| BlockKey(i << 32)).collect();
    put_blocks(&c, &keys, BLOCK).await;
    // 100 MiB through a 32 MiB pool: most blocks now live on the GPU only.
    let hits = read_blocks(&c, &keys, BLOCK).await;
    assert_eq!(hits, keys.len());
    assert!(server.metric("kvcache_gpu_hits_total") > 0.0);
    assert_eq!(server.metric("kvcache_gpu_corrupt_blocks_total"), 0.0);
}
