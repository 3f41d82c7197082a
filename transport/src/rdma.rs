//! RDMA: the parts that need no device, compiled in every build and unit-tested here, and the
//! device probe behind the cargo feature `rdma` (Debian's `libibverbs-dev`, through `ibverbs`).
//!
//! The plan (docs/ARCHITECTURE.md, "RDMA"): a client and a node that both have a device set up
//! one RC queue pair per connection by exchanging [`QpEndpoint`]s over the existing TCP control
//! connection; the node's pool and the client's buffers are registered once; a get becomes RDMA
//! READs from the leased locations and a put RDMA WRITEs into the allocated ones, each block
//! split into work requests by [`scatter_plan`]; completions map to outcomes by
//! [`completion_outcome`], and any failure is a miss, never wrong bytes.
//!
//! The verbs themselves ([`verbs`], feature `rdma`) sit on `ibverbs-sys`, the bindings of the
//! maintained `ibverbs` project, generated against Debian's rdma-core headers. Not on the
//! `ibverbs` crate: it registers only memory it allocates itself and wraps only two-sided
//! SEND/RECV, while we register the node's existing pool and post one-sided READ/WRITE. Not
//! on `rdma-sys`: the same kind of raw bindings, last released in 2023.

use std::fmt;

pub mod gpudirect;
#[cfg(feature = "rdma")]
pub mod verbs;

/// What this process can do with RDMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// A device is present and opens.
    Device { name: String },
    /// Built with the `rdma` feature, but no usable device (the reason says which).
    NoDevice(String),
    /// Built without the `rdma` feature.
    NotBuilt,
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Availability::Device { name } => write!(f, "RDMA device {name}"),
            Availability::NoDevice(why) => write!(f, "no RDMA device ({why})"),
            Availability::NotBuilt => f.write_str("built without the `rdma` feature"),
        }
    }
}

/// Finds the first RDMA device that opens with an active port.
#[cfg(feature = "rdma")]
pub fn probe() -> Availability {
    match verbs::Device::open() {
        Ok(dev) => Availability::Device {
            name: dev.name().to_string(),
        },
        Err(verbs::VerbsError::NoDevice(why)) => Availability::NoDevice(why),
        Err(e) => Availability::NoDevice(e.to_string()),
    }
}

/// Without the `rdma` feature there is never a device.
#[cfg(not(feature = "rdma"))]
pub fn probe() -> Availability {
    Availability::NotBuilt
}

/// Which transfer a client and a node settle on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    Rdma,
    /// Shared memory or TCP, with the one log line that says why.
    Fallback(String),
}

/// The client's side of the negotiation: RDMA only when both ends have a device and the
/// client did not turn it off; otherwise the reason for the fallback, naming the side.
pub fn negotiate(wanted: bool, client: &Availability, node_offers: Option<&str>) -> Choice {
    if !wanted {
        return Choice::Fallback("RDMA turned off in the client's settings".into());
    }
    match (client, node_offers) {
        (Availability::Device { .. }, Some(_)) => Choice::Rdma,
        (Availability::Device { .. }, None) => {
            Choice::Fallback("the node has no RDMA device; using shared memory or TCP".into())
        }
        (local, _) => Choice::Fallback(format!("this host: {local}; using shared memory or TCP")),
    }
}

/// One end of an RC queue pair, as exchanged over the TCP control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpEndpoint {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    /// The port's GID (RoCE needs it; InfiniBand may leave it zero).
    pub gid: [u8; 16],
    /// Path MTU as the verbs enum (1 = 256 ... 5 = 4096).
    pub mtu: u8,
}

/// A registered memory region the other side may access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

/// A message that does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RdmaError {
    #[error("RDMA handshake: {what} is {got} bytes, expected {want}")]
    BadLength {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("RDMA handshake: {0}")]
    Invalid(String),
}

impl QpEndpoint {
    pub const LEN: usize = 4 + 4 + 2 + 16 + 1;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&self.qpn.to_le_bytes());
        b[4..8].copy_from_slice(&self.psn.to_le_bytes());
        b[8..10].copy_from_slice(&self.lid.to_le_bytes());
        b[10..26].copy_from_slice(&self.gid);
        b[26] = self.mtu;
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, RdmaError> {
        let b: &[u8; Self::LEN] = exactly(b, "a queue-pair endpoint")?;
        let ep = Self {
            qpn: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")),
            psn: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            lid: u16::from_le_bytes(b[8..10].try_into().expect("2 bytes")),
            gid: b[10..26].try_into().expect("16 bytes"),
            mtu: b[26],
        };
        if ep.qpn == 0 || ep.qpn >= 1 << 24 || ep.psn >= 1 << 24 {
            return Err(RdmaError::Invalid(format!(
                "queue pair number {} or PSN {} out of the 24-bit range",
                ep.qpn, ep.psn
            )));
        }
        if !(1..=5).contains(&ep.mtu) {
            return Err(RdmaError::Invalid(format!(
                "path MTU code {} (1..=5)",
                ep.mtu
            )));
        }
        Ok(ep)
    }
}

