//! Authentication against the real `kvcache-server` binary started with `--auth FILE`: who is
//! refused and why, tenants that never see each other's blocks, admin-only listing, token
//! rotation by SIGHUP, and a warming node that copies tenants' blocks as an admin.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::{ServerProcess, blocks, content, contents, error_reply, read_frame, send_request};
use kvcache_client::{
    Client, ClientConfig, ClientError, Cluster, ClusterConfig, PathKind, PutBlocks, TransportChoice,
};
use kvcache_core::BlockKey;
use kvcache_core::wire::{ErrorCode, Op, PingRequest, PutStatus};

const TOKEN_A: &str = "team-a-secret-0001";
const TOKEN_B: &str = "team-b-secret-0002";
const TOKEN_OPS: &str = "ops-admin-secret-03";
const TOKEN_REMOTE: &str = "remote-tcp-only-secret-05";

/// An auth file in a fresh directory, removed on drop.
struct AuthFile {
    dir: PathBuf,
    path: PathBuf,
}

impl AuthFile {
    fn new(text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "kvcache-auth-test-{}-{}",
            std::process::id(),
            common::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.toml");
        std::fs::write(&path, text).unwrap();
        Self { dir, path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tenants(a_tokens: &[&str]) -> String {
    let quoted: Vec<String> = a_tokens.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "[[tenant]]\nname = \"team-a\"\ntokens = [{}]\n\n\
         [[tenant]]\nname = \"team-b\"\ntokens = [\"{TOKEN_B}\"]\n\n\
         [[tenant]]\nname = \"ops\"\ntokens = [\"{TOKEN_OPS}\"]\nadmin = true\n\n\
         [[tenant]]\nname = \"remote\"\ntokens = [\"{TOKEN_REMOTE}\"]\nshared_memory = false\n",
        quoted.join(", ")
    )
}

async fn client(
    server: &ServerProcess,
    token: Option<&str>,
    transport: TransportChoice,
) -> Result<Client, ClientError> {
    let mut cfg = ClientConfig::new(server.data.clone());
    cfg.token = token.map(str::to_string);
    cfg.transport = transport;
    cfg.timeout = Duration::from_secs(5);
    Client::connect(cfg).await
}

/// What a client from before authentication sees: it sends `Ping` first.
fn old_client_ping(addr: &str) -> (ErrorCode, String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send_request(&mut s, Op::Ping, 1, &PingRequest {});
    let (h, control) = read_frame(&mut s).expect("a reply");
    assert_eq!(h.op, Op::Error);
    let (code, message) = error_reply(&control);
    let closed = s.read(&mut [0u8; 1]).map(|n| n == 0).unwrap_or(true);
    (code, message, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_a_connection_is_refused_with_the_reason_and_closed() {
    let file = AuthFile::new(&tenants(&[TOKEN_A]));
    let server = ServerProcess::start(&["--memory", "16MiB", "--auth", file.arg()]);

    let err = client(&server, None, TransportChoice::Tcp)
        .await
        .err()
        .expect("no token");
    assert!(err.is_unauthenticated(), "{err}");
    assert!(err.to_string().contains("--auth"), "{err}");
    assert!(err.to_string().contains("token"), "{err}");

    let err = client(&server, Some("not-a-token-of-anyone"), TransportChoice::Tcp)
        .await
        .err()
        .expect("wrong token");
    assert!(err.is_unauthenticated(), "{err}");
    assert!(
        err.to_string().contains("does not know this token"),
        "{err}"
    );

    let (code, message, closed) = old_client_ping(&server.data);
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert!(message.contains("kvcache-server --auth"), "{message}");
    assert!(closed, "the connection is closed after the refusal");

    // Shared memory too: attach without hello is refused.
    let err = client(&server, None, TransportChoice::Shm)
        .await
        .err()
        .expect("no token over shm");
    assert!(err.is_unauthenticated(), "{err}");
    assert!(server.metric("kvcache_protocol_errors_total{kind=\"unauthenticated\"}") >= 4.0);

    // The node goes on serving those who belong.
    let a = client(&server, Some(TOKEN_A), TransportChoice::Auto)
        .await
        .unwrap();
    assert_eq!(a.path(), PathKind::Shm);
    assert_eq!(a.put(BlockKey(1), b"kv").await.unwrap(), PutStatus::Stored);
    assert_eq!(
        a.get(BlockKey(1)).await.unwrap().as_deref(),
        Some(&b"kv"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_read_test_or_overwrite_each_others_blocks() {
    let file = AuthFile::new(&tenants(&[TOKEN_A]));
    let server = ServerProcess::start(&["--memory", "64MiB", "--auth", file.arg()]);
    for transport in [TransportChoice::Tcp, TransportChoice::Shm] {
        let a = client(&server, Some(TOKEN_A), transport).await.unwrap();
        let b = client(&server, Some(TOKEN_B), transport).await.unwrap();
        let base = if transport == TransportChoice::Tcp {
            100
        } else {
            200
        };
        let chain: Vec<BlockKey> = (base..base + 8).map(BlockKey).collect();
        let mine: Vec<Vec<u8>> = chain.iter().map(|&k| content(k, 20_000)).collect();
        let pairs: Vec<(BlockKey, &[u8])> = chain
            .iter()
            .copied()
            .zip(mine.iter().map(|v| &v[..]))
            .collect();
        assert!(
            a.put_many(&pairs)
                .await
                .unwrap()
                .iter()
                .all(|s| *s == PutStatus::Stored)
        );

        // B sends the same key bytes: nothing there, for every kind of lookup.
        assert_eq!(b.get(chain[0]).await.unwrap(), None, "{transport:?}");
        assert!(b.exists(&chain).await.unwrap().iter().all(|p| !p));
        assert_eq!(b.prefix_match(&chain).await.unwrap(), 0);
        // B's put of the same key lands in B's space and changes nothing of A's.
        let poison = vec![0u8; 20_000];
        assert_eq!(b.put(chain[0], &poison).await.unwrap(), PutStatus::Stored);
        assert_eq!(b.get(chain[0]).await.unwrap().as_deref(), Some(&poison[..]));
        for (k, v) in chain.iter().zip(&mine) {
            assert_eq!(
                a.get(*k).await.unwrap().as_deref(),
                Some(&v[..]),
                "{transport:?} {k}"
            );
        }
        assert_eq!(a.prefix_match(&chain).await.unwrap(), chain.len());
    }

    // Listing keys needs an admin; the admin sees the node's raw key space.
    let a = client(&server, Some(TOKEN_A), TransportChoice::Tcp)
        .await
        .unwrap();
    let err = a.list_keys(None, 100).await.expect_err("not an admin");
    assert!(
        matches!(
            &err,
            ClientError::Server {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("admin"), "{err}");
    let ops = client(&server, Some(TOKEN_OPS), TransportChoice::Tcp)
        .await
        .unwrap();
    let (listed, more) = ops.list_keys(None, 100).await.unwrap();
    assert!(!more);
    assert_eq!(listed.len(), 18, "8 + 8 of A's and 2 of B's, all folded");
    assert!(
        !listed.contains(&BlockKey(100)),
        "tenants' keys are stored folded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_reload_rotates_tokens_and_revokes_removed_ones() {
    let file = AuthFile::new(&tenants(&[TOKEN_A]));
    let server = ServerProcess::start(&["--memory", "16MiB", "--auth", file.arg()]);
    let old = client(&server, Some(TOKEN_A), TransportChoice::Tcp)
        .await
        .unwrap();
    assert_eq!(
        old.put(BlockKey(5), b"five").await.unwrap(),
        PutStatus::Stored
    );

    // Rotation step 1: add the new token. Both work.
    let rotated = "team-a-rotated-0004";
    std::fs::write(&file.path, tenants(&[TOKEN_A, rotated])).unwrap();
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let mut new = None;
    for _ in 0..100 {
        if let Ok(c) = client(&server, Some(rotated), TransportChoice::Tcp).await {
            new = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = new.expect("the rotated token is accepted after SIGHUP");
    assert_eq!(
        new.get(BlockKey(5)).await.unwrap().as_deref(),
        Some(&b"five"[..]),
        "same tenant, same space"
    );
    assert_eq!(
        old.get(BlockKey(5)).await.unwrap().as_deref(),
        Some(&b"five"[..])
    );

    // Step 2: remove the old one. New connections with it are refused, and so is the next
    // request on a connection opened with it.
    std::fs::write(&file.path, tenants(&[rotated])).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let mut refused = false;
    for _ in 0..100 {
        if client(&server, Some(TOKEN_A), TransportChoice::Tcp)
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the removed token is refused after SIGHUP");
    let err = old
        .get(BlockKey(5))
        .await
        .expect_err("old connection revoked");
    assert!(err.is_unauthenticated(), "{err}");
    assert_eq!(
        new.get(BlockKey(5)).await.unwrap().as_deref(),
        Some(&b"five"[..])
    );

    // A broken file keeps the tenants in force.
    std::fs::write(&file.path, "[[tenant]]\nname = 1\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        client(&server, Some(rotated), TransportChoice::Tcp)
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_auth_accepts_a_token_and_serves_the_open_space() {
    let server = ServerProcess::start(&["--memory", "16MiB"]);
    let with = client(&server, Some(TOKEN_A), TransportChoice::Tcp)
        .await
        .unwrap();
    let without = client(&server, None, TransportChoice::Tcp).await.unwrap();
    with.put(BlockKey(9), b"open").await.unwrap();
    assert_eq!(
        without.get(BlockKey(9)).await.unwrap().as_deref(),
        Some(&b"open"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_warms_tenants_blocks_as_the_admin_tenant() {
    let file = AuthFile::new(&tenants(&[TOKEN_A]));
    let addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let peers = addrs.join(",");
    let node = |i: usize| {
        ServerProcess::start_at(
            &addrs[i],
            &["--memory", "64MiB", "--peers", &peers, "--auth", file.arg()],
        )
    };
    let first = node(0);
    let mut one = ClusterConfig::new(addrs[..1].to_vec());
    one.node.token = Some(TOKEN_A.into());
    let data = blocks(17, 600);
    let values = contents(&data);
    let writer = Cluster::new(one).unwrap();
    for (chunk, vals) in data.chunks(50).zip(values.chunks(50)) {
        let pairs: Vec<(BlockKey, &[u8])> = chunk
            .iter()
            .map(|b| b.0)
            .zip(vals.iter().map(|v| &v[..]))
            .collect();
        assert!(writer.put_many(&pairs).await.unwrap().iter().all(|s| *s));
    }
    let second = node(1);
    let mut both = ClusterConfig::new(addrs.clone());
    both.node.token = Some(TOKEN_A.into());
    let full = Cluster::new(both).unwrap();
    let owned = data
        .iter()
        .filter(|b| full.owners(b.0)[0] == addrs[1])
        .count();
    assert!(owned > 150, "about half the keys move, got {owned}");
    let warmed = second.wait_metric("kvcache_cluster_warmed_blocks_total", |v| v >= owned as f64);
    assert_eq!(
        warmed, owned as f64,
        "the tenant's blocks it owns, found by the fold-preserving placement"
    );
    // Tenant A reads every block through the full ring, the moved ones from the newcomer.
    let direct = client(&second, Some(TOKEN_A), TransportChoice::Tcp)
        .await
        .unwrap();
    for ((k, _), v) in data.iter().zip(&values) {
        if full.owners(*k)[0] == addrs[1] {
            assert_eq!(
                direct.get(*k).await.unwrap().as_deref(),
                Some(&v[..]),
                "{k}"
            );
        }
    }
    // Tenant B sees none of them on the newcomer.
    let b = client(&second, Some(TOKEN_B), TransportChoice::Tcp)
        .await
        .unwrap();
    let keys: Vec<BlockKey> = data.iter().map(|b| b.0).collect();
    assert!(b.exists(&keys).await.unwrap().iter().all(|p| !p));
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_without_shared_memory_is_refused_the_pool_and_auto_uses_tcp() {
    let file = AuthFile::new(&tenants(&[TOKEN_A]));
    let server = ServerProcess::start(&["--memory", "16MiB", "--auth", file.arg()]);
    let err = client(&server, Some(TOKEN_REMOTE), TransportChoice::Shm)
        .await
        .err()
        .expect("no pool for this tenant");
    assert!(err.to_string().contains("shared_memory = false"), "{err}");
    let auto = client(&server, Some(TOKEN_REMOTE), TransportChoice::Auto)
        .await
        .unwrap();
    assert_eq!(auto.path(), PathKind::Tcp);
    assert!(
        auto.shm_fallback_reason()
            .unwrap()
            .contains("shared_memory = false")
    );
    auto.put(BlockKey(4), b"over tcp").await.unwrap();
    assert_eq!(
        auto.get(BlockKey(4)).await.unwrap().as_deref(),
        Some(&b"over tcp"[..])
    );
    // Tenants that may still map it.
    let a = client(&server, Some(TOKEN_A), TransportChoice::Auto)
        .await
        .unwrap();
    assert_eq!(a.path(), PathKind::Shm);
}
