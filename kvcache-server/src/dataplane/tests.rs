//! The request loop in memory: a [`DataPlane`] over `tokio::io::duplex`, driven frame by
//! frame as a client would, with no socket and no server process (quinn's `Pair`, for our
//! loop). The end-to-end suites in `tests/` run the same ops over real sockets.

use std::sync::Arc;
use std::time::Duration;

use kvcache_core::BlockKey;
use kvcache_core::wire::{
    self, ErrorCode, ErrorReply, ExistsReply, ExistsRequest, FrameHeader, FrameLimits, GetReply,
    GetRequest, Op, PingReply, PingRequest, PrefixMatchReply, PrefixMatchRequest, PutReply,
    PutRequest, PutStatus,
};
use kvcache_transport::LockMode;
use kvcache_transport::frame_io::{self, FrameReadError};
use prost::Message;
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::watch;

use crate::auth::Auth;
use crate::dataplane::connection::{DataPlane, serve_stream};
use crate::dataplane::request::ServiceContext;
use crate::dataplane::session::UpgradePath;
use crate::metrics::Metrics;
use kvcache_store::{Store, StoreConfig};

/// A client end of an in-memory connection to a running loop.
struct Pair {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    next_id: u32,
    plane: Arc<DataPlane>,
    loop_task: tokio::task::JoinHandle<()>,
    _stop: watch::Sender<bool>,
}

impl Pair {
    fn new(max_keys: usize) -> Self {
        let store = Store::new(&StoreConfig {
            capacity: 8 << 20,
            lock: LockMode::Off,
            ..StoreConfig::default()
        })
        .unwrap();
        let ctx = Arc::new(ServiceContext {
            store,
            metrics: Arc::new(Metrics::default()),
            limits: FrameLimits::default(),
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            max_keys,
            max_leased_bytes: 1 << 20,
            auth: Arc::new(Auth::open()),
            shm_socket: None,
            host_id: "in-memory".into(),
            rdma_device: String::new(),
            landing: Default::default(),
        });
        let plane = Arc::new(DataPlane {
            ctx,
            upgrade: UpgradePath::Off("no device in memory".into()),
        });
        let (client, server) = tokio::io::duplex(1 << 20);
        let (stop, stopped) = watch::channel(false);
        let served = Arc::clone(&plane);
        let loop_task = tokio::spawn(async move {
            let (rd, wr) = tokio::io::split(server);
            let access = served.ctx.auth.initial();
            serve_stream(&served, rd, wr, "in-memory", stopped, None, access).await;
        });
        let (rd, wr) = tokio::io::split(client);
        Self {
            rd,
            wr,
            next_id: 0,
            plane,
            loop_task,
            _stop: stop,
        }
    }

    async fn send(&mut self, op: Op, req: &impl Message, payload: &[&[u8]]) -> u32 {
        self.next_id += 1;
        let control = req.encode_to_vec();
        let total = payload.iter().map(|p| p.len()).sum();
        let h = FrameHeader::request(op, self.next_id, control.len(), total);
        frame_io::write_frame(&mut self.wr, &h, &control, payload)
            .await
            .unwrap();
        self.next_id
    }

    /// The next reply: its header, control message and payload.
    async fn reply(&mut self) -> Result<(FrameHeader, Vec<u8>, Vec<u8>), FrameReadError> {
        let limits = FrameLimits {
            max_control: 64 << 20,
            max_payload: u32::MAX,
        };
        let h = frame_io::read_header(&mut self.rd, &limits).await?;
        let control = frame_io::read_control(&mut self.rd, h.control_len).await?;
        let mut payload = vec![0u8; h.payload_len as usize];
        frame_io::read_payload(&mut self.rd, &mut payload).await?;
        Ok((h, control, payload))
    }

    async fn call<M: Message + Default>(&mut self, op: Op, req: &impl Message) -> M {
        let id = self.send(op, req, &[]).await;
        let (h, control, _) = self.reply().await.unwrap();
        assert_eq!((h.op, h.request_id, h.reply), (op, id, true));
        M::decode(control.as_slice()).unwrap()
    }

    async fn put(&mut self, blocks: &[(BlockKey, &[u8])]) -> Vec<i32> {
        let keys: Vec<BlockKey> = blocks.iter().map(|b| b.0).collect();
        let req = PutRequest {
            keys: wire::encode_keys(&keys),
            lens: blocks.iter().map(|b| b.1.len() as u32).collect(),
        };
        let payload: Vec<&[u8]> = blocks.iter().map(|b| b.1).collect();
        self.send(Op::Put, &req, &payload).await;
        let (h, control, _) = self.reply().await.unwrap();
        assert_eq!(h.op, Op::Put);
        PutReply::decode(control.as_slice()).unwrap().statuses
    }

