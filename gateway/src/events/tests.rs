//! The decoder against vLLM's own encoder's bytes and malformed input, and the subscriber over
//! real loopback ZMQ sockets (gaps, replay, engine restarts).

use super::decode::{EngineHash, EventBatch, EventError, KvEvent, decode, decode_seq};
use super::replay::END_SEQ;
use super::seq::{SeqTracker, SeqVerdict};
use super::subscribe::{Backoff, Update, subscribe};
use bytes::Bytes;
use rmpv::Value;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/kv_events")
}

/// An event as `make.py` describes it in expected.json.
fn expected_event(v: &serde_json::Value) -> KvEvent {
    let hashes = |key: &str| -> Vec<EngineHash> {
        v[key]
            .as_array()
            .expect("hashes")
            .iter()
            .map(|h| EngineHash(h.as_u64().expect("u64 hash")))
            .collect()
    };
    let opt_string = |key: &str| v[key].as_str().map(str::to_owned);
    match v["kind"].as_str().expect("kind") {
        "Stored" => KvEvent::Stored {
            hashes: hashes("hashes"),
            parent: v["parent"].as_u64().map(EngineHash),
            token_ids: v["token_ids"]
                .as_array()
                .expect("token_ids")
                .iter()
                .map(|t| u32::try_from(t.as_u64().expect("token")).expect("u32"))
                .collect(),
            block_size: v["block_size"].as_u64().expect("block_size") as usize,
            lora_name: opt_string("lora_name"),
            medium: opt_string("medium"),
        },
        "Removed" => KvEvent::Removed {
            hashes: hashes("hashes"),
            medium: opt_string("medium"),
        },
        "Cleared" => KvEvent::Cleared,
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn decodes_payloads_written_by_vllms_own_encoder_as_make_py_expects() {
    let dir = data_dir();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let cases = expected["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10, "make.py writes at least 10 cases");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let payload =
            std::fs::read(dir.join(case["file"].as_str().expect("file"))).expect("payload file");
        let seq = case["seq"].as_u64().expect("seq");
        let batch = decode(&seq.to_be_bytes(), &payload)
            .unwrap_or_else(|e| panic!("{name}: decode failed: {e}"));
        let want = EventBatch {
            seq,
            ts: case["ts"].as_f64().expect("ts"),
            data_parallel_rank: case["data_parallel_rank"]
                .as_u64()
                .map(|r| u32::try_from(r).expect("rank")),
            events: case["events"]
                .as_array()
                .expect("events")
                .iter()
                .map(expected_event)
                .collect(),
            unknown: case["unknown"].as_u64().expect("unknown") as usize,
        };
        assert_eq!(batch, want, "case {name}");
    }
}

#[test]
fn bytes_hash_folds_to_the_int_vllm_would_publish() {
    // vLLM's int mode: int.from_bytes(h, "big") & (2**64 - 1).
    let mut h = [0u8; 32];
    h[24..].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    h[0] = 0xaa;
    assert_eq!(
        EngineHash::from_bytes(&h),
        EngineHash(0x0102_0304_0506_0708)
    );
    assert_eq!(EngineHash::from_bytes(&[0x01, 0x02]), EngineHash(0x0102));
    assert_eq!(EngineHash::from_bytes(&[]), EngineHash(0));
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("encode to vec");
    out
}

fn s(text: &str) -> Value {
    Value::from(text)
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}

fn batch_of(events: Vec<Value>) -> Vec<u8> {
    encode(&Value::Array(vec![
        Value::F64(1.0),
        Value::Array(events),
        Value::Nil,
    ]))
}

fn stored_event(token: Value) -> Value {
    map(vec![
        ("type", s("BlockStored")),
        ("block_hashes", Value::Array(vec![Value::from(1u64)])),
        ("parent_block_hash", Value::Nil),
        ("token_ids", Value::Array(vec![token])),
        ("block_size", Value::from(1u64)),
    ])
}

const SEQ: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 1];

#[test]
fn malformed_messages_are_errors_not_panics() {
    let good = batch_of(vec![stored_event(Value::from(5u64))]);
    assert!(decode(&SEQ, &good).is_ok());

    for cut in 0..good.len() {
        assert!(
            matches!(decode(&SEQ, &good[..cut]), Err(EventError::Msgpack(_))),
            "truncated at {cut}"
        );
    }
    assert!(matches!(
        decode(&SEQ[..7], &good),
        Err(EventError::SeqLength(7))
    ));
    assert!(matches!(
        decode(&[0; 9], &good),
        Err(EventError::SeqLength(9))
    ));
    let mut trailing = good.clone();
    trailing.push(0xc0);
    assert!(matches!(
        decode(&SEQ, &trailing),
        Err(EventError::TrailingBytes(1))
    ));
    assert!(matches!(
        decode(&SEQ, &encode(&map(vec![("ts", Value::F64(1.0))]))),
        Err(EventError::NotABatch(_))
    ));
    assert!(matches!(
        decode(&SEQ, &encode(&Value::Array(vec![Value::F64(1.0)]))),
        Err(EventError::NotABatch(_))
    ));
    assert!(matches!(
        decode(
            &SEQ,
            &encode(&Value::Array(vec![s("x"), Value::Array(vec![])]))
        ),
        Err(EventError::BatchField { field: "ts", .. })
    ));
    assert!(matches!(
        decode(&SEQ, &encode(&Value::Array(vec![Value::F64(1.0), s("x")]))),
        Err(EventError::BatchField {
            field: "events",
            ..
        })
    ));
    let untagged = map(vec![("block_hashes", Value::Array(vec![]))]);
    assert!(matches!(
        decode(&SEQ, &batch_of(vec![untagged])),
        Err(EventError::MissingTag { index: 0 })
    ));
    let number_tag = map(vec![("type", Value::from(3u64))]);
    assert!(matches!(
        decode(&SEQ, &batch_of(vec![number_tag])),
        Err(EventError::BadTag { index: 0, .. })
    ));
    assert!(matches!(
        decode(&SEQ, &batch_of(vec![Value::Array(vec![])])),
        Err(EventError::MissingTag { index: 0 })
    ));
    assert!(matches!(
        decode(&SEQ, &batch_of(vec![Value::from(7u64)])),
        Err(EventError::NotAnEvent { index: 0, .. })
    ));
    for bad_token in [
        s("seven"),
        Value::from(-1i64),
        Value::from(1u64 << 33),
        Value::F64(1.0),
    ] {
        let err = decode(&SEQ, &batch_of(vec![stored_event(bad_token.clone())]));
        assert!(
            matches!(
                err,
                Err(EventError::BadField {
                    field: "token_ids",
                    ..
                })
            ),
            "token {bad_token:?}: {err:?}"
        );
    }
    let no_hashes = map(vec![("type", s("BlockRemoved")), ("medium", Value::Nil)]);
    assert!(matches!(
        decode(&SEQ, &batch_of(vec![no_hashes])),
        Err(EventError::MissingField {
            field: "block_hashes",
            ..
        })
    ));
    let string_hash = Value::Array(vec![s("BlockRemoved"), Value::Array(vec![s("not a hash")])]);
    assert!(matches!(
        decode(&SEQ, &batch_of(vec![string_hash])),
        Err(EventError::BadField {
            field: "block_hashes",
            ..
        })
    ));
    // Deeply nested input hits rmpv's depth limit instead of the stack.
    let mut deep = vec![0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0];
    deep.extend(std::iter::repeat_n(0x91, 100_000));
    assert!(decode(&SEQ, &deep).is_err());
}

#[test]
fn seq_tracker_starts_anywhere_then_flags_gaps_and_restarts() {
    let mut t = SeqTracker::default();
    assert_eq!(t.observe(17), SeqVerdict::First);
    assert_eq!(t.observe(18), SeqVerdict::Next);
    assert_eq!(t.observe(21), SeqVerdict::Gap { from: 19, to: 21 });
    assert_eq!(t.observe(22), SeqVerdict::Next);
    assert_eq!(t.observe(0), SeqVerdict::Restarted { expected: 23 });
    assert_eq!(t.observe(1), SeqVerdict::Next);
    assert_eq!(t.observe(1), SeqVerdict::Restarted { expected: 2 });
    t.reset();
    assert_eq!(t.observe(500), SeqVerdict::First);
}

#[test]
fn backoff_doubles_from_100ms_to_5s() {
    let mut b = Backoff::default();
    let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
}

/// Bounds every wait in the socket tests: they must never hang.
const WAIT: Duration = Duration::from_secs(10);

/// A vLLM-like publisher: PUB for live batches, a shared buffer that a ROUTER replays.
struct FakeEngine {
    publisher: PubSocket,
    buffer: Arc<Mutex<Vec<(u64, Bytes)>>>,
}

/// A batch with one Stored event whose block hash is `1000 + seq`.
fn payload_for(seq: u64) -> Bytes {
    let event = map(vec![
        ("type", s("BlockStored")),
        ("block_hashes", Value::Array(vec![Value::from(1000 + seq)])),
        ("parent_block_hash", Value::Nil),
        ("token_ids", Value::Array(vec![Value::from(seq)])),
        ("block_size", Value::from(1u64)),
        ("lora_id", Value::Nil),
        ("medium", s("GPU")),
        ("lora_name", Value::Nil),
    ]);
    Bytes::from(batch_of(vec![event]))
}

impl FakeEngine {
    /// Binds PUB (and, with `replay`, a ROUTER) on loopback; returns their endpoints.
    async fn start(replay: bool) -> (FakeEngine, String, Option<String>) {
        let mut publisher = PubSocket::new();
        let endpoint = publisher
            .bind("tcp://127.0.0.1:0")
            .await
            .expect("bind PUB")
            .to_string();
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let replay_endpoint = if replay {
            let mut router = RouterSocket::new();
            let ep = router
                .bind("tcp://127.0.0.1:0")
                .await
                .expect("bind ROUTER")
                .to_string();
            tokio::spawn(serve_replay(router, buffer.clone()));
            Some(ep)
        } else {
            None
        };
        (FakeEngine { publisher, buffer }, endpoint, replay_endpoint)
    }

    /// Records `seq` for replay and, when `send`, publishes it (else it is "lost").
    async fn publish(&mut self, seq: u64, send: bool) {
        let payload = payload_for(seq);
        self.buffer
            .lock()
            .expect("buffer lock")
            .push((seq, payload.clone()));
        if send {
            let mut message = ZmqMessage::from(Bytes::new());
            message.push_back(Bytes::copy_from_slice(&seq.to_be_bytes()));
            message.push_back(payload);
            self.publisher.send(message).await.expect("publish");
        }
    }
}

/// vLLM's `_service_replay`, over the shared buffer.
async fn serve_replay(mut router: RouterSocket, buffer: Arc<Mutex<Vec<(u64, Bytes)>>>) {
    while let Ok(request) = router.recv().await {
        let frames = request.into_vec();
        let [id, _, start] = frames.as_slice() else {
            continue;
        };
        let Ok(start) = decode_seq(start) else {
            continue;
        };
        let held: Vec<_> = buffer.lock().expect("buffer lock").clone();
        for (seq, payload) in held.into_iter().filter(|(seq, _)| *seq >= start) {
            let mut reply = ZmqMessage::from(id.clone());
            for frame in [
                Bytes::new(),
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload,
            ] {
                reply.push_back(frame);
            }
            if router.send(reply).await.is_err() {
                break;
            }
        }
        let mut end = ZmqMessage::from(id.clone());
        for frame in [
            Bytes::new(),
            Bytes::new(),
            Bytes::from_static(&END_SEQ),
            Bytes::new(),
        ] {
            end.push_back(frame);
        }
        let _ = router.send(end).await;
    }
}

async fn next_update(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an update within the wait")
        .expect("subscriber still running")
}

async fn expect_batch(rx: &mut mpsc::Receiver<Update>, seq: u64) {
    match next_update(rx).await {
        Update::Batch(batch) => {
            assert_eq!(batch.seq, seq);
            assert_eq!(
                batch.events,
                vec![KvEvent::Stored {
                    hashes: vec![EngineHash(1000 + seq)],
                    parent: None,
                    token_ids: vec![seq as u32],
                    block_size: 1,
                    lora_name: None,
                    medium: Some("GPU".into()),
                }]
            );
        }
        other => panic!("expected batch {seq}, got {other:?}"),
    }
}

async fn expect_resync(rx: &mut mpsc::Receiver<Update>, needle: &str) {
    match next_update(rx).await {
        Update::Resync { reason } => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            )
        }
        other => panic!("expected a resync ({needle}), got {other:?}"),
    }
}

