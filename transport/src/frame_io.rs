//! Framed I/O: read and write `header ‖ control ‖ payload` frames on any tokio stream (TCP or
//! the node's Unix socket). Payload bytes are written from, and read into, caller-provided slices, so a block
//! moves between the socket and its final place in memory without an intermediate copy.

use std::io::{self, IoSlice};

use kvcache_core::wire::{FrameError, FrameHeader, FrameLimits, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    #[error("connection closed by peer")]
    Closed,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("i/o error: {0}")]
    Io(io::Error),
}

impl FrameReadError {
    fn from_io(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated
        } else {
            Self::Io(e)
        }
    }
}

/// Socket buffer size for data connections: large enough to keep MiB-sized blocks streaming.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Sets the options every data connection uses: no Nagle delay, large socket buffers from the
/// first byte (kernel autotuning would start small on every new connection), and TCP
/// keepalive, so a peer whose host died (a half-open socket) is found within about a minute
/// and its connection slot freed. Takes any TCP socket, tokio's or std's.
pub fn tune<S: std::os::fd::AsFd>(stream: &S) -> io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_nodelay(true)?;
    // Buffer sizes are a hint the kernel may clamp; failure is harmless.
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)?;
    Ok(())
}

/// Reads one frame header. `Err(Closed)` means the peer closed cleanly between frames.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &FrameLimits,
) -> Result<FrameHeader, FrameReadError> {
    let mut buf = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = r
            .read(&mut buf[filled..])
            .await
            .map_err(FrameReadError::Io)?;
        if n == 0 {
            return Err(if filled == 0 {
                FrameReadError::Closed
            } else {
                FrameReadError::Truncated
            });
        }
        filled += n;
    }
    Ok(FrameHeader::decode(&buf, limits)?)
}

/// Reads exactly `len` bytes of control message.
pub async fn read_control<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
) -> Result<Vec<u8>, FrameReadError> {
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)
        .await
        .map_err(FrameReadError::from_io)?;
    Ok(buf)
}

/// Reads exactly `dst.len()` payload bytes into `dst`.
pub async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
) -> Result<(), FrameReadError> {
    r.read_exact(dst).await.map_err(FrameReadError::from_io)?;
    Ok(())
}

/// Reads and discards `len` bytes (the payload of a block that is not kept).
pub async fn skip_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    mut len: u64,
) -> Result<(), FrameReadError> {
    // On the heap: a 64 KiB array here would sit in the state of every future that may call
    // this (a client's get), and be copied each time such a future moves.
    let mut scratch = vec![0u8; len.min(64 * 1024) as usize];
    while len > 0 {
        let want = len.min(scratch.len() as u64) as usize;
        r.read_exact(&mut scratch[..want])
            .await
            .map_err(FrameReadError::from_io)?;
        len -= want as u64;
    }
    Ok(())
}

/// Writes a whole frame with vectored writes: header, control, then every payload slice.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &FrameHeader,
    control: &[u8],
    payload: &[&[u8]],
) -> io::Result<()> {
    let head = header.encode();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(2 + payload.len());
    parts.push(&head);
    parts.push(control);
    parts.extend(payload.iter().copied());
    write_all_vectored(w, &parts).await?;
    w.flush().await
}

/// `write_all` over many slices, without concatenating them.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
) -> io::Result<()> {
    // Position: index of the first unfinished part and bytes already written of it.
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < parts.len() {
        if parts[idx].len() == off {
            idx += 1;
            off = 0;
            continue;
        }
        // At most 64 slices per call keeps us under IOV_MAX and the slice vector small.
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(64.min(parts.len() - idx));
        iov.push(IoSlice::new(&parts[idx][off..]));
        iov.extend(parts[idx + 1..].iter().take(63).map(|p| IoSlice::new(p)));
        let mut n = w.write_vectored(&iov).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcache_core::wire::Op;

    #[tokio::test]
    async fn frame_round_trips_through_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(1 << 10);
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let writer = tokio::spawn(async move {
            let h = FrameHeader::request(Op::Put, 3, 4, payload.len());
            write_frame(
                &mut a,
                &h,
                b"ctrl",
                &[&payload[..100], &[], &payload[100..]],
            )
            .await
            .unwrap();
            payload
        });
        let h = read_header(&mut b, &FrameLimits::default()).await.unwrap();
        assert_eq!(
            (h.op, h.request_id, h.control_len, h.payload_len),
            (Op::Put, 3, 4, 5000)
        );
        assert_eq!(read_control(&mut b, h.control_len).await.unwrap(), b"ctrl");
        let mut got = vec![0u8; 5000];
        read_payload(&mut b, &mut got).await.unwrap();
        assert_eq!(got, writer.await.unwrap());
        assert!(matches!(
            read_header(&mut b, &FrameLimits::default()).await,
            Err(FrameReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn truncated_header_is_reported_as_truncated() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"KV\x01").await.unwrap();
        drop(a);
        assert!(matches!(
            read_header(&mut b, &FrameLimits::default()).await,
            Err(FrameReadError::Truncated)
        ));
    }
}