    async fn error(&mut self) -> (ErrorCode, String) {
        let (h, control, _) = self.reply().await.unwrap();
        assert_eq!(h.op, Op::Error, "expected an error reply");
        let e = ErrorReply::decode(control.as_slice()).unwrap();
        (ErrorCode::try_from(e.code).unwrap(), e.message)
    }
}

fn keys(n: u128) -> Vec<BlockKey> {
    (1..=n).map(BlockKey).collect()
}

#[tokio::test]
async fn put_then_get_exists_and_prefix_match_round_trip_in_memory() {
    let mut p = Pair::new(64);
    let ping: PingReply = p.call(Op::Ping, &PingRequest {}).await;
    assert_eq!(ping.protocol_version, wire::PROTOCOL_VERSION as u32);
    assert_eq!(
        (ping.host_id.as_str(), ping.rdma_device.as_str()),
        ("in-memory", "")
    );
    let (a, b) = (vec![7u8; 100_000], vec![9u8; 3]);
    let stored = p.put(&[(BlockKey(1), &a), (BlockKey(2), &b)]).await;
    assert_eq!(stored, [PutStatus::Stored as i32; 2]);
    let again = p.put(&[(BlockKey(1), &a)]).await;
    assert_eq!(again, [PutStatus::AlreadyPresent as i32]);

    let req = GetRequest {
        keys: wire::encode_keys(&keys(3)),
        ..Default::default()
    };
    p.send(Op::Get, &req, &[]).await;
    let (h, control, payload) = p.reply().await.unwrap();
    assert_eq!(h.op, Op::Get);
    let lens = GetReply::decode(control.as_slice()).unwrap().lens;
    assert_eq!(lens, [100_000, 3, 0], "the third key is a miss");
    assert_eq!(&payload[..100_000], &a[..]);
    assert_eq!(&payload[100_000..], &b[..]);

    let req = ExistsRequest {
        keys: wire::encode_keys(&keys(3)),
    };
    let present: ExistsReply = p.call(Op::Exists, &req).await;
    assert_eq!(present.present, [true, true, false]);
    let chain = [BlockKey(1), BlockKey(2), BlockKey(3), BlockKey(1)];
    let req = PrefixMatchRequest {
        keys: wire::encode_keys(&chain),
    };
    let matched: PrefixMatchReply = p.call(Op::PrefixMatch, &req).await;
    assert_eq!(matched.matched, 2);
    let m = &p.plane.ctx.metrics;
    assert_eq!(m.connections_active(), 1, "the loop counts its connection");
}

#[tokio::test]
async fn a_bad_request_is_refused_and_the_connection_goes_on() {
    let mut p = Pair::new(4);
    // Undecodable control message: refused, connection kept.
    p.next_id += 1;
    let h = FrameHeader::request(Op::Exists, p.next_id, 3, 0);
    frame_io::write_frame(&mut p.wr, &h, &[0xff, 0xff, 0xff], &[])
        .await
        .unwrap();
    let (code, message) = p.error().await;
    assert_eq!(code, ErrorCode::Malformed, "{message}");
    // More keys than --max-keys-per-request: refused before any lookup.
    let req = ExistsRequest {
        keys: wire::encode_keys(&keys(5)),
    };
    p.send(Op::Exists, &req, &[]).await;
    let (code, message) = p.error().await;
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("--max-keys-per-request"), "{message}");
    // A lease-get without a session, with a payload it may not carry: refused, payload skipped.
    let req = ExistsRequest {
        keys: wire::encode_keys(&keys(1)),
    };
    p.send(Op::LeaseGet, &req, &[b"junk"]).await;
    let (code, _) = p.error().await;
    assert_eq!(code, ErrorCode::Malformed);
    // RDMA on a node without it: refused with the node's reason.
    p.send(Op::RdmaConnect, &req, &[]).await;
    let (_, message) = p.error().await;
    assert!(message.contains("no device in memory"), "{message}");
    // The connection still serves.
    let ok = p.put(&[(BlockKey(5), b"still here")]).await;
    assert_eq!(ok, [PutStatus::Stored as i32]);
}

#[tokio::test]
async fn an_untrusted_header_gets_an_error_and_ends_the_connection() {
    let mut p = Pair::new(64);
    p.wr.write_all(&[0u8; wire::HEADER_LEN]).await.unwrap();
    let (code, _) = p.error().await;
    assert_eq!(code, ErrorCode::Malformed);
    assert!(matches!(p.reply().await, Err(FrameReadError::Closed)));
    tokio::time::timeout(Duration::from_secs(5), &mut p.loop_task)
        .await
        .expect("the loop ends")
        .unwrap();
    assert_eq!(p.plane.ctx.metrics.connections_active(), 0);
}
