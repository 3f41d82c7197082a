//! RDMA negotiation against the real server binary over loopback. Without a device (this
//! machine: no RDMA in the kernel) or without the `rdma` feature, the node says so in `Ping`,
//! refuses `RdmaConnect` with the reason and keeps serving the connection, and clients fall
//! back to TCP naming why, or fail clearly when they asked for RDMA only. With a device, the
//! data path test moves real blocks with one-sided verbs; without one it says what it skipped.

mod common;

use std::io::Write;
use std::net::TcpStream;

use common::{ServerProcess, content};
use kvcache_client::{
    Client, ClientConfig, ClientError, GetOutcome, PathKind, PutBlocks, TransportChoice,
};
use kvcache_core::BlockKey;
use kvcache_core::wire::{self, ErrorReply, FrameHeader, Op, PingReply, RdmaConnectRequest};
use kvcache_transport::rdma::{self, Availability, QpEndpoint};
use prost::Message;

fn has_device() -> Option<String> {
    match rdma::probe() {
        Availability::Device { name } => Some(name),
        _ => None,
    }
}

/// Sends one request on a raw socket and reads its reply frame.
fn call(s: &mut TcpStream, op: Op, id: u32, req: &impl Message) -> (FrameHeader, Vec<u8>) {
    let control = req.encode_to_vec();
    let mut frame = FrameHeader::request(op, id, control.len(), 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&control);
    s.write_all(&frame).unwrap();
    let mut head = [0u8; wire::HEADER_LEN];
    std::io::Read::read_exact(s, &mut head).unwrap();
    let h = FrameHeader::decode(&head, &wire::FrameLimits::default()).unwrap();
    let mut body = vec![0u8; h.control_len as usize];
    std::io::Read::read_exact(s, &mut body).unwrap();
    (h, body)
}

fn endpoint() -> Vec<u8> {
    QpEndpoint {
        qpn: 0x42,
        psn: 7,
        lid: 1,
        gid: [0; 16],
        mtu: 3,
    }
    .encode()
    .to_vec()
}

/// `RdmaConnect` on a node that serves no RDMA: an error naming why; the connection goes on.
fn refused_with(server: &ServerProcess, expect: &str) {
    let mut s = TcpStream::connect(&server.data).unwrap();
    let (h, body) = call(&mut s, Op::Ping, 1, &wire::PingRequest {});
    assert!(h.reply);
    let ping = PingReply::decode(body.as_slice()).unwrap();
    assert_eq!(ping.rdma_device, "", "no device, so none advertised");
    let req = RdmaConnectRequest {
        endpoint: endpoint(),
        staging_bytes: 1 << 20,
    };
    let (h, body) = call(&mut s, Op::RdmaConnect, 2, &req);
    assert_eq!(h.op, Op::Error);
    let err = ErrorReply::decode(body.as_slice()).unwrap();
    assert!(
        err.message.contains("serves no RDMA") && err.message.contains(expect),
        "{}",
        err.message
    );
    // The shared-memory ops stay refused on this connection, and it still serves.
    let (h, body) = call(
        &mut s,
        Op::LeaseGet,
        3,
        &wire::LeaseGetRequest {
            keys: vec![0; 16],
            verify: false,
        },
    );
    assert_eq!(h.op, Op::Error);
    let err = ErrorReply::decode(body.as_slice()).unwrap();
    assert!(err.message.contains("rdma_connect"), "{}", err.message);
    let (h, _) = call(&mut s, Op::Ping, 4, &wire::PingRequest {});
    assert!(h.reply && h.op == Op::Ping);
}

