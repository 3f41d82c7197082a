//! The control channel of one connection: send a request frame, read the reply header and
//! control message, then let the caller read the payload straight into its own memory. It runs
//! over TCP or the node's Unix socket and knows no byte path: shared memory and RDMA
//! ([`crate::path`]) send their control messages through it.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use kvcache_core::checksum::{self, Scatter};
use kvcache_core::wire::{
    ErrorCode, ErrorReply, FrameHeader, FrameLimits, GetReply, GetRequest, HelloReply,
    HelloRequest, LeaseGetReply, LeaseGetRequest, Op, ReleaseRequest,
};
use kvcache_transport::frame_io::{self, FrameReadError};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::ClientError;

/// Replies may carry up to 4 GiB of payload; the node enforces the real limit on requests.
const REPLY_LIMITS: FrameLimits = FrameLimits {
    max_control: 64 << 20,
    max_payload: u32::MAX,
};

pub(crate) struct Connection {
    stream: Stream,
    next_id: u32,
    /// Where a checked get's chunks land from the socket before they are copied into place:
    /// one chunk, reused, so it stays in cache (allocated on the first checked get).
    landing: Vec<u8>,
}

/// The byte stream under a connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

macro_rules! delegate {
    ($self:ident, |$s:ident| $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, |s| Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, |s| Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, |s| Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, |s| Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, |s| Pin::new(s).poll_shutdown(cx))
    }
}

fn read_err(e: FrameReadError) -> ClientError {
    match e {
        FrameReadError::Io(e) => ClientError::Io(e),
        FrameReadError::Closed | FrameReadError::Truncated => ClientError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "kvcache node closed the connection",
        )),
        FrameReadError::Frame(e) => ClientError::Protocol(e.to_string()),
    }
}

pub(crate) fn decode_reply<M: Message + Default>(control: &[u8]) -> Result<M, ClientError> {
    M::decode(control).map_err(|e| ClientError::Protocol(format!("undecodable reply: {e}")))
}

/// The error a node's `ErrorReply` stands for.
pub(crate) fn server_error(control: &[u8]) -> ClientError {
    match decode_reply::<ErrorReply>(control) {
        Ok(err) => ClientError::Server {
            code: ErrorCode::try_from(err.code).unwrap_or(ErrorCode::Unknown),
            message: err.message,
        },
        Err(e) => e,
    }
}

/// What this client calls itself in a node's logs.
const CLIENT_NAME: &str = concat!("kvcache-client/", env!("CARGO_PKG_VERSION"));

/// Presents `token` as the connection's first frame (request id 0). A node that does not know
/// it answers `Unauthenticated` and closes the connection.
pub(crate) async fn hello<S>(stream: &mut S, token: &str) -> Result<HelloReply, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = HelloRequest {
        token: token.to_string(),
        client: CLIENT_NAME.to_string(),
    }
    .encode_to_vec();
    frame_io::write_frame(
        stream,
        &FrameHeader::request(Op::Hello, 0, req.len(), 0),
        &req,
        &[],
    )
    .await?;
    let reply = frame_io::read_header(stream, &REPLY_LIMITS)
        .await
        .map_err(|e| match e {
            // A node from before authentication existed closes on the unknown op.
            FrameReadError::Closed | FrameReadError::Truncated => ClientError::Protocol(
                "the node closed the connection on hello: it may predate authentication; \
                 upgrade it or connect without a token"
                    .into(),
            ),
            other => read_err(other),
        })?;
    let control = frame_io::read_control(stream, reply.control_len)
        .await
        .map_err(read_err)?;
    if reply.op == Op::Error {
        return Err(server_error(&control));
    }
    if !reply.reply || reply.op != Op::Hello {
        return Err(ClientError::Protocol(format!(
            "expected a reply to hello, got {:?}",
            reply.op
        )));
    }
    decode_reply(&control)
}

impl Connection {
    pub(crate) async fn open(addr: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        frame_io::tune(&stream)?;
        if let Some(token) = token {
            hello(&mut stream, token).await?;
        }
        Ok(Self {
            stream: Stream::Tcp(stream),
            next_id: 0,
            landing: Vec::new(),
        })
    }

