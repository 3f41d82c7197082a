//! `kvcache-bench cuda`: KV blocks saved from GPU memory into the cache and loaded back, against
//! plain `cuMemcpy` between the same device memory and pinned host memory, in the same run
//! (needs a build with `--features cuda` and a GPU).
//!
//! The device holds a vLLM-shaped KV cache: `segments` tensors (layers × K/V), each with one
//! `segment`-byte slice per block. A block is its slice in every tensor, as the connector saves
//! it. The cache path is the staged one the connector takes on a CUDA engine:
//! - save: each block's slices are copied device → pinned host memory on a stream into one
//!   contiguous run, then `put_many` stores `batch` blocks a call. Two staging halves overlap
//!   the next batch's copies with this batch's puts.
//! - load: `get_many_into` brings `batch` blocks into a staging half (zero-copy, checked), then
//!   their slices are copied host → device into a second set of tensors, overlapping the next
//!   batch's gets.
//!
//! The ceilings are the same slice-sized copies between the same device tensors and pinned
//! memory with no cache in between, and one copy per tensor (the largest copies the hardware
//! does). Rounds alternate ceiling and cache; each round's loaded tensors are compared with the
//! saved ones byte for byte, outside the timed part.

use kvcache_core::ByteSize;

/// What to measure (the subcommand's flags).
#[derive(clap::Args)]
pub struct Plan {
    /// Bytes of KV on the device (rounded down to whole blocks).
    #[arg(long, default_value = "1GiB")]
    pub total: ByteSize,
    /// One block's slice in one KV tensor (vLLM: tokens per block × heads × head size ×
    /// dtype bytes).
    #[arg(long, default_value = "64KiB")]
    pub segment: ByteSize,
    /// KV tensors, so slices per block (layers × 2 for K and V).
    #[arg(long, default_value_t = 32)]
    pub segments: usize,
    /// Blocks per put/get call, as the connector batches a request's blocks.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Rounds, each measuring every path once; the figures sum them.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Move blocks over TCP instead of shared memory.
    #[arg(long)]
    pub tcp: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

impl Plan {
    /// Refuses flags out of range.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=64).contains(&self.batch)
                && (1..=1024).contains(&self.segments)
                && self.rounds > 0,
            "--batch must be 1..=64, --segments 1..=1024 and --rounds at least 1"
        );
        anyhow::ensure!(
            self.segment.0 >= 16 && self.segment.0 <= 64 << 20,
            "--segment must be 16B..=64MiB"
        );
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
pub async fn run(_plan: &Plan) -> anyhow::Result<serde_json::Value> {
    anyhow::bail!(
        "this kvcache-bench was built without the `cuda` feature: \
         cargo build --release -p kvcache-bench --features cuda"
    )
}

#[cfg(feature = "cuda")]
pub use with_cuda::run;

#[cfg(feature = "cuda")]
mod with_cuda {
    use std::time::Instant;

    use anyhow::Context;
    use kvcache_client::{Client, ClientConfig, GetOutcome, PutBlocks, TransportChoice};
    use kvcache_core::wire::PutStatus;
    use kvcache_core::{BlockKey, ByteSize};
    use kvcache_transport::cuda::{DeviceBuffer, Gpu};

    use super::Plan;
    use crate::systems::kvcache;

    /// The KV tensors on the device and how blocks lie in them.
    struct Kv {
        seg: usize,
        blocks: usize,
        batch: usize,
        tensors: Vec<DeviceBuffer>,
    }

    impl Kv {
        fn block_len(&self) -> usize {
            self.seg * self.tensors.len()
        }

        /// Batches of block indices, in order.
        fn batches(&self) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
            let (blocks, batch) = (self.blocks, self.batch);
            (0..blocks.div_ceil(batch)).map(move |i| i * batch..((i + 1) * batch).min(blocks))
        }

        /// Enqueues copies of `blocks`' slices into `host`, one contiguous run per block.
        fn download(
            &self,
            gpu: &Gpu,
            blocks: std::ops::Range<usize>,
            host: &mut [u8],
        ) -> anyhow::Result<()> {
            for (j, b) in blocks.enumerate() {
                let run = &mut host[j * self.block_len()..(j + 1) * self.block_len()];
                for (t, slice) in run.chunks_mut(self.seg).enumerate() {
                    gpu.download_at(&self.tensors[t], b * self.seg, slice)?;
                }
            }
            Ok(())
        }

        /// Enqueues copies of `host`'s block runs into `blocks`' slices of `into`.
        fn upload(
            &self,
            gpu: &Gpu,
            host: &[u8],
            blocks: std::ops::Range<usize>,
            into: &mut [DeviceBuffer],
        ) -> anyhow::Result<()> {
            for (j, b) in blocks.enumerate() {
                let run = &host[j * self.block_len()..(j + 1) * self.block_len()];
                for (t, slice) in run.chunks(self.seg).enumerate() {
                    gpu.upload_at(slice, &mut into[t], b * self.seg)?;
                }
            }
            Ok(())
        }
    }

