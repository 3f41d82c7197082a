//! The replay client: asks a vLLM replay ROUTER for the batches a subscriber missed.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, ZmqError, ZmqMessage};

use super::decode::{EventBatch, EventError, decode, decode_seq};

/// How long one connection attempt (SUB or replay DEALER) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a whole replay (connect, request, every reply) may take before we resync instead.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(3);

/// vLLM's end-of-replay marker: sequence number -1.
pub(super) const END_SEQ: [u8; 8] = [0xff; 8];

/// Why a replay could not fill a gap.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReplayError {
    #[error("{0}")]
    Zmq(#[from] ZmqError),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("a reply has {0} frames, expected 4 (empty, topic, sequence number, payload)")]
    Frames(usize),
    #[error("the replay buffer no longer holds batch {wanted}")]
    Evicted { wanted: u64 },
    #[error(transparent)]
    Decode(#[from] EventError),
}

/// Asks a vLLM replay ROUTER for batches `from..to` over a fresh DEALER socket.
pub(super) async fn fetch_replay(
    endpoint: &str,
    from: u64,
    to: u64,
) -> Result<Vec<EventBatch>, ReplayError> {
    let deadline = Instant::now() + REPLAY_TIMEOUT;
    let fetch = async {
        let mut options = SocketOptions::default();
        options.connect_timeout(CONNECT_TIMEOUT);
        let mut dealer = DealerSocket::with_options(options);
        dealer.connect(endpoint).await?;
        // vLLM's ROUTER expects [identity, empty, start]; it adds the identity, we add the
        // empty delimiter a REQ socket would.
        let mut request = ZmqMessage::from(Bytes::new());
        request.push_back(Bytes::copy_from_slice(&from.to_be_bytes()));
        dealer.send(request).await?;
        let mut batches = Vec::new();
        let mut next = from;
        while next < to {
            let reply = dealer.recv().await?;
            let (Some(seq), Some(payload), 4) = (reply.get(2), reply.get(3), reply.len()) else {
                return Err(ReplayError::Frames(reply.len()));
            };
            if seq[..] == END_SEQ {
                return Err(ReplayError::Evicted { wanted: next });
            }
            let got = decode_seq(seq)?;
            if got < next {
                continue;
            }
            if got > next {
                return Err(ReplayError::Evicted { wanted: next });
            }
            batches.push(decode(seq, payload)?);
            next += 1;
        }
        Ok(batches)
    };
    tokio::time::timeout_at(deadline, fetch)
        .await
        .map_err(|_| ReplayError::Timeout(REPLAY_TIMEOUT))?
}
