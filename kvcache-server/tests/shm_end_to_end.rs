//! The shared-memory transport against the real `kvcache-server` binary: a client on the same
//! host maps the pool through the node's Unix socket.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Rng, ServerProcess, batch, content, contents, error_code, read_frame, send_request};
use kvcache_client::{
    Client, ClientConfig, ClientError, GetOutcome, PathKind, PutBlocks, TransportChoice,
};
use kvcache_core::BlockKey;
use kvcache_core::wire::{
    self, ErrorCode, ErrorReply, FrameHeader, LeaseGetReply, LeaseGetRequest, Op, PutStatus,
    ReleaseRequest, ShmAttachReply, ShmAttachRequest, StagedPutRequest,
};
use kvcache_transport::shm::recv_with_fds;
use prost::Message;

async fn client_with(
    server: &ServerProcess,
    transport: TransportChoice,
) -> Result<Client, ClientError> {
    let mut cfg = ClientConfig::new(server.data.clone());
    cfg.transport = transport;
    Client::connect(cfg).await
}

/// A raw shared-memory connection, for what the client library never does.
struct RawShm {
    s: UnixStream,
    next_id: u32,
    fds: Vec<OwnedFd>,
    attach: ShmAttachReply,
}

impl RawShm {
    fn attach(server: &ServerProcess, staging_bytes: u64) -> Self {
        let mut s = UnixStream::connect(&server.shm).expect("connect to the shm socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send_request(
            &mut s,
            Op::ShmAttach,
            1,
            &ShmAttachRequest { staging_bytes },
        );
        let mut fds = Vec::new();
        let mut head = [0u8; wire::HEADER_LEN];
        let mut got = 0;
        while got < head.len() {
            got += recv_with_fds(s.as_fd(), &mut head[got..], &mut fds).unwrap();
        }
        let h = FrameHeader::decode(&head, &Default::default()).unwrap();
        let mut control = vec![0u8; h.control_len as usize];
        s.read_exact(&mut control).unwrap();
        assert_eq!(h.op, Op::ShmAttach);
        assert_eq!(fds.len(), 2, "pool and staging descriptors");
        let attach = ShmAttachReply::decode(control.as_slice()).unwrap();
        Self {
            s,
            next_id: 1,
            fds,
            attach,
        }
    }

    fn request(&mut self, op: Op, msg: &impl Message) -> Option<(FrameHeader, Vec<u8>)> {
        self.next_id += 1;
        send_request(&mut self.s, op, self.next_id, msg);
        if op == Op::Release {
            return None;
        }
        read_frame(&mut self.s)
    }

    fn lease(&mut self, keys: &[BlockKey]) -> LeaseGetReply {
        self.lease_checked(keys, false)
    }