    /// Distinct bytes for tensor `t`: every 8-byte word names its tensor and offset, so a
    /// slice that lands in the wrong place or tensor is caught.
    fn pattern(t: usize, len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len.div_ceil(8) as u64)
            .flat_map(|w| ((t as u64) << 48 | w).to_le_bytes())
            .collect();
        v.truncate(len);
        v
    }

    fn key(round: usize, block: usize) -> BlockKey {
        BlockKey(((round as u128 + 1) << 64) | block as u128)
    }

    /// Seconds of `f`, run once after the GPU is idle.
    fn timed(gpu: &Gpu, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
        gpu.synchronize()?;
        let started = Instant::now();
        f()?;
        gpu.synchronize()?;
        Ok(started.elapsed().as_secs_f64())
    }

    struct Seconds {
        save: f64,
        load: f64,
        d2h_slices: f64,
        h2d_slices: f64,
        d2h_large: f64,
        h2d_large: f64,
    }

    pub async fn run(plan: &Plan) -> anyhow::Result<serde_json::Value> {
        let gpu = Gpu::open(plan.device).context("kvcache-bench cuda needs a GPU")?;
        let seg = plan.segment.0 as usize;
        let block_len = seg * plan.segments;
        let blocks = (plan.total.0 as usize / block_len).max(plan.batch);
        let per_tensor = blocks * seg;
        let mut kv = Kv {
            seg,
            blocks,
            batch: plan.batch,
            tensors: Vec::with_capacity(plan.segments),
        };
        let mut loaded = Vec::with_capacity(plan.segments);
        let mut expected = Vec::with_capacity(plan.segments);
        for t in 0..plan.segments {
            let bytes = pattern(t, per_tensor);
            let mut dev = gpu.alloc(per_tensor)?;
            gpu.upload(&bytes, &mut dev)?;
            kv.tensors.push(dev);
            loaded.push(gpu.alloc(per_tensor)?);
            expected.push(bytes);
        }
        // Staging: two halves of `batch` blocks; the large copies use it whole.
        let half = plan.batch * block_len;
        let mut pinned = gpu.pinned((2 * half).max(per_tensor))?;
        let staging = pinned.as_mut_slice()?;
        gpu.synchronize()?;

        let total = blocks * block_len;
        let memory = format!("{}B", total + total / 2 + (64 << 20));
        let (_server, addr) = kvcache::start(&memory)?;
        let mut cfg = ClientConfig::new(&addr);
        cfg.transport = if plan.tcp {
            TransportChoice::Tcp
        } else {
            TransportChoice::Shm
        };
        let client = Client::connect(cfg).await?;

        let mut sum = Seconds {
            save: 0.0,
            load: 0.0,
            d2h_slices: 0.0,
            h2d_slices: 0.0,
            d2h_large: 0.0,
            h2d_large: 0.0,
        };
        for round in 0..plan.rounds {
            sum.d2h_slices += timed(&gpu, || {
                for (i, b) in kv.batches().enumerate() {
                    kv.download(&gpu, b, &mut staging[i % 2 * half..][..half])?;
                }
                Ok(())
            })?;
            sum.d2h_large += timed(&gpu, || {
                for t in &kv.tensors {
                    gpu.download(t, &mut staging[..per_tensor])?;
                }
                Ok(())
            })?;
            sum.save += save(&gpu, &kv, &client, round, staging).await?;

            for t in &mut loaded {
                gpu.zero(t)?;
            }
            sum.h2d_slices += timed(&gpu, || {
                for (i, b) in kv.batches().enumerate() {
                    kv.upload(&gpu, &staging[i % 2 * half..][..half], b, &mut loaded)?;
                }
                Ok(())
            })?;
            sum.h2d_large += timed(&gpu, || {
                for t in &mut loaded {
                    gpu.upload(&staging[..per_tensor], t)?;
                }
                Ok(())
            })?;
            for t in &mut loaded {
                gpu.zero(t)?;
            }
            sum.load += load(&gpu, &kv, &client, round, staging, &mut loaded).await?;
            verify(&gpu, &loaded, &expected, staging, round)?;
        }

        let bytes = (total * plan.rounds) as f64;
        let gbps = |s: f64| bytes / s / 1e9;
        let (save, load) = (gbps(sum.save), gbps(sum.load));
        let (d2h, h2d) = (gbps(sum.d2h_slices), gbps(sum.h2d_slices));
        let (d2h_large, h2d_large) = (gbps(sum.d2h_large), gbps(sum.h2d_large));
        let transport = client.path().as_str();
        println!(
            "cuda: {} in {blocks} blocks of {} ({} slices of {}), {} blocks a call, \
             {} rounds, over {transport}, on {}",
            ByteSize(total as u64),
            ByteSize(block_len as u64),
            plan.segments,
            plan.segment,
            plan.batch,
            plan.rounds,
            gpu.name()?,
        );
        println!("  save GPU -> cache:              {save:>6.2} GB/s");
        println!(
            "  cuMemcpy DtoH, same slices:     {d2h:>6.2} GB/s  (save = {:.2}x)",
            save / d2h
        );
        println!(
            "  cuMemcpy DtoH, one per tensor:  {d2h_large:>6.2} GB/s  (save = {:.2}x)",
            save / d2h_large
        );
        println!("  load cache -> GPU:              {load:>6.2} GB/s");
        println!(
            "  cuMemcpy HtoD, same slices:     {h2d:>6.2} GB/s  (load = {:.2}x)",
            load / h2d
        );
        println!(
            "  cuMemcpy HtoD, one per tensor:  {h2d_large:>6.2} GB/s  (load = {:.2}x)",
            load / h2d_large
        );
        println!("  every round's loaded tensors matched the saved ones byte for byte");
        Ok(serde_json::json!({
            "gpu": gpu.name()?,
            "transport": transport,
            "total_bytes": total,
            "block_bytes": block_len,
            "segment_bytes": seg,
            "segments": plan.segments,
            "batch": plan.batch,
            "rounds": plan.rounds,
            "save_gbps": save,
            "load_gbps": load,
            "cumemcpy_dtoh_slices_gbps": d2h,
            "cumemcpy_htod_slices_gbps": h2d,
            "cumemcpy_dtoh_large_gbps": d2h_large,
            "cumemcpy_htod_large_gbps": h2d_large,
            "save_vs_dtoh_slices": save / d2h,
            "load_vs_htod_slices": load / h2d,
            "verified": true,
        }))
    }

    /// Seconds to save every block: copies of batch i+1 run while batch i is put.
    async fn save(
        gpu: &Gpu,
        kv: &Kv,
        client: &Client,
        round: usize,
        staging: &mut [u8],
    ) -> anyhow::Result<f64> {
        let half = kv.batch * kv.block_len();
        let (a, b) = staging[..2 * half].split_at_mut(half);
        let halves = [a, b];
        let batches: Vec<_> = kv.batches().collect();
        gpu.synchronize()?;
        let started = Instant::now();
        kv.download(gpu, batches[0].clone(), halves[0])?;
        gpu.synchronize()?;
        for (i, blocks) in batches.iter().enumerate() {
            if let Some(next) = batches.get(i + 1) {
                kv.download(gpu, next.clone(), halves[(i + 1) % 2])?;
            }
            let host = &*halves[i % 2];
            let puts: Vec<(BlockKey, &[u8])> = blocks
                .clone()
                .enumerate()
                .map(|(j, blk)| {
                    (
                        key(round, blk),
                        &host[j * kv.block_len()..][..kv.block_len()],
                    )
                })
                .collect();
            let stored = client.put_many(&puts).await?;
            anyhow::ensure!(
                stored.iter().all(|s| *s == PutStatus::Stored),
                "the server did not store every block: {stored:?}"
            );
            gpu.synchronize()?;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Seconds to load every block: gets of batch i+1 run while batch i is copied up.
    async fn load(
        gpu: &Gpu,
        kv: &Kv,
        client: &Client,
        round: usize,
        staging: &mut [u8],
        into: &mut [DeviceBuffer],
    ) -> anyhow::Result<f64> {
        let half = kv.batch * kv.block_len();
        let (a, b) = staging[..2 * half].split_at_mut(half);
        let halves = [a, b];
        gpu.synchronize()?;
        let started = Instant::now();
        for (i, blocks) in kv.batches().enumerate() {
            let keys: Vec<BlockKey> = blocks.clone().map(|blk| key(round, blk)).collect();
            let host = &mut *halves[i % 2];
            let mut dst: Vec<Vec<&mut [u8]>> = host
                .chunks_mut(kv.block_len())
                .take(keys.len())
                .map(|run| vec![run])
                .collect();
            let got = client.get_many_into(&keys, &mut dst).await?;
            anyhow::ensure!(
                got.iter().all(|g| *g == GetOutcome::Hit),
                "round {round}, blocks {blocks:?}: {got:?}"
            );
            // The other half's copies (batch i-1) must be done before batch i+1 lands there.
            gpu.synchronize()?;
            kv.upload(gpu, &*halves[i % 2], blocks, into)?;
        }
        gpu.synchronize()?;
        Ok(started.elapsed().as_secs_f64())
    }

    fn verify(
        gpu: &Gpu,
        loaded: &[DeviceBuffer],
        expected: &[Vec<u8>],
        staging: &mut [u8],
        round: usize,
    ) -> anyhow::Result<()> {
        for (t, (dev, want)) in loaded.iter().zip(expected).enumerate() {
            let back = &mut staging[..want.len()];
            gpu.download(dev, back)?;
            gpu.synchronize()?;
            anyhow::ensure!(
                back == &want[..],
                "round {round}: tensor {t} came back from the cache with different bytes"
            );
        }
        Ok(())
    }
}
