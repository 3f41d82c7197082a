//! The async ZMQ subscriber: connects a SUB socket, reconnects with backoff, detects gaps with
//! [`SeqTracker`], fills them by replay when it can, and tells its consumer [`Update`]s.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};
use zeromq::{
    Endpoint, Socket, SocketEvent, SocketOptions, SocketRecv, SubSocket, ZmqError, ZmqMessage,
};

use super::decode::{EventBatch, EventError, decode, decode_seq};
use super::replay::{CONNECT_TIMEOUT, fetch_replay};
use super::seq::{SeqTracker, SeqVerdict};

/// What a subscriber tells its consumer.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// The next batch, in sequence order.
    Batch(EventBatch),
    /// Events were lost (a gap in sequence numbers that replay could not fill, or a reconnect):
    /// the consumer must forget this engine's blocks and start over.
    Resync { reason: String },
}

/// Gaps wider than this are not worth replaying (vLLM keeps 10 000 batches by default).
const MAX_REPLAY: u64 = 100_000;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Subscribes to `endpoint` (e.g. "tcp://127.0.0.1:5557") with `topic`, reconnecting with backoff (100 ms doubling to 5 s) until `updates` is closed; on a gap in sequence numbers it asks `replay` (if given) for the missing range, else (or if replay fails) sends Update::Resync. Logs each degradation once with its reason.
pub async fn subscribe(
    endpoint: String,
    topic: String,
    replay: Option<String>,
    updates: mpsc::Sender<Update>,
) {
    if let Err(e) = endpoint.parse::<Endpoint>() {
        error!(%endpoint, error = %e, "invalid KV event endpoint; not subscribing");
        return;
    }
    let replay = match replay {
        Some(r) => match r.parse::<Endpoint>() {
            Ok(_) => Some(r),
            Err(e) => {
                warn!(%endpoint, replay = %r, error = %e, "invalid KV event replay endpoint; gaps will resync instead");
                None
            }
        },
        None => {
            info!(%endpoint, "no KV event replay endpoint; gaps will resync instead");
            None
        }
    };
    let mut backoff = Backoff::default();
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = updates.closed() => return,
            attempt = connect_sub(&endpoint, &topic) => attempt,
        };
        let delay = match attempt {
            Ok((socket, monitor)) => {
                info!(%endpoint, %topic, "subscribed to KV events");
                failures = 0;
                let mut session = Session {
                    endpoint: &endpoint,
                    replay: replay.as_deref(),
                    updates: &updates,
                    tracker: SeqTracker::default(),
                    received: false,
                };
                let reason = match session.run(socket, monitor).await {
                    Ok(reason) => reason,
                    Err(Closed) => return,
                };
                if session.received {
                    backoff = Backoff::default();
                }
                warn!(%endpoint, %reason, "KV event stream lost; consumer resyncs, reconnecting");
                if updates.send(Update::Resync { reason }).await.is_err() {
                    return;
                }
                backoff.next_delay()
            }
            Err(e) => {
                let delay = backoff.next_delay();
                if failures == 0 {
                    warn!(%endpoint, error = %e, "cannot connect to KV event publisher; retrying with backoff up to 5 s");
                } else {
                    debug!(%endpoint, error = %e, ?delay, failures, "KV event publisher still unreachable");
                }
                failures = failures.saturating_add(1);
                delay
            }
        };
        tokio::select! {
            _ = updates.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential reconnect delay: 100 ms doubling to 5 s.
pub(super) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }
}

/// The consumer went away: the subscriber stops.
struct Closed;

/// Connects a SUB socket, returning it with its monitor (which reports disconnects).
async fn connect_sub(
    endpoint: &str,
    topic: &str,
) -> Result<(SubSocket, impl Stream<Item = SocketEvent> + Unpin + use<>), ZmqError> {
    let mut options = SocketOptions::default();
    options.connect_timeout(CONNECT_TIMEOUT);
    let mut socket = SubSocket::with_options(options);
    let monitor = socket.monitor();
    // Remembered by the socket and sent to the publisher as soon as the connection is up.
    socket.subscribe(topic).await?;
    socket.connect(endpoint).await?;
    Ok((socket, monitor))
}