/// `b` as exactly `N` bytes, or the error naming `what` was malformed.
fn exactly<'a, const N: usize>(b: &'a [u8], what: &'static str) -> Result<&'a [u8; N], RdmaError> {
    b.try_into().map_err(|_| RdmaError::BadLength {
        what,
        got: b.len(),
        want: N,
    })
}

impl RemoteRegion {
    pub const LEN: usize = 8 + 8 + 4;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, RdmaError> {
        let b: &[u8; Self::LEN] = exactly(b, "a remote region")?;
        let r = Self {
            addr: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            len: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            rkey: u32::from_le_bytes(b[16..].try_into().expect("4 bytes")),
        };
        if r.addr.checked_add(r.len).is_none() {
            return Err(RdmaError::Invalid("region wraps the address space".into()));
        }
        Ok(r)
    }

    /// Whether `[offset, offset + len)` lies inside the region: checked before any work
    /// request names remote memory, so a bad offset from a peer is refused, not sent.
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }
}

/// A local piece of a transfer: `len` bytes at `addr`, in the registration `lkey` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// One work request: a contiguous remote range to or from up to `max_sge` local pieces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkRequest {
    pub remote_offset: u64,
    pub sges: Vec<Sge>,
}

impl WorkRequest {
    pub fn len(&self) -> u64 {
        self.sges.iter().map(|s| s.len as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.sges.is_empty()
    }
}

/// Splits one block that lies contiguously at `remote_offset` into work requests over the
/// local `segments`, each `(addr, len, lkey)` (a block lands in its many KV segments, each
/// in whichever registration holds it): each request carries at most
/// `max_sge` pieces and `max_msg` bytes; a segment larger than that is split. Empty segments
/// are skipped.
pub fn scatter_plan(
    remote_offset: u64,
    segments: &[(u64, u64, u32)],
    max_sge: usize,
    max_msg: u32,
) -> Result<Vec<WorkRequest>, RdmaError> {
    if max_sge == 0 || max_msg == 0 {
        return Err(RdmaError::Invalid(
            "max_sge and max_msg must be positive".into(),
        ));
    }
    let mut out: Vec<WorkRequest> = Vec::new();
    let mut offset = remote_offset;
    let mut current = WorkRequest {
        remote_offset: offset,
        sges: Vec::new(),
    };
    let mut current_len = 0u64;
    for &(addr, len, lkey) in segments {
        let mut done = 0u64;
        while done < len {
            let room = max_msg as u64 - current_len;
            let piece = (len - done).min(room);
            current.sges.push(Sge {
                addr: addr + done,
                len: piece as u32,
                lkey,
            });
            (done, current_len, offset) = (done + piece, current_len + piece, offset + piece);
            if current.sges.len() == max_sge || current_len == max_msg as u64 {
                out.push(std::mem::replace(
                    &mut current,
                    WorkRequest {
                        remote_offset: offset,
                        sges: Vec::new(),
                    },
                ));
                current_len = 0;
            }
        }
    }
    if !current.sges.is_empty() {
        out.push(current);
    }
    Ok(out)
}

/// What a work completion means for the block it moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionOutcome {
    Done,
    /// The node is unreachable or the queue pair broke: this block is a miss, and the
    /// connection is dropped (the client falls back until it reconnects).
    ConnectionLost,
    /// The remote memory was not accessible (lease revoked, region gone): a miss; the
    /// connection stays.
    RemoteAccess,
    /// A local error (bad registration, a bug): a miss, logged loudly; the connection is
    /// dropped to be safe.
    Local,
}

