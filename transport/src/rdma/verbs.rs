//! The verbs data path (feature `rdma`), on `ibverbs-sys`: one device context and protection
//! domain per process, memory registered once, and one RC queue pair per connection whose
//! owner posts one-sided READs and WRITEs.
//!
//! Completions are taken without pinning a core: a transfer polls its completion queue for a
//! short spin (a block of a few MiB lands in well under that on a 100 Gb/s link), then arms
//! the queue's completion channel and sleeps on its file descriptor through tokio until the
//! device signals, bounded by the caller's timeout. A failed or timed-out transfer marks the
//! link broken: the caller reports misses and drops the connection, never reads half-landed
//! bytes as a hit (every get is verified against its checksums after it lands anyway).

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;
use std::os::raw::c_void;
use std::ptr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use tokio::io::unix::AsyncFd;

use super::{CompletionOutcome, QpEndpoint, RemoteRegion, WorkRequest, completion_outcome};

/// The port every queue pair uses.
const PORT: u8 = 1;
/// Work requests in flight per queue pair; a longer plan is posted in rounds of this many.
const DEPTH: u32 = 128;
/// How long a waiter polls before it sleeps on the completion channel.
const SPIN: Duration = Duration::from_micros(20);
/// GID table entry used for RoCE routing; RoCE v2 setups often need 1 or 3
/// (`KVCACHE_RDMA_GID_INDEX`).
const GID_INDEX_ENV: &str = "KVCACHE_RDMA_GID_INDEX";

/// A failure of the verbs layer.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        source: io::Error,
    },
    #[error("RDMA transfer failed: {outcome:?} ({status})")]
    Transfer {
        outcome: CompletionOutcome,
        status: String,
    },
    #[error("RDMA transfer did not complete within {0:?}")]
    Timeout(Duration),
    #[error("the RDMA link is broken after an earlier failure")]
    Broken,
    #[error("{0}")]
    Invalid(String),
}

impl VerbsError {
    /// Whether the connection carrying this link must be dropped.
    pub fn breaks_link(&self) -> bool {
        !matches!(
            self,
            VerbsError::Transfer {
                outcome: CompletionOutcome::RemoteAccess,
                ..
            } | VerbsError::Invalid(_)
        )
    }
}

fn last_os(call: &'static str) -> VerbsError {
    VerbsError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Calls that return an errno value rather than setting `errno`.
fn check(call: &'static str, rc: i32) -> Result<(), VerbsError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(VerbsError::Call {
            call,
            source: io::Error::from_raw_os_error(rc.abs()),
        })
    }
}

/// An open device: its context, one protection domain, and what its port reports.
pub struct Device {
    ctx: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    name: String,
    lid: u16,
    gid: [u8; 16],
    gid_index: u8,
    mtu: u8,
    max_sge: usize,
    max_msg: u32,
    max_rd_atomic: u8,
}

