//! One RC queue pair: connecting it, posting one-sided READs and WRITEs in rounds, and waiting
//! for their completions.

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;
use std::os::raw::c_void;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use tokio::io::unix::AsyncFd;

use crate::rdma::verbs::device::{Device, PORT};
use crate::rdma::verbs::error::{VerbsError, check, last_os};
use crate::rdma::{QpEndpoint, RemoteRegion, WorkRequest, completion_outcome};

/// Work requests in flight per queue pair; a longer plan is posted in rounds of this many.
const DEPTH: u32 = 128;

/// How long a waiter polls before it sleeps on the completion channel.
const SPIN: Duration = Duration::from_micros(20);

/// Which one-sided operation a transfer posts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Remote memory into local buffers.
    Read,
    /// Local buffers into remote memory.
    Write,
}

/// The completion channel's descriptor, for tokio.
struct ChannelFd(RawFd);

impl std::os::fd::AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One RC queue pair with its own completion queue and channel.
pub struct Link {
    device: Arc<Device>,
    channel: *mut ffi::ibv_comp_channel,
    cq: *mut ffi::ibv_cq,
    qp: *mut ffi::ibv_qp,
    fd: Option<AsyncFd<ChannelFd>>,
    psn: u32,
    next_wr: u64,
    broken: bool,
}

// SAFETY: the link is used by one task at a time (`&mut self` for every transfer); the verbs
// objects it owns may move between threads.
unsafe impl Send for Link {}
unsafe impl Sync for Link {}