/// Maps a verbs work-completion status (`enum ibv_wc_status`) to an outcome.
pub fn completion_outcome(status: u32) -> CompletionOutcome {
    // Values from <infiniband/verbs.h>; stable across rdma-core releases.
    match status {
        0 => CompletionOutcome::Done,                     // IBV_WC_SUCCESS
        10 | 11 => CompletionOutcome::RemoteAccess,       // REM_ACCESS_ERR, REM_OP_ERR
        5 | 12 | 13 => CompletionOutcome::ConnectionLost, // WR_FLUSH_ERR, RETRY_EXC_ERR, RNR_RETRY_EXC_ERR
        9 => CompletionOutcome::ConnectionLost,           // REM_INV_REQ_ERR
        _ => CompletionOutcome::Local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_needs_both_ends_and_says_why_it_falls_back() {
        let dev = Availability::Device {
            name: "mlx5_0".into(),
        };
        assert_eq!(negotiate(true, &dev, Some("mlx5_1")), Choice::Rdma);
        let Choice::Fallback(why) = negotiate(true, &dev, None) else {
            panic!()
        };
        assert!(why.contains("node has no RDMA device"), "{why}");
        let none = Availability::NoDevice("listing devices: ENOSYS".into());
        let Choice::Fallback(why) = negotiate(true, &none, Some("mlx5_1")) else {
            panic!()
        };
        assert!(why.contains("ENOSYS"), "{why}");
        let Choice::Fallback(why) = negotiate(false, &dev, Some("x")) else {
            panic!()
        };
        assert!(why.contains("turned off"));
        let Choice::Fallback(why) = negotiate(true, &Availability::NotBuilt, Some("x")) else {
            panic!()
        };
        assert!(why.contains("`rdma` feature"));
    }

    #[test]
    fn this_machine_reports_a_reason_when_it_has_no_device() {
        match probe() {
            Availability::Device { name } => eprintln!("RDMA device present: {name}"),
            other => assert!(!other.to_string().is_empty()),
        }
    }

    #[test]
    fn handshake_messages_round_trip_and_bad_ones_are_refused() {
        let ep = QpEndpoint {
            qpn: 0x1234,
            psn: 0xabcdef,
            lid: 7,
            gid: [9; 16],
            mtu: 5,
        };
        assert_eq!(QpEndpoint::decode(&ep.encode()), Ok(ep));
        assert!(matches!(
            QpEndpoint::decode(&ep.encode()[..20]),
            Err(RdmaError::BadLength { got: 20, .. })
        ));
        let mut bad = ep.encode();
        bad[26] = 9;
        assert!(QpEndpoint::decode(&bad).is_err(), "MTU code out of range");
        let mut bad = ep.encode();
        bad[..4].copy_from_slice(&(1u32 << 24).to_le_bytes());
        assert!(QpEndpoint::decode(&bad).is_err(), "QPN beyond 24 bits");

        let r = RemoteRegion {
            addr: 0x7f00_0000_0000,
            len: 1 << 30,
            rkey: 42,
        };
        assert_eq!(RemoteRegion::decode(&r.encode()), Ok(r));
        assert!(r.covers(0, 1 << 30) && !r.covers(1, 1 << 30) && !r.covers(u64::MAX, 2));
        let wraps = RemoteRegion {
            addr: u64::MAX,
            len: 2,
            rkey: 1,
        };
        assert!(RemoteRegion::decode(&wraps.encode()).is_err());
    }

    #[test]
    fn a_block_is_split_into_work_requests_that_cover_every_segment_in_order() {
        // A block of 4 KV segments (K and V of two heads), 3 of 4096 bytes and one of 10000.
        // Each segment in its own registration (lkey 1..=5).
        let segs = [
            (0x1000, 4096, 1),
            (0x9000, 4096, 2),
            (0x20000, 0, 3),
            (0x30000, 10000, 4),
            (0x50000, 4096, 5),
        ];
        let plan = scatter_plan(1 << 20, &segs, 2, 8192).unwrap();
        // Every byte once, in order, remote offsets contiguous.
        let mut offset = 1 << 20;
        let mut flat = Vec::new();
        for wr in &plan {
            assert_eq!(wr.remote_offset, offset);
            assert!(wr.sges.len() <= 2 && wr.len() <= 8192, "{wr:?}");
            offset += wr.len();
            flat.extend(wr.sges.iter().map(|s| (s.addr, s.len as u64, s.lkey)));
        }
        assert_eq!(offset - (1 << 20), 4096 * 3 + 10000);
        let mut merged: Vec<(u64, u64, u32)> = Vec::new();
        for (a, l, k) in flat {
            match merged.last_mut() {
                Some((pa, pl, pk)) if *pa + *pl == a && *pk == k => *pl += l,
                _ => merged.push((a, l, k)),
            }
        }
        let nonempty: Vec<(u64, u64, u32)> = segs.iter().copied().filter(|s| s.1 > 0).collect();
        assert_eq!(merged, nonempty);
        assert!(scatter_plan(0, &segs, 0, 1).is_err());
        assert_eq!(scatter_plan(0, &[], 4, 4096).unwrap(), vec![]);
    }

    #[test]
    fn completion_errors_become_misses_of_the_right_kind() {
        assert_eq!(completion_outcome(0), CompletionOutcome::Done);
        assert_eq!(completion_outcome(12), CompletionOutcome::ConnectionLost);
        assert_eq!(completion_outcome(5), CompletionOutcome::ConnectionLost);
        assert_eq!(completion_outcome(10), CompletionOutcome::RemoteAccess);
        assert_eq!(completion_outcome(4), CompletionOutcome::Local);
    }
}