#[test]
fn a_node_without_rdma_refuses_rdma_connect_with_the_reason_and_keeps_serving() {
    if let Some(name) = has_device() {
        eprintln!("skipped: this host has an RDMA device ({name}); see the data-path test");
        return;
    }
    let server = ServerProcess::start(&["--memory", "64MiB", "--shm-socket", "off"]);
    let why = if cfg!(feature = "rdma") {
        "no RDMA device"
    } else {
        "built without the `rdma` feature"
    };
    refused_with(&server, why);
    let off = ServerProcess::start(&["--memory", "64MiB", "--rdma", "off"]);
    refused_with(&off, "turned off with --rdma off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_fall_back_to_tcp_naming_why_or_fail_when_rdma_was_required() {
    if has_device().is_some() {
        eprintln!("skipped: this host has an RDMA device; see the data-path test");
        return;
    }
    let server = ServerProcess::start(&["--memory", "64MiB", "--shm-socket", "off"]);
    let mut cfg = ClientConfig::new(server.data.clone());
    cfg.transport = TransportChoice::Rdma;
    match Client::connect(cfg.clone()).await {
        Err(ClientError::RdmaUnavailable(why)) => {
            assert!(why.contains("serves no RDMA"), "{why}")
        }
        Err(other) => panic!("expected RdmaUnavailable, got {other}"),
        Ok(c) => panic!("connected over {} without a device", c.path()),
    }
    cfg.transport = TransportChoice::Auto;
    let c = Client::connect(cfg).await.unwrap();
    assert_eq!(c.path(), PathKind::Tcp);
    let why = c.shm_fallback_reason().expect("a reason for TCP");
    assert!(
        why.contains("shared memory off") && why.contains("RDMA"),
        "one line names both reasons: {why}"
    );
    let value = content(BlockKey(9), 300_000);
    c.put(BlockKey(9), &value).await.unwrap();
    assert_eq!(
        c.get(BlockKey(9)).await.unwrap().as_deref(),
        Some(&value[..])
    );
    // GPU-direct needs RDMA: without it the GPU calls say so and name the way out.
    let spans = [vec![(0x7f00_0000_0000u64, 300_000u64)]];
    for err in [
        c.get_many_into_gpu(&[BlockKey(9)], &spans)
            .await
            .unwrap_err(),
        c.put_many_from_gpu(&[BlockKey(10)], &spans)
            .await
            .unwrap_err(),
    ] {
        let why = err.to_string();
        assert!(
            why.contains("needs an RDMA connection") && why.contains("uses tcp"),
            "{why}"
        );
        assert!(why.contains("pinned host memory"), "{why}");
    }
    // Sizes are checked first, the same way for host and GPU memory.
    let empty = c.put_many_from_gpu(&[BlockKey(10)], &[vec![]]).await;
    let host_empty = c.put(BlockKey(10), &[]).await;
    for err in [empty.unwrap_err(), host_empty.unwrap_err()] {
        assert!(err.to_string().contains("block 0 has 0 bytes"), "{err}");
    }
    assert_eq!(c.exists(&[BlockKey(10)]).await.unwrap(), [false]);
}

/// The data path, where a device exists: puts and gets over one-sided verbs, into registered
/// and unregistered memory, every byte checked; the node's RDMA byte counters move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_move_over_rdma_into_registered_and_plain_memory() {
    let Some(name) = has_device() else {
        eprintln!(
            "skipped: the RDMA data path needs a device: {}",
            rdma::probe()
        );
        return;
    };
    eprintln!("RDMA device {name}");
    let server = ServerProcess::start(&["--memory", "256MiB", "--shm-socket", "off"]);
    let mut cfg = ClientConfig::new(server.data.clone());
    cfg.transport = TransportChoice::Rdma;
    let c = Client::connect(cfg).await.expect("RDMA connect");
    assert_eq!(c.path(), PathKind::Rdma);
    let keys: Vec<BlockKey> = (1..=64u128).map(BlockKey).collect();
    let values: Vec<Vec<u8>> = keys.iter().map(|&k| content(k, 256 << 10)).collect();
    let blocks: Vec<(BlockKey, &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(&k, v)| (k, &v[..]))
        .collect();
    for s in c.put_many(&blocks).await.unwrap() {
        assert_eq!(s, wire::PutStatus::Stored);
    }
    // Plain memory: through the landing buffer.
    for (k, v) in keys.iter().zip(&values) {
        assert_eq!(c.get(*k).await.unwrap().as_deref(), Some(&v[..]));
    }
    // Registered memory, each block scattered over 4 segments.
    let mut arena = vec![0u8; 64 * (256 << 10)];
    // SAFETY: `arena` outlives the registration (unregistered below).
    unsafe { c.register_memory(arena.as_mut_ptr() as usize, arena.len()) }.unwrap();
    {
        let mut dst: Vec<Vec<&mut [u8]>> = arena
            .chunks_mut(256 << 10)
            .map(|b| b.chunks_mut(64 << 10).collect())
            .collect();
        let out = c.get_many_into(&keys, &mut dst).await.unwrap();
        assert!(out.iter().all(|o| *o == GetOutcome::Hit), "{out:?}");
    }
    for (got, want) in arena.chunks(256 << 10).zip(&values) {
        assert!(
            got == &want[..],
            "a block read into registered memory differs"
        );
    }
    assert!(c.unregister_memory(arena.as_ptr() as usize));
    assert!(
        server.metric("kvcache_bytes_sent_total{transport=\"rdma\"}") >= (128 * (256 << 10)) as f64
    );
}