/// One connection's worth of receiving: gap detection, replay and forwarding.
struct Session<'a> {
    endpoint: &'a str,
    replay: Option<&'a str>,
    updates: &'a mpsc::Sender<Update>,
    tracker: SeqTracker,
    /// Whether any message arrived (a connection that delivers nothing does not reset backoff).
    received: bool,
}

impl Session<'_> {
    /// Receives until the connection is lost (returns why) or the consumer goes away.
    async fn run(
        &mut self,
        mut socket: SubSocket,
        mut monitor: impl Stream<Item = SocketEvent> + Unpin,
    ) -> Result<String, Closed> {
        loop {
            // The monitor reports a disconnect only after the socket has handed out every
            // message that arrived before it, so nothing received is dropped here.
            let message = tokio::select! {
                _ = self.updates.closed() => return Err(Closed),
                event = monitor.next() => match event {
                    Some(SocketEvent::Disconnected(_)) => {
                        return Ok("the publisher closed the connection".into());
                    }
                    Some(_) => continue,
                    None => return Ok("the socket monitor closed".into()),
                },
                message = socket.recv() => match message {
                    Ok(message) => message,
                    Err(e) => return Ok(format!("receiving failed: {e}")),
                },
            };
            self.received = true;
            self.handle(&message).await?;
        }
    }

    async fn handle(&mut self, message: &ZmqMessage) -> Result<(), Closed> {
        let (seq_frame, payload) = match (message.len(), message.get(1), message.get(2)) {
            (3, Some(seq), Some(payload)) => (seq, payload),
            (n, _, _) => {
                self.tracker.reset();
                return self
                    .resync(format!("dropped a message: {}", EventError::Frames(n)))
                    .await;
            }
        };
        let seq = match decode_seq(seq_frame) {
            Ok(seq) => seq,
            Err(e) => {
                self.tracker.reset();
                return self.resync(format!("dropped a message: {e}")).await;
            }
        };
        match self.tracker.observe(seq) {
            SeqVerdict::First | SeqVerdict::Next => {}
            SeqVerdict::Restarted { expected } => {
                self.resync(format!(
                    "sequence number fell from {expected} to {seq}: the engine restarted"
                ))
                .await?;
            }
            SeqVerdict::Gap { from, to } => self.fill_gap(from, to).await?,
        }
        match decode(seq_frame, payload) {
            Ok(batch) => self.send(Update::Batch(batch)).await,
            Err(e) => {
                self.resync(format!("batch {seq} is undecodable: {e}"))
                    .await
            }
        }
    }

    /// Replays batches `from..to` in order, or resyncs when that is impossible.
    async fn fill_gap(&mut self, from: u64, to: u64) -> Result<(), Closed> {
        let Some(replay) = self.replay else {
            return self
                .resync(format!(
                    "missed batches {from}..{to} and no replay endpoint is configured"
                ))
                .await;
        };
        if to - from > MAX_REPLAY {
            return self
                .resync(format!(
                    "missed {} batches ({from}..{to}), more than the {MAX_REPLAY} worth replaying",
                    to - from
                ))
                .await;
        }
        match fetch_replay(replay, from, to).await {
            Ok(batches) => {
                debug!(
                    endpoint = self.endpoint,
                    from, to, "filled a KV event gap from replay"
                );
                for batch in batches {
                    self.send(Update::Batch(batch)).await?;
                }
                Ok(())
            }
            Err(e) => {
                self.resync(format!(
                    "missed batches {from}..{to} and replay from {replay} failed: {e}"
                ))
                .await
            }
        }
    }

    async fn resync(&self, reason: String) -> Result<(), Closed> {
        warn!(endpoint = self.endpoint, %reason, "KV events lost; consumer resyncs");
        self.send(Update::Resync { reason }).await
    }

    async fn send(&self, update: Update) -> Result<(), Closed> {
        self.updates.send(update).await.map_err(|_| Closed)
    }
}