    /// The control channel over a Unix-socket connection whose first `next_id` requests were
    /// already sent (`Hello`, then `ShmAttach`, which passes descriptors beside the frames).
    pub(crate) fn from_unix(stream: UnixStream, next_id: u32) -> Self {
        Self {
            stream: Stream::Unix(stream),
            next_id,
            landing: Vec::new(),
        }
    }

    /// Sends a request that has no reply (`Release`).
    pub(crate) async fn send_oneway(
        &mut self,
        op: Op,
        req: &impl Message,
    ) -> Result<(), ClientError> {
        self.next_id = self.next_id.wrapping_add(1);
        let control = req.encode_to_vec();
        let header = FrameHeader::request(op, self.next_id, control.len(), 0);
        frame_io::write_frame(&mut self.stream, &header, &control, &[]).await?;
        Ok(())
    }

    /// Sends a request and reads the reply's header and control message. A node's error reply
    /// becomes `ClientError::Server`.
    pub(crate) async fn call(
        &mut self,
        op: Op,
        req: &impl Message,
        payload: &[&[u8]],
    ) -> Result<(FrameHeader, Vec<u8>), ClientError> {
        self.next_id = self.next_id.wrapping_add(1);
        let control = req.encode_to_vec();
        let total: usize = payload.iter().map(|p| p.len()).sum();
        let header = FrameHeader::request(op, self.next_id, control.len(), total);
        frame_io::write_frame(&mut self.stream, &header, &control, payload).await?;
        let reply = frame_io::read_header(&mut self.stream, &REPLY_LIMITS)
            .await
            .map_err(read_err)?;
        let control = frame_io::read_control(&mut self.stream, reply.control_len)
            .await
            .map_err(read_err)?;
        if reply.op == Op::Error {
            return Err(server_error(&control));
        }
        if !reply.reply || reply.op != op || reply.request_id != self.next_id {
            return Err(ClientError::Protocol(format!(
                "expected reply to {} #{}, got {:?} #{}",
                op.name(),
                self.next_id,
                reply.op,
                reply.request_id
            )));
        }
        Ok((reply, control))
    }

    pub(crate) fn expect_no_payload(&self, h: &FrameHeader) -> Result<(), ClientError> {
        if h.payload_len != 0 {
            return Err(ClientError::Protocol(format!(
                "unexpected {}-byte payload",
                h.payload_len
            )));
        }
        Ok(())
    }

    /// A request without payload whose reply has none either.
    pub(crate) async fn call_simple<M: Message + Default>(
        &mut self,
        op: Op,
        req: &impl Message,
    ) -> Result<M, ClientError> {
        let (h, control) = self.call(op, req, &[]).await?;
        self.expect_no_payload(&h)?;
        decode_reply(&control)
    }

    /// `Get`: the reply, its lengths and chunk checksums checked against `keys` and the
    /// payload that follows (which the caller then reads).
    pub(crate) async fn call_get(
        &mut self,
        req: &GetRequest,
        keys: usize,
    ) -> Result<GetReply, ClientError> {
        let (h, control) = self.call(Op::Get, req, &[]).await?;
        let reply: GetReply = decode_reply(&control)?;
        let total: u64 = reply.lens.iter().map(|&l| l as u64).sum();
        if reply.lens.len() != keys || total != h.payload_len as u64 {
            return Err(ClientError::Protocol(format!(
                "get reply lists {} lengths ({total} bytes) for {keys} keys and a {}-byte payload",
                reply.lens.len(),
                h.payload_len
            )));
        }
        let chunks: usize = reply
            .lens
            .iter()
            .map(|&l| checksum::chunk_count(l as usize))
            .sum();
        // A node that predates `client_verifies` checks the chunks itself and sends no sums.
        if !reply.chunk_sums.is_empty() && reply.chunk_sums.len() != chunks {
            return Err(ClientError::Protocol(format!(
                "get reply carries {} chunk checksums for {chunks} chunks",
                reply.chunk_sums.len()
            )));
        }
        Ok(reply)
    }