/// GPU-direct, where a GPU and an RDMA device exist: KV-shaped blocks WRITE straight from GPU
/// memory into the node and READ straight back into other GPU memory, every byte compared.
#[cfg(all(feature = "rdma", feature = "cuda"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_move_between_gpu_memory_and_the_node_with_gpu_direct() {
    use kvcache_transport::cuda::{Gpu, driver_present};
    let Some(name) = has_device() else {
        eprintln!(
            "skipped: GPU-direct needs an RDMA device: {}",
            rdma::probe()
        );
        return;
    };
    if !driver_present() {
        eprintln!("skipped: GPU-direct needs a GPU: no CUDA driver (libcuda.so) on this machine");
        return;
    }
    let gpu = Gpu::open(0).unwrap();
    let server = ServerProcess::start(&["--memory", "256MiB", "--shm-socket", "off"]);
    let mut cfg = ClientConfig::new(server.data.clone());
    cfg.transport = TransportChoice::Rdma;
    let c = Client::connect(cfg).await.expect("RDMA connect");
    // 32 blocks of 16 segments × 16 KiB, the segments strided through one "KV tensor".
    const BLOCKS: usize = 32;
    const SEGS: usize = 16;
    const SEG: usize = 16 << 10;
    let host: Vec<u8> = content(BlockKey(77), BLOCKS * SEGS * SEG);
    let mut src = gpu.alloc(host.len()).unwrap();
    gpu.upload(&host, &mut src).unwrap();
    let dst = gpu.alloc(host.len()).unwrap();
    gpu.synchronize().unwrap();
    for buf in [&src, &dst] {
        // SAFETY: both buffers outlive the client's registrations (the client drops first).
        match unsafe { c.register_gpu_memory(&gpu, gpu.address(buf), host.len()) } {
            Ok(method) => eprintln!("RDMA device {name}: GPU memory registered by {method}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        }
    }
    // Segment s of block b lies at (s * BLOCKS + b) * SEG: layer-major, as vLLM lays out KV.
    let spans = |base: u64| -> Vec<Vec<(u64, u64)>> {
        (0..BLOCKS)
            .map(|b| {
                (0..SEGS)
                    .map(|s| (base + ((s * BLOCKS + b) * SEG) as u64, SEG as u64))
                    .collect()
            })
            .collect()
    };
    let keys: Vec<BlockKey> = (0..BLOCKS as u128)
        .map(|b| BlockKey(0x6d << 64 | b))
        .collect();
    let stored = c
        .put_many_from_gpu(&keys, &spans(gpu.address(&src)))
        .await
        .unwrap();
    assert!(
        stored.iter().all(|s| *s == wire::PutStatus::Stored),
        "{stored:?}"
    );
    let got = c
        .get_many_into_gpu(&keys, &spans(gpu.address(&dst)))
        .await
        .unwrap();
    assert!(got.iter().all(|o| *o == GetOutcome::Hit), "{got:?}");
    let mut back = vec![0u8; host.len()];
    gpu.download(&dst, &mut back).unwrap();
    gpu.synchronize().unwrap();
    assert!(
        back == host,
        "bytes changed between GPU memory and the node"
    );
    // A TCP client sees the same blocks, byte for byte, as the GPU held them.
    let tcp = {
        let mut cfg = ClientConfig::new(server.data.clone());
        cfg.transport = TransportChoice::Tcp;
        Client::connect(cfg).await.unwrap()
    };
    let first = tcp.get(keys[0]).await.unwrap().unwrap();
    let want: Vec<u8> = (0..SEGS)
        .flat_map(|s| host[s * BLOCKS * SEG..][..SEG].iter().copied())
        .collect();
    assert!(first == want);
    drop(c);
}