impl Link {
    /// Creates a queue pair in the INIT state. Must run inside a tokio runtime (the completion
    /// channel is registered with its reactor).
    pub fn new(device: &Arc<Device>) -> Result<Link, VerbsError> {
        let mut link = Link {
            device: Arc::clone(device),
            channel: ptr::null_mut(),
            cq: ptr::null_mut(),
            qp: ptr::null_mut(),
            fd: None,
            psn: initial_psn(),
            next_wr: 1,
            broken: false,
        };
        // SAFETY: plain FFI on live handles; `Drop` frees whatever was created.
        unsafe {
            link.channel = ffi::ibv_create_comp_channel(device.ctx);
            if link.channel.is_null() {
                return Err(last_os("ibv_create_comp_channel"));
            }
            let fd = (*link.channel).fd;
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(last_os("fcntl(O_NONBLOCK) on the completion channel"));
            }
            link.cq = ffi::ibv_create_cq(
                device.ctx,
                DEPTH as i32 * 2,
                ptr::null_mut(),
                link.channel,
                0,
            );
            if link.cq.is_null() {
                return Err(last_os("ibv_create_cq"));
            }
            let mut init = ffi::ibv_qp_init_attr {
                send_cq: link.cq,
                recv_cq: link.cq,
                cap: ffi::ibv_qp_cap {
                    max_send_wr: DEPTH,
                    max_recv_wr: 1,
                    max_send_sge: device.max_sge as u32,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
                qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
                sq_sig_all: 0,
                ..Default::default()
            };
            link.qp = ffi::ibv_create_qp(device.pd, &mut init);
            if link.qp.is_null() {
                return Err(last_os("ibv_create_qp"));
            }
            let mut attr = ffi::ibv_qp_attr {
                qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
                pkey_index: 0,
                port_num: PORT,
                qp_access_flags: (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                    .0,
                ..Default::default()
            };
            let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
                | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ffi::ibv_qp_attr_mask::IBV_QP_PORT
                | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
            check(
                "ibv_modify_qp(INIT)",
                ffi::ibv_modify_qp(link.qp, &mut attr, mask.0 as i32),
            )?;
            // The channel (and so its descriptor) outlives the AsyncFd: `Drop` clears the
            // AsyncFd first.
            let registered =
                AsyncFd::register_with_interest(ChannelFd(fd), tokio::io::Interest::READABLE);
            link.fd = Some(registered.map_err(|e| VerbsError::Call {
                call: "registering the completion channel with tokio",
                source: e.into_parts().1,
            })?);
        }
        Ok(link)
    }

    /// This end, to send to the peer over the control connection.
    pub fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            // SAFETY: `qp` is live.
            qpn: unsafe { (*self.qp).qp_num },
            psn: self.psn,
            lid: self.device.lid,
            gid: self.device.gid,
            mtu: self.device.mtu,
        }
    }

    /// Moves the queue pair to ready-to-send against the peer's endpoint.
    pub fn connect(&mut self, remote: &QpEndpoint) -> Result<(), VerbsError> {
        let global = remote.gid != [0; 16];
        let mut grh = ffi::ibv_global_route {
            dgid: ffi::ibv_gid { raw: remote.gid },
            flow_label: 0,
            sgid_index: self.device.gid_index,
            hop_limit: 64,
            traffic_class: 0,
        };
        if !global {
            grh.hop_limit = 0;
        }
        let mut rtr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: remote.mtu.min(self.device.mtu) as ffi::ibv_mtu,
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: self.device.max_rd_atomic,
            min_rnr_timer: 12,
            ah_attr: ffi::ibv_ah_attr {
                grh,
                dlid: remote.lid,
                sl: 0,
                src_path_bits: 0,
                static_rate: 0,
                is_global: global as u8,
                port_num: PORT,
            },
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_AV
            | ffi::ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ffi::ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ffi::ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ffi::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        // SAFETY: `qp` is live; the attribute struct is fully initialised.
        check("ibv_modify_qp(RTR)", unsafe {
            ffi::ibv_modify_qp(self.qp, &mut rtr, mask.0 as i32)
        })?;
        let mut rts = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: self.psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: self.device.max_rd_atomic,
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ffi::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ffi::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        // SAFETY: as above.
        check("ibv_modify_qp(RTS)", unsafe {
            ffi::ibv_modify_qp(self.qp, &mut rts, mask.0 as i32)
        })
    }

    /// Runs `plan` (from [`crate::rdma::scatter_plan`], each piece carrying its lkey) against
    /// `remote`, whose bounds every request is checked against first. Returns when every
    /// request completed, or with the first failure.
    ///
    /// # Safety
    /// Every local piece must lie in memory registered with this device (its `lkey`) that
    /// stays valid, and for reads unaliased, until this returns.
    pub async unsafe fn transfer(
        &mut self,
        direction: Direction,
        plan: &[WorkRequest],
        remote: &RemoteRegion,
        timeout: Duration,
    ) -> Result<(), VerbsError> {
        if self.broken {
            return Err(VerbsError::Broken);
        }
        for wr in plan {
            if !remote.covers(wr.remote_offset, wr.len()) {
                return Err(VerbsError::Invalid(format!(
                    "{} bytes at offset {} lie outside the peer's {}-byte region",
                    wr.len(),
                    wr.remote_offset,
                    remote.len
                )));
            }
        }
        let deadline = Instant::now() + timeout;
        let result: Result<(), VerbsError> = async {
            for round in plan.chunks(DEPTH as usize) {
                let last = self.post(direction, round, remote)?;
                self.wait_for(last, deadline, timeout).await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = &result
            && e.breaks_link()
        {
            self.broken = true;
        }
        result
    }

    /// The provider's fast-path verbs (post, poll, arm): the inline functions of verbs.h call
    /// them through the context, which bindgen cannot wrap.
    fn ops(&self) -> &ffi::ibv_context_ops {
        // SAFETY: the device's context outlives the link (the link holds the device).
        unsafe { &(*self.device.ctx).ops }
    }

    /// Posts one round as a chain, only its last request signaled (RC completes in order);
    /// returns that request's id.
    fn post(
        &mut self,
        direction: Direction,
        round: &[WorkRequest],
        remote: &RemoteRegion,
    ) -> Result<u64, VerbsError> {
        let mut sges: Vec<Vec<ffi::ibv_sge>> = round
            .iter()
            .map(|wr| {
                wr.sges
                    .iter()
                    .map(|s| ffi::ibv_sge {
                        addr: s.addr,
                        length: s.len,
                        lkey: s.lkey,
                    })
                    .collect()
            })
            .collect();
        let opcode = match direction {
            Direction::Read => ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
            Direction::Write => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        };
        let mut wrs: Vec<ffi::ibv_send_wr> = Vec::with_capacity(round.len());
        for (wr, list) in round.iter().zip(sges.iter_mut()) {
            let mut w = ffi::ibv_send_wr {
                wr_id: self.next_wr,
                sg_list: list.as_mut_ptr(),
                num_sge: list.len() as i32,
                opcode,
                ..Default::default()
            };
            w.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: remote.addr + wr.remote_offset,
                rkey: remote.rkey,
            };
            self.next_wr += 1;
            wrs.push(w);
        }
        let n = wrs.len();
        for i in 0..n.saturating_sub(1) {
            let next: *mut ffi::ibv_send_wr = &mut wrs[i + 1];
            wrs[i].next = next;
        }
        let Some(last) = wrs.last_mut() else {
            return Ok(0);
        };
        last.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        let last_id = last.wr_id;
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        let post = self
            .ops()
            .post_send
            .expect("every verbs provider implements post_send");
        // SAFETY: `qp` is live; the chain and its scatter lists outlive the call (the device
        // copies work requests when they are posted).
        let rc = unsafe { post(self.qp, wrs.as_mut_ptr(), &mut bad) };
        check("ibv_post_send", rc)?;
        Ok(last_id)
    }

    /// Waits until the request `wr_id` completes: a short spin, then sleep on the channel.
    async fn wait_for(
        &mut self,
        wr_id: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), VerbsError> {
        if wr_id == 0 {
            return Ok(());
        }
        let spin_until = Instant::now() + SPIN;
        loop {
            if self.poll(wr_id)? {
                return Ok(());
            }
            if Instant::now() < spin_until {
                std::hint::spin_loop();
                continue;
            }
            // Arm, then poll once more: a completion that landed before arming sends no event.
            let notify = self
                .ops()
                .req_notify_cq
                .expect("every verbs provider implements req_notify_cq");
            // SAFETY: `cq` is live.
            check("ibv_req_notify_cq", unsafe { notify(self.cq, 0) })?;
            if self.poll(wr_id)? {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let fd = self.fd.as_ref().expect("set in new");
            let mut ready = match tokio::time::timeout(left, fd.readable()).await {
                Ok(r) => r.map_err(|source| VerbsError::Call {
                    call: "waiting on the completion channel",
                    source,
                })?,
                Err(_) => return Err(VerbsError::Timeout(timeout)),
            };
            let mut cq: *mut ffi::ibv_cq = ptr::null_mut();
            let mut cq_ctx: *mut c_void = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking.
            let rc = unsafe { ffi::ibv_get_cq_event(self.channel, &mut cq, &mut cq_ctx) };
            if rc == 0 {
                // SAFETY: one event taken from our own queue, acknowledged once.
                unsafe { ffi::ibv_ack_cq_events(cq, 1) };
            } else {
                ready.clear_ready();
            }
        }
    }

    /// Drains the completion queue; true once `wr_id` is among what completed. Any error
    /// status fails the transfer.
    fn poll(&mut self, wr_id: u64) -> Result<bool, VerbsError> {
        // SAFETY: `ibv_wc` is plain data; all-zero is a valid value.
        let mut wcs: [ffi::ibv_wc; 16] = unsafe { std::mem::zeroed() };
        let mut seen = false;
        let poll = self
            .ops()
            .poll_cq
            .expect("every verbs provider implements poll_cq");
        loop {
            // SAFETY: `cq` is live; `wcs` has room for 16 completions.
            let n = unsafe { poll(self.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(VerbsError::Call {
                    call: "ibv_poll_cq",
                    source: io::Error::other("the completion queue failed"),
                });
            }
            for wc in &wcs[..n as usize] {
                if let Some((status, vendor)) = wc.error() {
                    // SAFETY: returns a static string for any status value.
                    let text = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(status)) }
                        .to_string_lossy()
                        .into_owned();
                    return Err(VerbsError::Transfer {
                        outcome: completion_outcome(status),
                        status: format!("{text}, vendor error {vendor:#x}"),
                    });
                }
                seen |= wc.wr_id() == wr_id;
            }
            if (n as usize) < wcs.len() {
                return Ok(seen);
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deregister from tokio before the channel (and its descriptor) goes.
        self.fd = None;
        // SAFETY: owned handles, destroyed once, queue pair before its queue before its
        // channel; every event taken was acknowledged.
        unsafe {
            if !self.qp.is_null() {
                ffi::ibv_destroy_qp(self.qp);
            }
            if !self.cq.is_null() {
                ffi::ibv_destroy_cq(self.cq);
            }
            if !self.channel.is_null() {
                ffi::ibv_destroy_comp_channel(self.channel);
            }
        }
    }
}

/// A 24-bit starting packet sequence number that differs between links.
fn initial_psn() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id().rotate_left(12)) & 0x00ff_ffff
}
