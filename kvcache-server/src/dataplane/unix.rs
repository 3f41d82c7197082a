//! The shared-memory socket, for clients on the node's host.
//!
//! A Unix socket sits next to the TCP listener and speaks the same frames. Its first request
//! must be `ShmAttach` (after `Hello` under `--auth`); the reply carries two file descriptors:
//! the pool, read-only and sealed against writes, and a staging window for this connection
//! alone, read-write. Then the connection runs the request loop with a [`Session`], whose
//! lease-get, staged put and release move the bytes through those mappings.
//!
//! Whoever can connect to the socket can read the whole pool: the socket's file mode
//! (`--shm-mode`, 600 by default) and `--shm-allow-uids` decide who that is.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kvcache_core::wire::{ErrorCode, FrameHeader, Op, ShmAttachReply, ShmAttachRequest};
use kvcache_transport::MemoryRegion;
use kvcache_transport::frame_io;
use kvcache_transport::shm::send_with_fds;
use prost::Message;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::auth::Access;
use crate::dataplane::connection::{DataPlane, serve_stream};
use crate::dataplane::hello::{NEEDS_TOKEN, hello, refuse_unauthenticated};
use crate::dataplane::request::{Flow, ServiceContext, send_error};
use crate::dataplane::session::{Session, spawn_reaper, staging_window};
use crate::metrics::{ProtocolError, Via};

/// What every shared-memory connection needs beyond the service context.
pub struct ShmServe {
    pub lease_timeout: Duration,
    pub max_staging: u64,
    /// A read-only file description of the pool, opened once and handed to every client.
    pub pool_ro: OwnedFd,
    pub pool_bytes: u64,
    /// Distinguishes this pool from any other (a restarted node has a new one).
    pub pool_id: String,
    /// Uids admitted besides the node's own (`--shm-allow-uids`); `None` admits every peer
    /// the socket's mode lets connect.
    pub allow_uids: Option<Vec<u32>>,
}

impl ShmServe {
    /// Whether a peer of `uid` may attach.
    fn admits(&self, uid: Option<u32>) -> bool {
        // SAFETY: geteuid has no preconditions.
        let own = unsafe { libc::geteuid() };
        match (&self.allow_uids, uid) {
            (None, _) => true,
            (Some(list), Some(uid)) => uid == own || list.contains(&uid),
            (Some(_), None) => false,
        }
    }
}

/// Makes the directory of the default socket path (`/tmp/kvcache-UID`, or
/// `$XDG_RUNTIME_DIR`) if it is missing, mode 0711 (others may reach a socket in it but not
/// create names), and refuses a directory that another uid owns or that others may write:
/// someone could have put a socket there first and so stand in for the node (audit M8).
pub fn prepare_socket_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(dir)
            .with_context(|| format!("cannot create the socket directory {}", dir.display()))?;
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect the socket directory {}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != own || meta.mode() & 0o022 != 0 {
        bail!(
            "the shared-memory socket directory {} is {} (mode {:o}, uid {}): another user could \
             take the socket's name; remove it, or give --shm-socket a path in a directory only \
             uid {own} may write",
            dir.display(),
            if meta.is_dir() {
                "not private"
            } else {
                "not a directory"
            },
            meta.mode() & 0o7777,
            meta.uid(),
        );
    }
    Ok(())
}

/// Binds the socket at `path` with permission bits `mode`. The socket is bound under a
/// temporary name, given its mode, then renamed into place, so no client can ever connect
/// through looser permissions. A stale socket file (nothing listening) is replaced; a live one
/// is an error.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<(UnixListener, SocketFile)> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another kvcache-server already serves shared memory at {}; pick another --shm-socket or stop it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .with_context(|| format!("cannot bind the shared-memory socket {}", tmp.display()))?;
    let placed = (|| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot place the socket at {}", path.display()));
    }
    Ok((listener, SocketFile(path.to_path_buf())))
}

/// Says once, at start, when the kernel will not back the shared pool with huge pages: every
/// copy into or out of the pool, over any transport, then takes a TLB miss per 4 KiB. TCP puts
/// of 1 MiB x4 cost the node 0.176 CPU-s per GB against 0.142 with huge pages
/// (benches/results/README.md, "Landing buffers").
pub fn hint_huge_pages() {
    const KNOB: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    if let Ok(mode) = std::fs::read_to_string(KNOB)
        && (mode.contains("[never]") || mode.contains("[deny]"))
    {
        tracing::warn!(
            "the shared pool uses 4 KiB pages ({KNOB} is {}), so copies into and out of it cost more (TCP puts about 20 % more CPU per byte); `echo advise > {KNOB}` lets it use huge pages",
            mode.trim()
        );
    }
}