    /// Reads a block of `len` payload bytes into `dst`, checking each chunk against `sums`;
    /// false if any failed: the bytes in `dst` must then not be used (every byte is still read,
    /// so the stream stays in step). Each chunk lands in the connection's landing buffer, still
    /// in cache, and is then copied into place and hashed in one pass, so what is checked is
    /// exactly what was stored; the stores bypass the caches where one aligned segment holds
    /// the chunk (the engine does not read the bytes soon). At 8 x 1 MiB x4 the client spent
    /// 0.21 CPU-s per GB against 0.25 reading 512 KiB straight into `dst` and hashing it there
    /// (benches/results/tcp-landing-ab.json).
    pub(crate) async fn read_checked(
        &mut self,
        dst: &mut [&mut [u8]],
        len: usize,
        sums: &[u64],
    ) -> Result<bool, ClientError> {
        let mut out = Scatter::new(dst);
        let mut landing = std::mem::take(&mut self.landing);
        landing.resize(checksum::CHUNK, 0);
        let mut intact = true;
        let mut read = Ok(());
        for (i, &sum) in sums.iter().enumerate().take(checksum::chunk_count(len)) {
            let chunk = &mut landing[..checksum::chunk_range(len, i).len()];
            read = self.read_payload_into(chunk).await;
            if read.is_err() {
                break;
            }
            intact &= checksum::copy_chunk_checked_streaming(chunk, &mut out) == Some(sum);
        }
        self.landing = landing;
        read.map(|()| intact)
    }

    /// Reports blocks a `client_verifies` get found corrupt, so the node checks and drops
    /// them (one-way).
    pub(crate) async fn report_suspects(
        &mut self,
        suspect: &[kvcache_core::BlockKey],
    ) -> Result<(), ClientError> {
        if suspect.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            blocks = suspect.len(),
            "kvcache: blocks failed verification; reported as misses"
        );
        let req = ReleaseRequest {
            lease_id: 0,
            suspect: kvcache_core::wire::encode_keys(suspect),
        };
        self.send_oneway(Op::Release, &req).await
    }

    /// `LeaseGet`: leases `keys` and returns where each lies in the pool (length 0 for a miss).
    /// With `verify` the node checks every block before answering (for bytes the client
    /// cannot check where they land).
    pub(crate) async fn lease(
        &mut self,
        keys: &[kvcache_core::BlockKey],
        verify: bool,
    ) -> Result<LeaseGetReply, ClientError> {
        let req = LeaseGetRequest {
            keys: kvcache_core::wire::encode_keys(keys),
            verify,
        };
        let reply: LeaseGetReply = self.call_simple(Op::LeaseGet, &req).await?;
        let n = keys.len();
        if reply.lens.len() != n || reply.offsets.len() != n || reply.trailer_checksums.len() != n {
            return Err(ClientError::Protocol(format!(
                "shm_get reply describes {} blocks for {n} keys",
                reply.lens.len()
            )));
        }
        Ok(reply)
    }

    /// `Release`: ends a lease, naming blocks that failed the client's check.
    pub(crate) async fn release(
        &mut self,
        lease_id: u64,
        suspect: &[kvcache_core::BlockKey],
    ) -> Result<(), ClientError> {
        if lease_id == 0 {
            return Ok(()); // Nothing was leased.
        }
        let req = ReleaseRequest {
            lease_id,
            suspect: kvcache_core::wire::encode_keys(suspect),
        };
        self.send_oneway(Op::Release, &req).await
    }

    pub(crate) async fn read_payload_into(&mut self, dst: &mut [u8]) -> Result<(), ClientError> {
        frame_io::read_payload(&mut self.stream, dst)
            .await
            .map_err(read_err)
    }

    pub(crate) async fn skip_payload(&mut self, len: usize) -> Result<(), ClientError> {
        frame_io::skip_payload(&mut self.stream, len as u64)
            .await
            .map_err(read_err)
    }
}