    /// `LeaseGet`, with the node checking every block first when `verify` is set.
    fn lease_checked(&mut self, keys: &[BlockKey], verify: bool) -> LeaseGetReply {
        let req = LeaseGetRequest {
            keys: wire::encode_keys(keys),
            verify,
        };
        let (h, control) = self.request(Op::LeaseGet, &req).expect("shm_get reply");
        assert_eq!(
            h.op,
            Op::LeaseGet,
            "{:?}",
            ErrorReply::decode(control.as_slice())
        );
        LeaseGetReply::decode(control.as_slice()).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_clients_pick_shared_memory_and_round_trip_every_byte() {
    let server = ServerProcess::start(&["--memory", "256MiB"]);
    assert_ne!(server.shm, "off");
    let mut rng = Rng(7);
    // Sizes across the chunk boundary (128 KiB) and tiny ones.
    let blocks: Vec<(BlockKey, usize)> = (0..120u128)
        .map(|i| {
            let len = match i % 4 {
                0 => 1 + (rng.next() % 100) as usize,
                1 => 128 * 1024,
                2 => 128 * 1024 + 1 + (rng.next() % 300_000) as usize,
                _ => 4096 + (rng.next() % 9000) as usize,
            };
            (BlockKey(i << 70 | 5), len)
        })
        .collect();
    let values = contents(&blocks);
    let mut tasks = Vec::new();
    for part in 0..3 {
        let mine: Vec<_> = blocks.iter().copied().skip(part).step_by(3).collect();
        let c = client_with(&server, TransportChoice::Auto).await.unwrap();
        assert_eq!(c.path(), PathKind::Shm);
        tasks.push(tokio::spawn(async move {
            let values = contents(&mine);
            let statuses = c.put_many(&batch(&mine, &values)).await.unwrap();
            assert!(
                statuses.iter().all(|s| *s == PutStatus::Stored),
                "{statuses:?}"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = client_with(&server, TransportChoice::Shm).await.unwrap();
    // Scatter every block into three ragged segments of one buffer.
    let total: usize = blocks.iter().map(|b| b.1).sum();
    let mut buf = vec![0u8; total];
    let keys: Vec<BlockKey> = blocks.iter().map(|b| b.0).collect();
    let mut dst: Vec<Vec<&mut [u8]>> = Vec::new();
    let mut rest = &mut buf[..];
    for &(_, len) in &blocks {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len);
        rest = tail;
        let (a, bc) = mine.split_at_mut(len / 3);
        let (b, cc) = bc.split_at_mut(len / 3);
        dst.push(vec![a, b, cc]);
    }
    let outcomes = c.get_many_into(&keys, &mut dst).await.unwrap();
    assert!(
        outcomes.iter().all(|o| *o == GetOutcome::Hit),
        "{outcomes:?}"
    );
    let mut at = 0;
    for (i, &(_, len)) in blocks.iter().enumerate() {
        assert!(buf[at..at + len] == values[i][..], "block {i} differs");
        at += len;
    }
    let got = c.get_many(&keys[..10]).await.unwrap();
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v.as_deref(), Some(&values[i][..]));
    }
    assert_eq!(c.get(BlockKey(999)).await.unwrap(), None);
    assert!(server.metric("kvcache_bytes_sent_total{transport=\"shm\"}") >= total as f64);
    assert_eq!(
        server.metric("kvcache_bytes_sent_total{transport=\"tcp\"}"),
        0.0
    );
    assert_eq!(
        server.metric("kvcache_bytes_received_total{transport=\"tcp\"}"),
        0.0
    );
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 0.0),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_shared_memory_clients_see_the_same_blocks() {
    let server = ServerProcess::start(&["--memory", "64MiB"]);
    let shm = client_with(&server, TransportChoice::Shm).await.unwrap();
    let tcp = client_with(&server, TransportChoice::Tcp).await.unwrap();
    assert_eq!((shm.path(), tcp.path()), (PathKind::Shm, PathKind::Tcp));
    let (a, b) = (content(BlockKey(1), 300_000), content(BlockKey(2), 77));
    shm.put(BlockKey(1), &a).await.unwrap();
    tcp.put(BlockKey(2), &b).await.unwrap();
    assert_eq!(tcp.get(BlockKey(1)).await.unwrap().as_deref(), Some(&a[..]));
    assert_eq!(shm.get(BlockKey(2)).await.unwrap().as_deref(), Some(&b[..]));
    assert_eq!(
        shm.exists(&[BlockKey(1), BlockKey(3)]).await.unwrap(),
        [true, false]
    );
    assert_eq!(
        shm.prefix_match(&[BlockKey(1), BlockKey(2), BlockKey(3)])
            .await
            .unwrap(),
        2
    );
    // A put of an existing key is a no-op; a wrong-size destination is reported untouched.
    assert_eq!(
        shm.put(BlockKey(1), b"other").await.unwrap(),
        PutStatus::AlreadyPresent
    );
    let mut small = vec![7u8; 10];
    let out = shm
        .get_many_into(&[BlockKey(1)], &mut [vec![&mut small[..]]])
        .await
        .unwrap();
    assert_eq!(
        out[0],
        GetOutcome::WrongSize {
            stored: 300_000,
            expected: 10
        }
    );
    assert_eq!(small, vec![7u8; 10]);
}

/// A reader that cannot check bytes where they land (RDMA READs into GPU memory) asks the
/// node to check them before it leases them: a corrupt block is a miss from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_lease_answers_a_corrupt_block_as_a_miss() {
    let server = ServerProcess::start(&["--memory", "64MiB", "--enable-test-hooks"]);
    let c = client_with(&server, TransportChoice::Tcp).await.unwrap();
    let good = content(BlockKey(20), 300_000);
    for k in [20, 21] {
        c.put(BlockKey(k), &good).await.unwrap();
    }
    let (status, _) = server.http("POST", &format!("/debug/corrupt/{}", BlockKey(20)));
    assert_eq!(status, 200);
    let mut raw = RawShm::attach(&server, 1 << 20);
    // A plain lease hands out the corrupt block: its trailer is intact, the reader checks.
    let plain = raw.lease(&[BlockKey(20)]);
    assert_eq!(plain.lens, [300_000]);
    let checked = raw.lease_checked(&[BlockKey(20), BlockKey(21)], true);
    assert_eq!(checked.lens, [0, 300_000], "the corrupt block is a miss");
    assert_eq!(server.metric("kvcache_checksum_failures_total"), 1.0);
    assert_eq!(
        c.exists(&[BlockKey(20), BlockKey(21)]).await.unwrap(),
        [false, true]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dies_holding_leases_frees_them_and_the_blocks_can_be_evicted() {
    let server = ServerProcess::start(&["--memory", "8MiB"]);
    let c = client_with(&server, TransportChoice::Shm).await.unwrap();
    let keys: Vec<BlockKey> = (0..4u128).map(BlockKey).collect();
    for &k in &keys {
        c.put(k, &content(k, 1 << 20)).await.unwrap();
    }
    let mut raw = RawShm::attach(&server, 1 << 20);
    let lease = raw.lease(&keys);
    assert!(lease.lease_id != 0 && lease.lens.iter().all(|&l| l == 1 << 20));
    assert_eq!(server.metric("kvcache_active_leases"), 4.0);
    drop(raw); // The client dies without releasing.
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 0.0),
        0.0
    );
    // The pool can be refilled past those blocks: nothing stayed pinned.
    for i in 10..20u128 {
        let st = c
            .put(BlockKey(i), &content(BlockKey(i), 1 << 20))
            .await
            .unwrap();
        assert_eq!(st, PutStatus::Stored);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_held_past_the_timeout_are_revoked_and_the_connection_goes_on() {
    let server = ServerProcess::start(&["--memory", "16MiB", "--shm-lease-timeout", "0.2"]);
    let c = client_with(&server, TransportChoice::Shm).await.unwrap();
    c.put(BlockKey(5), &content(BlockKey(5), 10_000))
        .await
        .unwrap();
    let mut raw = RawShm::attach(&server, 4096);
    assert_eq!(raw.attach.lease_timeout_ms, 200);
    let first = raw.lease(&[BlockKey(5)]);
    assert_eq!(server.metric("kvcache_active_leases"), 1.0);
    let revoked = server.wait_metric("kvcache_shm_leases_revoked_total", |v| v >= 1.0);
    assert_eq!(revoked, 1.0);
    assert_eq!(server.metric("kvcache_active_leases"), 0.0);
    // Releasing a revoked lease is harmless; the connection still serves.
    raw.request(
        Op::Release,
        &ReleaseRequest {
            lease_id: first.lease_id,
            suspect: vec![],
        },
    );
    let again = raw.lease(&[BlockKey(5), BlockKey(6)]);
    assert_eq!(again.lens, [10_000, 0]);
    assert_ne!(again.lease_id, first.lease_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shared_memory_requests_are_refused_and_the_node_keeps_serving() {
    let server = ServerProcess::start(&["--memory", "16MiB"]);
    let c = client_with(&server, TransportChoice::Shm).await.unwrap();
    let value = content(BlockKey(1), 9000);
    c.put(BlockKey(1), &value).await.unwrap();

    // Anything but shm_attach first: an error, then the socket closes.
    let mut s = UnixStream::connect(&server.shm).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send_request(&mut s, Op::Ping, 1, &wire::PingRequest {});
    let (h, control) = read_frame(&mut s).expect("an error reply");
    assert_eq!(
        (h.op, error_code(&control)),
        (Op::Error, ErrorCode::Malformed)
    );
    assert!(read_frame(&mut s).is_none(), "closed");

    // A put that overruns the staging window is refused; the connection goes on.
    let mut raw = RawShm::attach(&server, 4096);
    assert_eq!(raw.attach.staging_bytes, 4096);
    let bad = StagedPutRequest {
        keys: wire::encode_keys(&[BlockKey(2)]),
        lens: vec![100],
        offsets: vec![4000],
    };
    let (h, control) = raw.request(Op::StagedPut, &bad).unwrap();
    assert_eq!(
        (h.op, error_code(&control)),
        (Op::Error, ErrorCode::Malformed)
    );
    let ragged = StagedPutRequest {
        keys: wire::encode_keys(&[BlockKey(2)]),
        lens: vec![1, 2],
        offsets: vec![0],
    };
    let (h, _) = raw.request(Op::StagedPut, &ragged).unwrap();
    assert_eq!(h.op, Op::Error);
    assert_eq!(raw.lease(&[BlockKey(1)]).lens, [9000]);

    // A well-formed put through the raw staging window lands intact.
    let staging = kvcache_transport::ShmView::map(raw.fds[1].as_fd(), 4096, true).unwrap();
    let three = content(BlockKey(3), 4000);
    // SAFETY: in bounds of our read-write mapping of the staging window.
    unsafe { std::ptr::copy_nonoverlapping(three.as_ptr(), staging.base().add(50), three.len()) };
    let good = StagedPutRequest {
        keys: wire::encode_keys(&[BlockKey(3)]),
        lens: vec![4000],
        offsets: vec![50],
    };
    let (h, control) = raw.request(Op::StagedPut, &good).unwrap();
    assert_eq!(h.op, Op::StagedPut);
    assert_eq!(
        wire::PutReply::decode(control.as_slice()).unwrap().statuses,
        [0]
    );
    assert_eq!(
        c.get(BlockKey(3)).await.unwrap().as_deref(),
        Some(&three[..])
    );
    // The pool descriptor is read-only: it cannot be mapped for writing.
    assert!(
        kvcache_transport::ShmView::map(raw.fds[0].as_fd(), raw.attach.pool_bytes as usize, true)
            .is_err()
    );

    // An undecodable one-way release has no reply to carry an error: the node closes.
    raw.next_id += 1;
    let id = raw.next_id;
    let mut frame = FrameHeader::request(Op::Release, id, 3, 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&[0xff, 0xff, 0xff]);
    raw.s.write_all(&frame).unwrap();
    assert!(
        read_frame(&mut raw.s).is_none(),
        "closed after a garbage release"
    );

    // Shared-memory ops over TCP are refused.
    let mut t = std::net::TcpStream::connect(&server.data).unwrap();
    let req = LeaseGetRequest {
        keys: wire::encode_keys(&[BlockKey(1)]),
        verify: false,
    }
    .encode_to_vec();
    let mut frame = FrameHeader::request(Op::LeaseGet, 1, req.len(), 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&req);
    t.write_all(&frame).unwrap();
    let mut head = [0u8; wire::HEADER_LEN];
    t.read_exact(&mut head).unwrap();
    assert_eq!(
        FrameHeader::decode(&head, &Default::default()).unwrap().op,
        Op::Error
    );

    // Nothing was lost and every lease is back.
    assert_eq!(
        c.get(BlockKey(1)).await.unwrap().as_deref(),
        Some(&value[..])
    );
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 0.0),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_shared_memory_auto_falls_back_to_tcp_and_shm_is_a_clear_error() {
    let server = ServerProcess::start(&["--memory", "16MiB", "--shm-socket", "off"]);
    assert_eq!(server.shm, "off");
    let auto = client_with(&server, TransportChoice::Auto).await.unwrap();
    assert_eq!(auto.path(), PathKind::Tcp);
    auto.put(BlockKey(1), b"kv").await.unwrap();
    assert_eq!(
        auto.get(BlockKey(1)).await.unwrap().as_deref(),
        Some(&b"kv"[..])
    );
    let err = client_with(&server, TransportChoice::Shm)
        .await
        .err()
        .expect("shm refused");
    assert!(matches!(err, ClientError::ShmUnavailable(_)), "{err}");
    assert!(err.to_string().contains("shared memory off"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_socket_owner_may_map_the_pool_by_default() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let server = ServerProcess::start(&["--memory", "16MiB"]);
    let meta = std::fs::metadata(&server.shm).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping the other-user half: it needs root to run a probe as another uid");
        return;
    }
    // Another user cannot connect, so cannot map the pool.
    let probe = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('connected')\nexcept PermissionError: print('denied')",
            &server.shm,
        ])
        .uid(65534)
        .gid(65534)
        .output();
    let out = probe.expect("run python3 as nobody");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "denied");
}

/// Runs tests/hostile_shm.py against `server` as `uid` (None: this process's) and returns its
/// report.
fn hostile_report(server: &ServerProcess, uid: Option<u32>) -> serde_json::Value {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", include_str!("hostile_shm.py"), &server.shm]);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "hostile client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// Every write attempt on the pool, through the descriptor received and through a `/proc`
/// reopen with O_RDWR, must be refused; the stored blocks must read back unchanged.
async fn pool_survives_a_hostile_client(uid: Option<u32>) {
    let mut args = vec!["--memory", "16MiB"];
    if uid.is_some() {
        args.extend(["--shm-mode", "666"]);
    }
    let server = ServerProcess::start(&args);
    let c = client_with(&server, TransportChoice::Tcp).await.unwrap();
    let keys: Vec<BlockKey> = (1..=8).map(BlockKey).collect();
    let values: Vec<Vec<u8>> = keys.iter().map(|&k| content(k, 300_000)).collect();
    for (k, v) in keys.iter().zip(&values) {
        c.put(*k, v).await.unwrap();
    }
    let report = hostile_report(&server, uid);
    if let Some(uid) = uid {
        assert_eq!(report["uid"], uid, "{report}");
    }
    for fd in ["pool", "pool_reopened"] {
        let attempts = report[fd].as_object().expect("attempts");
        for (attack, outcome) in attempts {
            if attack == "open" {
                continue; // Reopening is allowed; every write through it must not be.
            }
            assert_ne!(outcome, "allowed", "{fd}: {attack} succeeded: {report}");
        }
        assert!(attempts.len() >= 5, "{report}");
    }
    // The staging window is the client's own to write; that changes no stored block.
    assert_eq!(report["staging"]["write"], "allowed", "{report}");
    let shm = client_with(&server, TransportChoice::Shm).await.unwrap();
    for (k, v) in keys.iter().zip(&values) {
        assert_eq!(c.get(*k).await.unwrap().as_deref(), Some(&v[..]), "tcp {k}");
        assert_eq!(
            shm.get(*k).await.unwrap().as_deref(),
            Some(&v[..]),
            "shm {k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_change_a_stored_byte_through_any_pool_descriptor() {
    pool_survives_a_hostile_client(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_client_cannot_change_a_stored_byte_through_any_pool_descriptor() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: running the hostile client as uid 65534 needs root");
        return;
    }
    pool_survives_a_hostile_client(Some(65534)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holding_leases_on_a_block_cannot_make_it_a_miss_for_others() {
    let server = ServerProcess::start(&["--memory", "16MiB"]);
    let c = client_with(&server, TransportChoice::Tcp).await.unwrap();
    let value = content(BlockKey(7), 5000);
    c.put(BlockKey(7), &value).await.unwrap();
    // 20 batches of 4096 leases on one key: 81,920, past the 16-bit count of a block.
    let mut hog = RawShm::attach(&server, 4096);
    for _ in 0..20 {
        let reply = hog.lease(&vec![BlockKey(7); 4096]);
        assert!(reply.lens.iter().all(|&l| l == 5000));
    }
    let other = client_with(&server, TransportChoice::Shm).await.unwrap();
    assert_eq!(
        other.get(BlockKey(7)).await.unwrap().as_deref(),
        Some(&value[..])
    );
    assert_eq!(
        c.get(BlockKey(7)).await.unwrap().as_deref(),
        Some(&value[..])
    );
    // The hog holds one lease on the block, however often it asked (the other readers'
    // releases may still be on their way).
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 1.0),
        1.0
    );
    // A release with 100,000 duplicate suspects is handled at once, and verifies the block
    // once: it stays.
    let started = std::time::Instant::now();
    hog.request(
        Op::Release,
        &ReleaseRequest {
            lease_id: 1,
            suspect: wire::encode_keys(&vec![BlockKey(7); 100_000]),
        },
    );
    assert_eq!(
        hog.lease(&[BlockKey(7)]).lens,
        [5000],
        "the connection goes on"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        server.metric("kvcache_suspect_blocks_total{result=\"clean\"}"),
        1.0
    );
    drop(hog);
    assert_eq!(
        server.wait_metric("kvcache_active_leases", |v| v == 0.0),
        0.0
    );
}

/// Sends shm_attach on the socket as `uid` and returns the reply's op byte and its text.
fn attach_as(uid: u32, socket: &str) -> (u8, String) {
    use std::os::unix::process::CommandExt;
    let script = "import socket,struct,sys\n\
        s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
        c=b'\\x08'+bytes([0x80,0x80,0x40])\n\
        s.sendall(b'KV'+bytes([1,6])+struct.pack('<III',1,len(c),0)+c)\n\
        h=b''\n\
        while len(h)<16: h+=s.recv(16-len(h))\n\
        n=struct.unpack('<I',h[8:12])[0]; b=b''\n\
        while len(b)<n: b+=s.recv(n-len(b))\n\
        print(h[3], b.decode('latin1'))";
    let out = std::process::Command::new("python3")
        .args(["-c", script, socket])
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (op, rest) = text.trim().split_once(' ').unwrap_or((text.trim(), ""));
    (op.parse().unwrap(), rest.to_string())
}

/// M8: with --shm-allow-uids, the kernel-reported uid of a peer decides, not only the socket's
/// mode; the node's own uid is always admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_outside_shm_allow_uids_is_refused_after_accept() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: running a peer as uid 65534 needs root");
        return;
    }
    let server = ServerProcess::start(&[
        "--memory",
        "16MiB",
        "--shm-mode",
        "666",
        "--shm-allow-uids",
        "4242",
    ]);
    let (op, text) = attach_as(65534, &server.shm);
    assert_eq!(op, 0xff, "an error reply: {text}");
    assert!(
        text.contains("--shm-allow-uids") && text.contains("uid 65534"),
        "{text}"
    );
    assert_eq!(
        server.metric("kvcache_protocol_errors_total{kind=\"forbidden\"}"),
        1.0
    );
    // The node's own uid attaches and reads.
    let own = client_with(&server, TransportChoice::Shm).await.unwrap();
    own.put(BlockKey(3), b"kv").await.unwrap();
    assert_eq!(
        own.get(BlockKey(3)).await.unwrap().as_deref(),
        Some(&b"kv"[..])
    );

    let listed = ServerProcess::start(&[
        "--memory",
        "16MiB",
        "--shm-mode",
        "666",
        "--shm-allow-uids",
        "4242,65534",
    ]);
    let (op, _) = attach_as(65534, &listed.shm);
    assert_eq!(op, 0x80 | 6, "a listed uid attaches");
}

/// M8: the default socket lives in a directory of the node's uid; one that others may write
/// (where someone could have taken the name first) is refused at start, with the way out.
#[test]
fn a_socket_directory_others_may_write_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("kvcache-xdg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = common::server_command(&["--memory", "16MiB"])
        .env("XDG_RUNTIME_DIR", &dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("another user could take the socket's name") && err.contains("--shm-socket"),
        "{err}"
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A private one is used.
    let mut ok = common::server_command(&["--memory", "16MiB"])
        .env("XDG_RUNTIME_DIR", &dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(ok.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains(&format!("shm={}", dir.display())), "{line}");
    let _ = ok.kill();
    let _ = ok.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
