//! The device: its context, one protection domain, what its port reports, and memory
//! registered with it.

use std::ffi::CStr;
use std::io;
use std::os::raw::c_void;
use std::ptr;
use std::sync::Arc;

use ibverbs_sys as ffi;

use crate::rdma::RemoteRegion;
use crate::rdma::verbs::error::{VerbsError, check, last_os};

/// The port every queue pair uses.
pub(super) const PORT: u8 = 1;

/// GID table entry used for RoCE routing; RoCE v2 setups often need 1 or 3
/// (`KVCACHE_RDMA_GID_INDEX`).
const GID_INDEX_ENV: &str = "KVCACHE_RDMA_GID_INDEX";

/// An open device: its context, one protection domain, and what its port reports.
pub struct Device {
    pub(super) ctx: *mut ffi::ibv_context,
    pub(super) pd: *mut ffi::ibv_pd,
    pub(super) name: String,
    pub(super) lid: u16,
    pub(super) gid: [u8; 16],
    pub(super) gid_index: u8,
    pub(super) mtu: u8,
    pub(super) max_sge: usize,
    pub(super) max_msg: u32,
    pub(super) max_rd_atomic: u8,
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
pub(super) fn access_flags(remote_read: bool, remote_write: bool) -> i32 {
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