/// The socket's file, removed when the listener stops.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves one Unix-socket connection: attach, then the request loop with shared memory on.
pub async fn serve_unix(
    plane: Arc<DataPlane>,
    serve: Arc<ShmServe>,
    mut stream: UnixStream,
    shutdown: watch::Receiver<bool>,
) {
    let ctx = &plane.ctx;
    let cred = stream.peer_cred().ok();
    let peer = match &cred {
        Some(c) => format!("pid {} uid {}", c.pid().unwrap_or(-1), c.uid()),
        None => "unknown local peer".to_string(),
    };
    if !serve.admits(cred.as_ref().map(|c| c.uid())) {
        let _ =
            tokio::time::timeout(ctx.request_timeout, refuse_uid(ctx, &mut stream, &peer)).await;
        return;
    }
    let attached = tokio::time::timeout(ctx.request_timeout, attach(ctx, &serve, &mut stream));
    let (session, access) = match attached.await {
        Ok(Ok((session, access))) => (Arc::new(session), access),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "shared-memory attach failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "shared-memory client sent no attach in time");
            return;
        }
    };
    tracing::debug!(%peer, staging = session.staging_len(), tenant = access.tenant().unwrap_or("-"), "shared-memory client attached");
    let reaper = spawn_reaper(&session, ctx);
    let (rd, wr) = stream.split();
    serve_stream(&plane, rd, wr, &peer, shutdown, Some(session), access).await;
    reaper.abort();
    // Dropping the session releases every lease the client still held.
}

/// Answers the first request of a peer whose uid `--shm-allow-uids` does not list with
/// `Forbidden`, saying why, so its client falls back to TCP knowing the reason.
async fn refuse_uid(ctx: &ServiceContext, stream: &mut UnixStream, peer: &str) {
    let msg = format!(
        "this node's shared memory admits only the uids of --shm-allow-uids ({peer} is not one); use TCP"
    );
    ctx.metrics.protocol_error(ProtocolError::Forbidden);
    tracing::warn!(%peer, "refused a shared-memory peer whose uid --shm-allow-uids does not list");
    if let Ok(h) = frame_io::read_header(stream, &ctx.limits).await
        && frame_io::read_control(stream, h.control_len).await.is_ok()
    {
        let _ = send_error(stream, h.request_id, ErrorCode::Forbidden, &msg).await;
    }
}

/// The connection's first requests: `Hello` (required with `--auth`), then `ShmAttach`.
async fn attach(
    ctx: &ServiceContext,
    serve: &ShmServe,
    stream: &mut UnixStream,
) -> anyhow::Result<(Session, Access)> {
    let mut access = ctx.auth.initial();
    let mut h = frame_io::read_header(stream, &ctx.limits).await?;
    while h.op == Op::Hello && !h.reply {
        let control = frame_io::read_control(stream, h.control_len).await?;
        if let Flow::Close = hello(ctx, &h, &control, stream, &mut access).await? {
            bail!("hello refused");
        }
        h = frame_io::read_header(stream, &ctx.limits).await?;
    }
    if !access.authenticated() {
        refuse_unauthenticated(ctx, stream, h.request_id, NEEDS_TOKEN).await;
        bail!("no hello before {}", h.op.name());
    }
    if !access.shared_memory() {
        let msg = format!(
            "tenant {:?} may not map the pool (shared_memory = false in the node's auth file); use TCP",
            access.tenant().unwrap_or_default()
        );
        let _ = send_error(stream, h.request_id, ErrorCode::Forbidden, &msg).await;
        bail!(msg);
    }
    if h.op != Op::ShmAttach || h.reply || h.payload_len != 0 {
        let msg = format!(
            "the shared-memory socket expects shm_attach first, got {}",
            h.op.name()
        );
        let _ = send_error(stream, h.request_id, ErrorCode::Malformed, &msg).await;
        bail!(msg);
    }
    let control = frame_io::read_control(stream, h.control_len).await?;
    let req = ShmAttachRequest::decode(control.as_slice()).context("undecodable shm_attach")?;
    let staging = staging_window("kvcache-staging", req.staging_bytes, serve.max_staging)?;
    let reply = ShmAttachReply {
        pool_bytes: serve.pool_bytes,
        staging_bytes: staging.len() as u64,
        lease_timeout_ms: serve.lease_timeout.as_millis().min(u32::MAX as u128) as u32,
        pool_id: serve.pool_id.clone(),
    }
    .encode_to_vec();
    let mut frame = FrameHeader::reply(Op::ShmAttach, h.request_id, reply.len(), 0)
        .encode()
        .to_vec();
    frame.extend_from_slice(&reply);
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            send_with_fds(
                stream.as_fd(),
                &frame,
                &[serve.pool_ro.as_fd(), staging.fd()],
            )
        })
        .await?;
    stream.write_all(&frame[sent..]).await?;
    Ok((Session::new(staging, serve.lease_timeout, Via::Shm), access))
}