/// Publishes `start, start+1, ...` until the subscriber sees one (PUB drops everything
/// before the subscription arrives), then drains to the last published; returns the next seq.
async fn warm_up(engine: &mut FakeEngine, rx: &mut mpsc::Receiver<Update>, start: u64) -> u64 {
    let mut seq = start;
    let deadline = Instant::now() + WAIT;
    let first = loop {
        assert!(Instant::now() < deadline, "subscriber never saw a batch");
        engine.publish(seq, true).await;
        seq += 1;
        match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            Ok(Some(Update::Batch(batch))) => break batch.seq,
            Ok(other) => panic!("expected the first batch, got {other:?}"),
            Err(_) => {}
        }
    };
    for s in first + 1..seq {
        expect_batch(rx, s).await;
    }
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_fills_gaps_by_replay_and_resyncs_on_engine_restart() {
    let (mut engine, endpoint, replay) = FakeEngine::start(true).await;
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(subscribe(endpoint, String::new(), replay, tx));

    let next = warm_up(&mut engine, &mut rx, 0).await;

    // Two batches never reach the subscriber; replay fills them in order, no resync.
    engine.publish(next, false).await;
    engine.publish(next + 1, false).await;
    engine.publish(next + 2, true).await;
    for seq in next..next + 3 {
        expect_batch(&mut rx, seq).await;
    }

    // The engine restarts: its buffer is new and it counts from 0.
    engine.buffer.lock().expect("buffer lock").clear();
    engine.publish(0, true).await;
    expect_resync(&mut rx, "restarted").await;
    expect_batch(&mut rx, 0).await;

    // A gap the replay buffer cannot fill (batches 1 and 2 were never buffered).
    engine.publish(3, true).await;
    expect_resync(&mut rx, "replay").await;
    expect_batch(&mut rx, 3).await;
    engine.publish(4, true).await;
    expect_batch(&mut rx, 4).await;

    // Closing the consumer's side stops the subscriber.
    drop(rx);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("subscriber stops once updates is closed")
        .expect("subscriber task did not panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_without_replay_resyncs_on_gap_and_on_publisher_reconnect() {
    let (mut engine, endpoint, _) = FakeEngine::start(false).await;
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(subscribe(endpoint.clone(), String::new(), None, tx));

    let next = warm_up(&mut engine, &mut rx, 100).await;
    engine.publish(next, false).await;
    engine.publish(next + 1, true).await;
    expect_resync(&mut rx, "no replay endpoint").await;
    expect_batch(&mut rx, next + 1).await;

    // The publisher goes away and comes back on the same port: one resync for the lost
    // connection, and the first batch after reconnecting is a starting point, not a gap.
    let errors = engine.publisher.close().await;
    assert!(errors.is_empty(), "closing PUB: {errors:?}");
    expect_resync(&mut rx, "connection").await;
    let mut publisher = PubSocket::new();
    publisher.bind(&endpoint).await.expect("rebind PUB");
    let mut engine = FakeEngine {
        publisher,
        buffer: Arc::new(Mutex::new(Vec::new())),
    };
    let next = warm_up(&mut engine, &mut rx, 5000).await;
    engine.publish(next, true).await;
    expect_batch(&mut rx, next).await;

    drop(rx);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("subscriber stops once updates is closed")
        .expect("subscriber task did not panic");
}