// SAFETY: verbs contexts and protection domains are thread-safe (rdma-core documents every
// verb as callable from any thread); the struct owns them and frees them once, on drop.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// Opens the first device whose port 1 is active.
    pub fn open() -> Result<Arc<Device>, VerbsError> {
        let mut n = 0i32;
        // SAFETY: plain FFI; the list is freed below, after every open (contexts outlive it).
        let list = unsafe { ffi::ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(VerbsError::NoDevice(format!(
                "listing devices: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: the library returned `n` valid device pointers.
        let devices = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
        let mut why = "the device list is empty".to_string();
        let mut found = None;
        for &dev in devices {
            // SAFETY: `dev` comes from the list; the name is a NUL-terminated string it owns.
            let name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            // SAFETY: as above.
            match unsafe { Self::open_one(dev, &name) } {
                Ok(d) => {
                    found = Some(d);
                    break;
                }
                Err(e) => why = format!("{name}: {e}"),
            }
        }
        // SAFETY: freeing the list does not close contexts opened from it.
        unsafe { ffi::ibv_free_device_list(list) };
        found.map(Arc::new).ok_or(VerbsError::NoDevice(why))
    }

    /// # Safety
    /// `dev` must come from a live device list.
    unsafe fn open_one(dev: *mut ffi::ibv_device, name: &str) -> Result<Device, VerbsError> {
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        if ctx.is_null() {
            return Err(last_os("ibv_open_device"));
        }
        // From here on `Drop` closes what is open.
        let mut d = Device {
            ctx,
            pd: ptr::null_mut(),
            name: name.to_string(),
            lid: 0,
            gid: [0; 16],
            gid_index: 0,
            mtu: 0,
            max_sge: 1,
            max_msg: 1 << 30,
            max_rd_atomic: 1,
        };
        let mut port = ffi::ibv_port_attr::default();
        check("ibv_query_port", unsafe {
            ffi::ibv_query_port(ctx, PORT, &mut port as *mut ffi::ibv_port_attr as *mut _)
        })?;
        if port.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(VerbsError::NoDevice(format!(
                "port {PORT} is not active (state {})",
                port.state
            )));
        }
        let mut attr = ffi::ibv_device_attr::default();
        check("ibv_query_device", unsafe {
            ffi::ibv_query_device(ctx, &mut attr)
        })?;
        d.gid_index = match std::env::var(GID_INDEX_ENV) {
            Ok(v) => v.parse().map_err(|_| {
                VerbsError::Invalid(format!("{GID_INDEX_ENV}={v:?} is not a GID table index"))
            })?,
            Err(_) => 0,
        };
        let mut gid = ffi::ibv_gid::default();
        check("ibv_query_gid", unsafe {
            ffi::ibv_query_gid(ctx, PORT, d.gid_index as i32, &mut gid)
        })?;
        // SAFETY: every bit pattern of the union is a valid byte array.
        d.gid = unsafe { gid.raw };
        d.lid = port.lid;
        d.mtu = port.active_mtu as u8;
        d.max_sge = attr.max_sge.clamp(1, 30) as usize;
        d.max_msg = port.max_msg_sz.max(4096);
        d.max_rd_atomic = attr.max_qp_rd_atom.clamp(1, 16) as u8;
        d.pd = unsafe { ffi::ibv_alloc_pd(ctx) };
        if d.pd.is_null() {
            return Err(last_os("ibv_alloc_pd"));
        }
        Ok(d)
    }

    /// The device's name (`mlx5_0`, `rxe0`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Scatter-gather entries per work request, and bytes per message.
    pub fn limits(&self) -> (usize, u32) {
        (self.max_sge, self.max_msg)
    }

    /// Registers `len` bytes at `addr` for local access and, as asked, remote reads or writes.
    ///
    /// # Safety
    /// The memory must stay mapped for as long as the registration lives.
    pub unsafe fn register(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        remote_read: bool,
        remote_write: bool,
    ) -> Result<Registration, VerbsError> {
        let access = access_flags(remote_read, remote_write);
        let mr = unsafe { ffi::ibv_reg_mr(self.pd, addr as *mut c_void, len, access) };
        self.registration("ibv_reg_mr", mr, addr as u64, len)
    }

    /// Registers `len` bytes at `offset` in a dmabuf (`fd`: device memory the GPU driver
    /// exported), addressed in work requests as `iova` onwards (the GPU virtual address, so
    /// segments name device memory as they name host memory). The registration holds its own
    /// reference to the dmabuf; `fd` may be closed afterwards.
    ///
    /// # Safety
    /// The exported memory must stay allocated for as long as the registration lives.
    pub unsafe fn register_dmabuf(
        self: &Arc<Self>,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
        iova: u64,
        remote_read: bool,
        remote_write: bool,
    ) -> Result<Registration, VerbsError> {
        use std::os::fd::AsRawFd;
        let access = access_flags(remote_read, remote_write);
        // SAFETY: upheld by the caller; the library validates the range against the dmabuf.
        let mr =
            unsafe { ffi::ibv_reg_dmabuf_mr(self.pd, offset, len, iova, fd.as_raw_fd(), access) };
        self.registration("ibv_reg_dmabuf_mr", mr, iova, len)
    }

    fn registration(
        self: &Arc<Self>,
        call: &'static str,
        mr: *mut ffi::ibv_mr,
        addr: u64,
        len: usize,
    ) -> Result<Registration, VerbsError> {
        if mr.is_null() {
            return Err(last_os(call));
        }
        Ok(Registration {
            _device: Arc::clone(self),
            mr,
            addr,
            len: len as u64,
        })
    }
}

/// Local write access (a READ lands here), plus the remote access asked for.
fn access_flags(remote_read: bool, remote_write: bool) -> i32 {
    let mut access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
    if remote_read {
        access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
    }
    if remote_write {
        access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
    }
    access.0 as i32
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: owned handles, freed once; registrations and links hold an Arc, so none
        // outlives this.
        unsafe {
            if !self.pd.is_null() {
                ffi::ibv_dealloc_pd(self.pd);
            }
            ffi::ibv_close_device(self.ctx);
        }
    }
}

/// A registered memory region; deregistered on drop.
pub struct Registration {
    _device: Arc<Device>,
    mr: *mut ffi::ibv_mr,
    addr: u64,
    len: u64,
}

// SAFETY: a memory registration is an immutable handle once created.
unsafe impl Send for Registration {}
unsafe impl Sync for Registration {}

impl Registration {
    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is live for `self`'s lifetime.
        unsafe { (*self.mr).lkey }
    }

    /// What the other side needs to read or write this memory.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.addr,
            // SAFETY: as above.
            rkey: unsafe { (*self.mr).rkey },
            len: self.len,
        }
    }

    /// Whether `[addr, addr + len)` lies inside this registration.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|e| e <= self.addr + self.len)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once.
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::from_raw_os_error(rc), "ibv_dereg_mr failed");
        }
    }
}

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

    /// Runs `plan` (from [`super::scatter_plan`], each piece carrying its lkey) against
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
