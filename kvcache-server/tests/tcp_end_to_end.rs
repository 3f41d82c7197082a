//! The real server binary over real loopback sockets: round trips under concurrency, every
//! kind of bad input, faults mid-request, eviction under leases, corruption, shutdown.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Rng, ServerProcess, content, error_code, error_reply, read_frame, send_request};
use kvcache_client::{Client, ClientConfig, ClientError, GetOutcome, PutBlocks, TransportChoice};
use kvcache_core::BlockKey;
use kvcache_core::wire::{self, ErrorCode, FrameHeader, GetRequest, Op, PutRequest, PutStatus};
use prost::Message;

/// A client that moves bytes over TCP even though the node is on this host.
async fn client(server: &ServerProcess) -> Client {
    Client::connect(tcp_config(server)).await.expect("connect")
}

fn tcp_config(server: &ServerProcess) -> ClientConfig {
    let mut cfg = ClientConfig::new(server.data.clone());
    cfg.transport = TransportChoice::Tcp;
    cfg
}

fn assert_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

fn raw_put_frame(keys: &[BlockKey], lens: &[u32], payload_len: usize) -> Vec<u8> {
    let control = PutRequest {
        keys: wire::encode_keys(keys),
        lens: lens.to_vec(),
    }
    .encode_to_vec();
    let mut out = FrameHeader::request(Op::Put, 1, control.len(), payload_len)
        .encode()
        .to_vec();
    out.extend_from_slice(&control);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_write_and_read_thousands_of_random_blocks_verifying_every_byte() {
    let server = ServerProcess::start(&["--memory", "512MiB"]);
    const CLIENTS: u64 = 8;
    const PER_CLIENT: usize = 400;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let cl = client(&server).await;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(c + 1);
            let blocks: Vec<(BlockKey, usize)> = (0..PER_CLIENT)
                .map(|_| (rng.key(), 1 + (rng.next() % (128 * 1024)) as usize))
                .collect();
            for chunk in blocks.chunks(16) {
                let values = common::contents(chunk);
                let batch = common::batch(chunk, &values);
                let st = cl.put_many(&batch).await.unwrap();
                assert!(st.iter().all(|s| *s == PutStatus::Stored), "{st:?}");
            }
            blocks
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), CLIENTS as usize * PER_CLIENT);
    // Every client reads every other client's blocks, half through the scatter path.
    let mut readers = Vec::new();
    for r in 0..4usize {
        let cl = client(&server).await;
        let all = all.clone();
        readers.push(tokio::spawn(async move {
            for (i, chunk) in all.chunks(32).enumerate() {
                let keys: Vec<BlockKey> = chunk.iter().map(|b| b.0).collect();
                if (i + r) % 2 == 0 {
                    let got = cl.get_many(&keys).await.unwrap();
                    for ((k, l), v) in chunk.iter().zip(got) {
                        assert_eq!(v.as_deref(), Some(&content(*k, *l)[..]), "block {k}");
                    }
                } else {
                    // Scatter each block over three segments, as KV lands in several tensors.
                    let mut bufs: Vec<Vec<u8>> = chunk.iter().map(|b| vec![0u8; b.1]).collect();
                    let mut dst: Vec<Vec<&mut [u8]>> = bufs
                        .iter_mut()
                        .map(|b| {
                            let third = b.len() / 3;
                            let (a, rest) = b.split_at_mut(third);
                            let (m, z) = rest.split_at_mut(rest.len() / 2);
                            vec![a, m, z]
                        })
                        .collect();
                    let out = cl.get_many_into(&keys, &mut dst).await.unwrap();
                    assert!(out.iter().all(|o| *o == GetOutcome::Hit), "{out:?}");
                    for ((k, l), b) in chunk.iter().zip(&bufs) {
                        assert_eq!(b, &content(*k, *l), "block {k}");
                    }
                }
            }
        }));
    }
    for r in readers {
        r.await.unwrap();
    }
    let cl = client(&server).await;
    let keys: Vec<BlockKey> = all.iter().map(|b| b.0).collect();
    assert!(cl.exists(&keys).await.unwrap().iter().all(|p| *p));
    let mut rng = Rng(999);
    let mut chain = keys[..10].to_vec();
    chain.push(rng.key());
    chain.extend_from_slice(&keys[10..20]);
    assert_eq!(cl.prefix_match(&chain).await.unwrap(), 10);
    assert_eq!(cl.get(rng.key()).await.unwrap(), None);
    assert_eq!(server.metric("kvcache_blocks_stored"), all.len() as f64);
    assert_eq!(server.metric("kvcache_checksum_failures_total"), 0.0);
    assert_eq!(server.metric("kvcache_active_leases"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_or_refuses_only_the_offender_and_loses_nothing() {
    let server = ServerProcess::start(&["--memory", "64MiB", "--max-frame", "8MiB"]);
    let good = client(&server).await;
    let keys: Vec<BlockKey> = (0..20).map(|i| BlockKey(1000 + i)).collect();
    for &k in &keys {
        good.put(k, &content(k, 70_000)).await.unwrap();
    }
    let addr = server.data.clone();
    let check_intact = async |what: &str| {
        let got = good
            .get_many(&keys)
            .await
            .unwrap_or_else(|e| panic!("after {what}: {e}"));
        for (k, v) in keys.iter().zip(got) {
            assert_eq!(
                v.as_deref(),
                Some(&content(*k, 70_000)[..]),
                "after {what}: block {k}"
            );
        }
    };

    // Garbage bytes: error reply, connection closed.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (h, control) = read_frame(&mut s).expect("an error reply before closing");
    assert_eq!(
        (h.op, error_code(&control)),
        (Op::Error, ErrorCode::Malformed)
    );
    assert_closed(&mut s);
    check_intact("garbage").await;

    // A frame over the maximum: refused before its body is read.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&raw_put_frame(&[BlockKey(1)], &[9 << 20], 9 << 20))
        .unwrap();
    let (_, control) = read_frame(&mut s).unwrap();
    assert_eq!(error_code(&control), ErrorCode::TooLarge);
    let msg = wire::ErrorReply::decode(&control[..]).unwrap().message;
    assert!(msg.contains("exceeds the frame limit"), "{msg}");
    assert_closed(&mut s);
    check_intact("oversized frame").await;

    // An unknown op.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut frame = FrameHeader::request(Op::Ping, 1, 0, 0).encode();
    frame[3] = 0x42;
    s.write_all(&frame).unwrap();
    let (_, control) = read_frame(&mut s).unwrap();
    assert!(
        wire::ErrorReply::decode(&control[..])
            .unwrap()
            .message
            .contains("unknown op")
    );
    assert_closed(&mut s);

    // A length that disagrees with the payload: refused, but the framing is intact so the
    // connection goes on and its next request is served.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut frame = raw_put_frame(&[BlockKey(7), BlockKey(8)], &[100, 100], 150);
    frame.extend_from_slice(&[0xab; 150]);
    s.write_all(&frame).unwrap();
    let (h, control) = read_frame(&mut s).unwrap();
    assert_eq!(
        (h.op, error_code(&control)),
        (Op::Error, ErrorCode::Malformed)
    );
    s.write_all(&FrameHeader::request(Op::Ping, 2, 0, 0).encode())
        .unwrap();
    let (h, _) = read_frame(&mut s).unwrap();
    assert_eq!((h.op, h.reply, h.request_id), (Op::Ping, true, 2));
    assert!(
        !good
            .exists(&[BlockKey(7), BlockKey(8)])
            .await
            .unwrap()
            .contains(&true)
    );

    // An undecodable control message, and a ragged key list: refused, connection goes on.
    let mut bad = FrameHeader::request(Op::Get, 3, 3, 0).encode().to_vec();
    bad.extend_from_slice(&[0xff, 0xff, 0xff]);
    s.write_all(&bad).unwrap();
    assert_eq!(read_frame(&mut s).unwrap().0.op, Op::Error);
    let ragged = GetRequest {
        keys: vec![1; 17],
        ..Default::default()
    }
    .encode_to_vec();
    let mut bad = FrameHeader::request(Op::Get, 4, ragged.len(), 0)
        .encode()
        .to_vec();
    bad.extend_from_slice(&ragged);
    s.write_all(&bad).unwrap();
    let (_, control) = read_frame(&mut s).unwrap();
    assert!(
        wire::ErrorReply::decode(&control[..])
            .unwrap()
            .message
            .contains("multiple of 16")
    );

    // A payload on a request that takes none: refused, skipped, the connection goes on.
    let get = GetRequest {
        keys: wire::encode_keys(&keys[..1]),
        ..Default::default()
    }
    .encode_to_vec();
    let mut bad = FrameHeader::request(Op::Get, 5, get.len(), 10)
        .encode()
        .to_vec();
    bad.extend_from_slice(&get);
    bad.extend_from_slice(&[0u8; 10]);
    s.write_all(&bad).unwrap();
    let (_, control) = read_frame(&mut s).unwrap();
    let msg = wire::ErrorReply::decode(&control[..]).unwrap().message;
    assert!(msg.contains("carry no payload"), "{msg}");
    s.write_all(&FrameHeader::request(Op::Ping, 6, 0, 0).encode())
        .unwrap();
    assert_eq!(read_frame(&mut s).unwrap().0.request_id, 6);

    // A truncated frame: half a header, then the client goes away.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&FrameHeader::request(Op::Ping, 1, 0, 0).encode()[..7])
        .unwrap();
    drop(s);
    server.wait_metric("kvcache_protocol_errors_total{kind=\"truncated\"}", |v| {
        v >= 1.0
    });

    check_intact("all bad input").await;
    assert!(server.metric("kvcache_protocol_errors_total{kind=\"bad_magic\"}") >= 1.0);
    assert!(server.metric("kvcache_protocol_errors_total{kind=\"payload_too_large\"}") >= 1.0);
    assert!(server.metric("kvcache_protocol_errors_total{kind=\"unknown_op\"}") >= 1.0);
    assert!(server.metric("kvcache_protocol_errors_total{kind=\"malformed\"}") >= 4.0);
    assert_eq!(server.metric("kvcache_blocks_stored"), 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_larger_than_the_pool_gets_a_clear_status_and_client_side_limits_are_checked() {
    let server = ServerProcess::start(&["--memory", "4MiB"]);
    let cl = client(&server).await;
    let big = vec![1u8; 5 << 20];
    assert_eq!(
        cl.put(BlockKey(1), &big).await.unwrap(),
        PutStatus::TooLarge
    );
    assert_eq!(
        cl.put(BlockKey(2), b"small").await.unwrap(),
        PutStatus::Stored
    );
    assert_eq!(
        cl.put(BlockKey(2), b"small").await.unwrap(),
        PutStatus::AlreadyPresent
    );
    let err = cl.put(BlockKey(3), b"").await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument(_)), "{err}");
    assert_eq!(
        server.metric("kvcache_put_rejected_blocks_total{reason=\"too_large\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dying_mid_put_leaves_no_partial_block_and_no_used_memory() {
    let server = ServerProcess::start(&["--memory", "16MiB"]);
    let mut s = TcpStream::connect(&server.data).unwrap();
    let key = BlockKey(77);
    s.write_all(&raw_put_frame(&[key], &[1 << 20], 1 << 20))
        .unwrap();
    s.write_all(&vec![0x11; 300_000]).unwrap();
    server.wait_metric("kvcache_pool_used_bytes", |v| v > 0.0);
    drop(s);
    assert_eq!(
        server.wait_metric("kvcache_pool_used_bytes", |v| v == 0.0),
        0.0,
        "allocation reclaimed"
    );
    let cl = client(&server).await;
    assert_eq!(cl.get(key).await.unwrap(), None);
    assert_eq!(
        cl.put(key, &content(key, 1 << 20)).await.unwrap(),
        PutStatus::Stored
    );
    assert_eq!(cl.get(key).await.unwrap().unwrap(), content(key, 1 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_evicts_but_never_a_leased_block_and_a_dead_reader_frees_its_leases() {
    let server = ServerProcess::start(&[
        "--memory",
        "64MiB",
        "--high-watermark",
        "1",
        "--low-watermark",
        "1",
    ]);
    let cl = client(&server).await;
    let block = 1 << 20;
    let pinned: Vec<BlockKey> = (0..32).map(|i| BlockKey(5000 + i)).collect();
    for &k in &pinned {
        cl.put(k, &content(k, block)).await.unwrap();
    }
    // A reader asks for 32 MiB and never reads: the server blocks mid-reply, holding leases.
    let mut stalled = TcpStream::connect(&server.data).unwrap();
    let req = GetRequest {
        keys: wire::encode_keys(&pinned),
        ..Default::default()
    }
    .encode_to_vec();
    stalled
        .write_all(&FrameHeader::request(Op::Get, 1, req.len(), 0).encode())
        .unwrap();
    stalled.write_all(&req).unwrap();
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 32.0),
        32.0
    );

    // Fill the pool twice over: everything unleased may go, the leased blocks must stay.
    for i in 0..128u128 {
        let k = BlockKey(90_000 + i);
        let st = cl.put(k, &content(k, block)).await.unwrap();
        assert!(
            matches!(st, PutStatus::Stored | PutStatus::PoolFull),
            "{st:?}"
        );
    }
    assert!(server.metric("kvcache_evictions_total") > 0.0);
    assert!(
        cl.exists(&pinned).await.unwrap().iter().all(|p| *p),
        "a leased block was evicted"
    );
    for (k, v) in pinned.iter().zip(cl.get_many(&pinned).await.unwrap()) {
        assert_eq!(v.unwrap(), content(*k, block));
    }

    // The reader dies without reading: its leases are released and the blocks become evictable.
    drop(stalled);
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 0.0),
        0.0
    );
    for i in 0..64u128 {
        let k = BlockKey(200_000 + i);
        assert_eq!(
            cl.put(k, &content(k, block)).await.unwrap(),
            PutStatus::Stored
        );
    }
    assert!(
        !cl.exists(&pinned).await.unwrap().iter().all(|p| *p),
        "released blocks are evictable again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_block_is_reported_as_a_miss_never_returned() {
    let server = ServerProcess::start(&["--memory", "64MiB", "--enable-test-hooks"]);
    let cl = client(&server).await;
    let (small, big, other) = (BlockKey(0xdead), BlockKey(0xd00d), BlockKey(0xbeef));
    let corrupt = |k: BlockKey| {
        assert_eq!(
            server
                .http("POST", &format!("/debug/corrupt/{}", k.to_hex()))
                .0,
            200
        )
    };
    cl.put(small, &content(small, 100_000)).await.unwrap();
    cl.put(big, &content(big, 4 << 20)).await.unwrap();
    cl.put(other, &content(other, 100_000)).await.unwrap();
    corrupt(small);
    corrupt(big);
    // The client checks every chunk where it lands (the big block is damaged in its middle
    // chunk): both damaged blocks are misses, and its report makes the node check them itself
    // and drop them.
    let got = cl.get_many(&[other, big, small]).await.unwrap();
    assert_eq!(got[0].as_deref(), Some(&content(other, 100_000)[..]));
    assert_eq!(got[1], None, "corrupt bytes must never be returned");
    assert_eq!(got[2], None, "corrupt bytes must never be returned");
    assert_eq!(
        server.wait_metric("kvcache_checksum_failures_total", |v| v == 2.0),
        2.0
    );
    assert_eq!(
        server.metric("kvcache_suspect_blocks_total{result=\"confirmed\"}"),
        2.0
    );
    let mut buf = vec![0u8; 100_000];
    let out = cl
        .get_many_into(&[small], &mut [vec![&mut buf[..]]])
        .await
        .unwrap();
    assert_eq!(out, [GetOutcome::Miss], "dropped from the index");
    assert_eq!(server.metric("kvcache_active_leases"), 0.0);
    // A fresh, intact copy can be stored again under the same key.
    assert_eq!(
        cl.put(big, &content(big, 4 << 20)).await.unwrap(),
        PutStatus::Stored
    );
    assert_eq!(cl.get(big).await.unwrap().unwrap(), content(big, 4 << 20));

    // A reader that does not check (no `client_verifies`): the node checks each chunk before
    // sending it, so the damaged middle chunk is never sent; the reply stops short, the
    // connection ends, and the block is dropped.
    corrupt(big);
    let mut s = TcpStream::connect(&server.data).unwrap();
    let req = GetRequest {
        keys: wire::encode_keys(&[other, big]),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = FrameHeader::request(Op::Get, 1, req.len(), 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&req);
    s.write_all(&frame).unwrap();
    let (h, control) = read_frame(&mut s).unwrap();
    let reply = wire::GetReply::decode(&control[..]).unwrap();
    assert_eq!(reply.lens, [100_000, 4 << 20]);
    assert!(
        reply.chunk_sums.is_empty(),
        "sums only for a client that checks"
    );
    let mut sent = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut sent);
    assert!(
        sent.len() < h.payload_len as usize && sent.len() >= 100_000,
        "{} of {} payload bytes sent",
        sent.len(),
        h.payload_len
    );
    assert_eq!(&sent[..100_000], &content(other, 100_000)[..]);
    assert_eq!(
        server.wait_metric("kvcache_checksum_failures_total", |v| v == 3.0),
        3.0
    );
    assert_eq!(cl.get(big).await.unwrap(), None);
    // Without the flag the hook does not exist.
    let plain = ServerProcess::start(&["--memory", "4MiB"]);
    assert_eq!(
        plain
            .http("POST", &format!("/debug/corrupt/{}", small.to_hex()))
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_typed_connect_error_and_sigterm_exits_cleanly() {
    let mut server = ServerProcess::start(&["--memory", "4MiB"]);
    let addr = server.data.clone();
    let cl = client(&server).await;
    assert_eq!(server.http("GET", "/health").0, 200);
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    let err = Client::connect(ClientConfig::new(addr))
        .await
        .err()
        .expect("server is gone");
    assert!(
        matches!(err, ClientError::Connect { .. }) && err.is_unavailable(),
        "{err}"
    );
    let err = cl.get(BlockKey(1)).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reuse_pooled_connections_instead_of_reconnecting() {
    let server = ServerProcess::start(&["--memory", "16MiB"]);
    let cl = client(&server).await;
    for i in 0..50u128 {
        cl.put(BlockKey(i), &content(BlockKey(i), 1000))
            .await
            .unwrap();
        assert!(cl.get(BlockKey(i)).await.unwrap().is_some());
    }
    assert_eq!(
        server.metric("kvcache_connections_total"),
        1.0,
        "sequential calls share one connection"
    );
    // Concurrent calls open at most max_connections (16) and keep them.
    let tasks: Vec<_> = (0..64u128)
        .map(|i| {
            let cl = cl.clone();
            tokio::spawn(async move { cl.get(BlockKey(i % 50)).await.unwrap() })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().is_some());
    }
    let opened = server.metric("kvcache_connections_total");
    assert!(
        (1.0..=16.0).contains(&opened),
        "opened {opened} connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_costs_at_most_the_client_timeout_then_serves_again() {
    let server = ServerProcess::start(&["--memory", "16MiB"]);
    let mut cfg = tcp_config(&server);
    cfg.timeout = Duration::from_millis(300);
    let cl = Client::connect(cfg.clone()).await.unwrap();
    cl.put(BlockKey(1), b"kv").await.unwrap();
    let pid = server.child.id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Signals arrive asynchronously: wait until the kernel reports the process stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") T ")
    {
        assert!(std::time::Instant::now() < deadline, "server did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = std::time::Instant::now();
    let err = cl.get(BlockKey(1)).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, ClientError::Timeout { .. }) && err.is_unavailable(),
        "{err}"
    );
    assert!(took < Duration::from_millis(1500), "blocked for {took:?}");
    let err = Client::connect(cfg)
        .await
        .err()
        .expect("a frozen node cannot answer the handshake");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(
        cl.get(BlockKey(1)).await.unwrap().as_deref(),
        Some(&b"kv"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_loses_its_leases_and_allocation_after_the_request_timeout() {
    let server = ServerProcess::start(&["--memory", "64MiB", "--request-timeout", "1"]);
    let cl = client(&server).await;
    let keys: Vec<BlockKey> = (0..32).map(|i| BlockKey(7000 + i)).collect();
    for &k in &keys {
        cl.put(k, &content(k, 1 << 20)).await.unwrap();
    }
    // A reader that asks for 32 MiB and never reads, and a writer that sends half a block;
    // both keep their sockets open.
    let mut reader = TcpStream::connect(&server.data).unwrap();
    let req = GetRequest {
        keys: wire::encode_keys(&keys),
        ..Default::default()
    }
    .encode_to_vec();
    reader
        .write_all(&FrameHeader::request(Op::Get, 1, req.len(), 0).encode())
        .unwrap();
    reader.write_all(&req).unwrap();
    let mut writer = TcpStream::connect(&server.data).unwrap();
    writer
        .write_all(&raw_put_frame(&[BlockKey(1)], &[1 << 20], 1 << 20))
        .unwrap();
    writer.write_all(&[0x22; 1000]).unwrap();
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 32.0),
        32.0
    );
    // Within the timeout (plus slack) both are cut off and everything they held is released.
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 0.0),
        0.0
    );
    assert_eq!(
        server.wait_metric("kvcache_requests_timed_out_total", |v| v == 2.0),
        2.0
    );
    assert_eq!(
        server.metric("kvcache_pool_used_bytes"),
        32.0 * ((1 << 20) + 4096) as f64,
        "no stray allocation"
    );
    assert_eq!(cl.get(BlockKey(1)).await.unwrap(), None);
    assert!(
        cl.exists(&keys).await.unwrap().iter().all(|p| *p),
        "the stored blocks are untouched"
    );
    drop((reader, writer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_the_rest_keep_working() {
    let server = ServerProcess::start(&["--memory", "4MiB", "--max-connections", "2"]);
    let cl = client(&server).await; // one connection
    let _second = TcpStream::connect(&server.data).unwrap();
    server.wait_metric("kvcache_connections_active", |v| v == 2.0);
    let mut third = TcpStream::connect(&server.data).unwrap();
    assert_closed(&mut third);
    assert_eq!(server.metric("kvcache_connections_rejected_total"), 1.0);
    assert!(cl.ping().await.is_ok(), "existing connections keep working");
}

/// A storm of random and half-valid frames on many connections, bounded in count and time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_random_frames_never_takes_the_server_down_or_touches_stored_data() {
    let server = ServerProcess::start(&[
        "--memory",
        "32MiB",
        "--max-frame",
        "1MiB",
        "--request-timeout",
        "2",
    ]);
    let good = client(&server).await;
    let keys: Vec<BlockKey> = (0..16).map(|i| BlockKey(31_000 + i)).collect();
    for &k in &keys {
        good.put(k, &content(k, 50_000)).await.unwrap();
    }
    let addr = server.data.clone();
    let first_key = keys[0];
    let storm = std::thread::spawn(move || {
        let mut rng = Rng(0x5eed);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for _ in 0..300 {
            if std::time::Instant::now() > deadline {
                break;
            }
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut frame = Vec::new();
            match rng.next() % 4 {
                // Pure garbage.
                0 => frame.extend((0..(rng.next() % 200)).map(|_| rng.next() as u8)),
                // A valid header with a random op byte and lengths, then random bytes.
                1 => {
                    let mut h = FrameHeader::request(
                        Op::Ping,
                        1,
                        (rng.next() % 64) as usize,
                        (rng.next() % 64) as usize,
                    )
                    .encode();
                    h[3] = rng.next() as u8;
                    frame.extend_from_slice(&h);
                    frame.extend((0..(rng.next() % 160)).map(|_| rng.next() as u8));
                }
                // A put whose control message is random bytes.
                2 => {
                    let control: Vec<u8> =
                        (0..(rng.next() % 48)).map(|_| rng.next() as u8).collect();
                    let payload = (rng.next() % 256) as usize;
                    frame.extend_from_slice(
                        &FrameHeader::request(Op::Put, 1, control.len(), payload).encode(),
                    );
                    frame.extend_from_slice(&control);
                    frame.extend((0..payload).map(|_| rng.next() as u8));
                }
                // A well-formed put of a stored key with lying lengths.
                _ => {
                    let lens = [(rng.next() % 100_000) as u32];
                    frame.extend_from_slice(&raw_put_frame(
                        &[first_key],
                        &lens,
                        (rng.next() % 300) as usize,
                    ));
                    frame.extend((0..(rng.next() % 300)).map(|_| rng.next() as u8));
                }
            }
            let _ = s.write_all(&frame);
            let mut sink = [0u8; 4096];
            let _ = s.read(&mut sink);
        }
    });
    storm.join().unwrap();
    // The server is up, every stored block is intact, and clean clients are served.
    let got = good.get_many(&keys).await.unwrap();
    for (k, v) in keys.iter().zip(got) {
        assert_eq!(
            v.as_deref(),
            Some(&content(*k, 50_000)[..]),
            "block {k} after the storm"
        );
    }
    let fresh = client(&server).await;
    assert_eq!(
        fresh.put(BlockKey(1), b"after").await.unwrap(),
        PutStatus::Stored
    );
    assert!(server.metric("kvcache_protocol_errors_total{kind=\"bad_magic\"}") > 0.0);
    assert_eq!(server.http("GET", "/health").0, 200);
}

/// The server once printed its ready line before installing its signal handlers, so a SIGTERM
/// in that window killed it outright. The window is microseconds wide: this test hits it only
/// under load (it did, in the full suite), which is why it tries several times.
#[test]
fn sigterm_right_after_ready_is_still_a_graceful_shutdown() {
    for _ in 0..5 {
        let mut server = ServerProcess::start(&["--memory", "4MiB"]);
        let status = server.terminate();
        assert!(
            status.success(),
            "exit status {status:?}: killed instead of shutting down"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_pages_through_every_key_in_order_and_a_bad_cursor_is_refused() {
    let server = ServerProcess::start(&["--memory", "64MiB"]);
    let c = client(&server).await;
    let mut rng = Rng(5);
    let mut keys: Vec<BlockKey> = (0..300).map(|_| rng.key()).collect();
    let values: Vec<Vec<u8>> = keys.iter().map(|k| content(*k, 100)).collect();
    let batch: Vec<(BlockKey, &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (*k, &v[..]))
        .collect();
    c.put_many(&batch).await.unwrap();
    keys.sort();
    let (mut listed, mut after) = (Vec::new(), None);
    loop {
        let (page, more) = c.list_keys(after, 128).await.unwrap();
        listed.extend_from_slice(&page);
        after = page.last().copied();
        if !more {
            break;
        }
    }
    assert_eq!(listed, keys, "every key once, ascending, over three pages");

    // A cursor that is not one key: an error reply; the connection and the node serve on.
    let mut s = TcpStream::connect(&server.data).unwrap();
    let req = wire::ListKeysRequest {
        after: vec![1; 5],
        limit: 10,
    }
    .encode_to_vec();
    s.write_all(&FrameHeader::request(Op::ListKeys, 1, req.len(), 0).encode())
        .unwrap();
    s.write_all(&req).unwrap();
    let (h, control) = read_frame(&mut s).expect("an error reply");
    assert_eq!(
        (h.op, error_code(&control)),
        (Op::Error, ErrorCode::Malformed)
    );
    assert_eq!(c.list_keys(None, 10).await.unwrap().0, keys[..10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_holding_every_slot_are_closed_after_the_idle_timeout() {
    let server = ServerProcess::start(&[
        "--memory",
        "4MiB",
        "--max-connections",
        "8",
        "--idle-timeout",
        "0.5",
    ]);
    // Eight sockets that never send a byte (one sends half a header) take every slot.
    let mut idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(&server.data).unwrap())
        .collect();
    idle[0].write_all(b"KV\x01").unwrap();
    server.wait_metric("kvcache_connections_active", |v| v == 8.0);
    let mut refused = TcpStream::connect(&server.data).unwrap();
    assert_closed(&mut refused);
    // Past the idle timeout they are closed, and a fresh client is served.
    for s in &mut idle {
        assert_closed(s);
    }
    assert_eq!(
        server.wait_metric("kvcache_connections_idle_closed_total", |v| v >= 8.0),
        8.0
    );
    let c = client(&server).await;
    c.put(BlockKey(1), b"served").await.unwrap();
    assert_eq!(
        c.get(BlockKey(1)).await.unwrap().as_deref(),
        Some(&b"served"[..])
    );
    // A pooled client whose connection idled out reconnects on its next call.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        c.get(BlockKey(1)).await.unwrap().as_deref(),
        Some(&b"served"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_more_keys_than_the_cap_is_refused_before_any_lookup() {
    let server = ServerProcess::start(&["--memory", "4MiB", "--max-keys-per-request", "1000"]);
    let c = client(&server).await;
    c.put(BlockKey(3), b"three").await.unwrap();
    let requested = server.metric("kvcache_requested_blocks_total{op=\"get\"}");
    let mut s = TcpStream::connect(&server.data).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // 200,000 keys: near the 4 MiB control limit, so the most a single frame can ask for.
    for n in [1001usize, 200_000] {
        let req = GetRequest {
            keys: wire::encode_keys(&vec![BlockKey(3); n]),
            ..Default::default()
        };
        send_request(&mut s, Op::Get, 1, &req);
        let (h, control) = read_frame(&mut s).expect("an error reply");
        assert_eq!(h.op, Op::Error);
        let (code, message) = error_reply(&control);
        assert_eq!(code, ErrorCode::LimitExceeded);
        assert!(message.contains("--max-keys-per-request"), "{message}");
    }
    assert_eq!(
        server.metric("kvcache_requested_blocks_total{op=\"get\"}"),
        requested,
        "no key was looked up"
    );
    // The connection and the node go on.
    let ok = GetRequest {
        keys: wire::encode_keys(&vec![BlockKey(3); 1000]),
        ..Default::default()
    };
    send_request(&mut s, Op::Get, 2, &ok);
    let (h, _) = read_frame(&mut s).expect("a get reply");
    assert_eq!(h.op, Op::Get);
    assert_eq!(h.payload_len, 5 * 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_metrics_connections_leaves_the_data_plane_serving() {
    // This process holds 10,000 sockets: raise its own descriptor limit first.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    if lim.rlim_cur < 12_000 {
        eprintln!(
            "skipping: this process may hold only {} descriptors",
            lim.rlim_cur
        );
        return;
    }
    let server = ServerProcess::start(&["--memory", "8MiB"]);
    let c = client(&server).await;
    let mut flood = Vec::with_capacity(10_000);
    let started = std::time::Instant::now();
    while flood.len() < 10_000 && started.elapsed() < Duration::from_secs(60) {
        match TcpStream::connect(&server.metrics) {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect {} failed: {e}", flood.len()),
        }
    }
    assert_eq!(flood.len(), 10_000);
    // While every one of them is still open: puts and gets work, new connections too.
    for i in 0..20u128 {
        let v = content(BlockKey(i), 100_000);
        c.put(BlockKey(i), &v).await.unwrap();
        assert_eq!(c.get(BlockKey(i)).await.unwrap().as_deref(), Some(&v[..]));
    }
    let fresh = client(&server).await;
    assert!(fresh.ping().await.is_ok());
    drop(flood);
    assert!(server.metric("kvcache_http_connections_rejected_total") >= 9_000.0);
}

/// A loopback proxy to `upstream` that holds the first bytes of the node's answer to each
/// request for `delay` before passing them on: a node that answers each request slowly, but
/// within a timeout.
async fn slow_proxy(upstream: String, delay: Duration) -> String {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(node) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut nr, mut nw) = node.into_split();
                // Requests passed to the node; each answer's first bytes wait once.
                let asked = Arc::new(AtomicU64::new(0));
                let counted = Arc::clone(&asked);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        counted.fetch_add(1, SeqCst);
                        if nw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut delayed = 0;
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n @ 1..) = nr.read(&mut buf).await {
                    let now = asked.load(SeqCst);
                    if now > delayed {
                        delayed = now;
                        tokio::time::sleep(delay).await;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// M6: the timeout bounds a whole call, not each 64-key chunk. With a node whose every reply
/// takes 0.7 of the timeout, a 256-key get (four chunks, 2.8 timeouts if each had its own)
/// ends within about one timeout, and so does a cluster read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_bounds_a_whole_call_not_each_chunk() {
    let server = ServerProcess::start(&["--memory", "64MiB"]);
    let keys: Vec<BlockKey> = (1..=256u128).map(|i| BlockKey((i << 64) | i)).collect();
    let fast = client(&server).await;
    common::put_blocks(&fast, &keys, 1024).await;
    let timeout = Duration::from_millis(1000);
    let proxy = slow_proxy(server.data.clone(), timeout * 7 / 10).await;
    let mut cfg = ClientConfig::new(proxy.clone());
    cfg.transport = TransportChoice::Tcp;
    cfg.timeout = timeout;
    let slow = Client::connect(cfg.clone())
        .await
        .expect("the handshake fits one timeout");

    // One chunk fits: the call succeeds, slowly.
    let got = slow.get_many(&keys[..64]).await.unwrap();
    assert!(got.iter().all(Option::is_some));

    let started = std::time::Instant::now();
    let err = slow.get_many(&keys).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(took < timeout * 13 / 10, "a 4-chunk get took {took:?}");

    let mut into = vec![vec![0u8; 1024]; keys.len()];
    let mut dst: Vec<Vec<&mut [u8]>> = into.iter_mut().map(|b| vec![&mut b[..]]).collect();
    let started = std::time::Instant::now();
    assert!(slow.get_many_into(&keys, &mut dst).await.is_err());
    assert!(
        started.elapsed() < timeout * 13 / 10,
        "get_many_into took {:?}",
        started.elapsed()
    );

    // A cluster whose only member is slow: misses (its node is marked down) within one timeout.
    let mut ccfg = kvcache_client::ClusterConfig::new([proxy]);
    ccfg.node = cfg;
    let cluster = kvcache_client::Cluster::new(ccfg).unwrap();
    let started = std::time::Instant::now();
    let got = cluster.get_many(&keys).await.unwrap();
    let took = started.elapsed();
    assert!(
        took < timeout * 13 / 10,
        "a cluster get, connect included, took {took:?}"
    );
    assert!(
        got.iter().any(Option::is_none),
        "the slow node could not answer every chunk"
    );
    // The fast path still answers every key.
    assert_eq!(common::read_blocks(&fast, &keys, 1024).await, keys.len());
}
