//! NCCL all-reduce for CUDA ranks, through `cudarc`'s raw bindings with the library loaded at run
//! time (builds need no CUDA; a machine without a GPU gets errors, never a panic).
//!
//! Design and invariants:
//! - Rank 0 makes the 128-byte id with [`unique_id`]; the coordinator's rendezvous hands it to the
//!   other ranks of the same attempt; every rank calls [`NcclCollective::connect`].
//! - The communicator is non-blocking (`ncclCommInitRankConfig` with `blocking = 0`): init and
//!   every all-reduce return at once and this rank polls `ncclCommGetAsyncError` (and, for an
//!   all-reduce, a CUDA event behind it) until done, an error, or the deadline. NCCL has no
//!   timeouts of its own, so without this a dead peer would hang the kernels forever. On an error
//!   or the deadline the communicator is aborted (`ncclCommAbort`) and the collective refuses
//!   every later call: the attempt is over, the coordinator restarts it.
//! - The all-reduce runs on libtorch's current CUDA stream for the device (from the C shim
//!   `aoti_torch_get_current_cuda_stream` that `libtorch_cuda.so` exports), so it is ordered after
//!   the kernels that computed the buffer and before those that read it, with no extra device
//!   synchronisation. The host does wait for the all-reduce (an event recorded after it, polled):
//!   that wait is what enforces the deadline. It costs the CPU/GPU overlap across the call (the
//!   host cannot queue the next kernels while the all-reduce runs), a small price next to the
//!   transfer itself for buckets of tens of MB. The deadline of an all-reduce counts from the call,
//!   so it also covers kernels still queued before it on the stream (the backward pass the host
//!   has run ahead of): choose it well above a step's time.
//! - Nothing from cudarc's driver or NCCL is called before [`available`]-style checks pass: the
//!   dynamically loaded bindings panic when their library is missing. `libnccl.so` must be on the
//!   search path (cudarc never looks for the wheel's `libnccl.so.2`; `build.rs` makes the link).
//! - NCCL's own error type prints as "NcclError": errors here carry the numeric code, NCCL's
//!   description of it and `ncclGetLastError`.

use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::Collective;
use crate::{Error, Result};

/// Longest pause between two polls of a pending operation.
const MAX_POLL: Duration = Duration::from_millis(1);
/// How long `Drop` lets a healthy communicator finalise before aborting it.
const FINALIZE_DEADLINE: Duration = Duration::from_secs(10);

#[allow(unsafe_code)]
mod ffi {
    //! The raw NCCL, CUDA driver and libtorch calls, each behind a safe function. Callers check
    //! that the libraries are loadable first ([`nccl_loadable`], `tch::Cuda::is_available`).

    use std::ffi::{CStr, c_char, c_void};

    use cudarc::driver::{result as cu, sys as cusys};
    use cudarc::nccl::sys as nc;

    pub use nc::{ncclDataType_t as DataType, ncclResult_t as Code};

    /// Whether `libnccl.so` can be loaded (never panics, unlike the bindings themselves).
    pub fn nccl_loadable() -> bool {
        // SAFETY: only tries to dlopen the candidate names; loading NCCL runs no user code.
        unsafe { nc::is_culib_present() }
    }

    /// Whether the CUDA driver library can be loaded.
    pub fn driver_loadable() -> bool {
        // SAFETY: as above, for libcuda.
        unsafe { cusys::is_culib_present() }
    }

    /// NCCL's one-line description of a result code.
    pub fn error_string(code: Code) -> String {
        // SAFETY: NCCL returns a static NUL-terminated string for every code (or null).
        let text = unsafe { nc::ncclGetErrorString(code) };
        c_string(text).unwrap_or_else(|| "no description".into())
    }

    fn c_string(text: *const c_char) -> Option<String> {
        // SAFETY: `text` is null or a NUL-terminated string owned by NCCL, read at once.
        (!text.is_null()).then(|| {
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        })
    }

    /// `ncclGetUniqueId` as raw bytes.
    pub fn unique_id() -> Result<[u8; 128], Code> {
        let mut id = nc::ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid, writable ncclUniqueId.
        let code = unsafe { nc::ncclGetUniqueId(&mut id) };
        match code {
            Code::ncclSuccess => Ok(id.internal.map(|b| b as u8)),
            other => Err(other),
        }
    }

    /// A communicator handle. NCCL allows using a communicator from any thread as long as calls
    /// on it do not overlap, which `&mut self` on the owner guarantees.
    #[derive(Debug)]
    pub struct Comm(nc::ncclComm_t);

    // SAFETY: see the type's documentation; the handle is only used through `&`/`&mut` of its
    // single owner.
    unsafe impl Send for Comm {}

    impl Comm {
        /// Starts `ncclCommInitRankConfig` in non-blocking mode. Returns the handle (when NCCL
        /// made one) and the call's result (`ncclInProgress` while init continues).
        pub fn init_nonblocking(world: i32, id: &[u8; 128], rank: i32) -> (Option<Self>, Code) {
            let mut config = config_nonblocking();
            let id = nc::ncclUniqueId {
                internal: id.map(|b| b as c_char),
            };
            let mut comm: nc::ncclComm_t = std::ptr::null_mut();
            // SAFETY: `comm` and `config` are valid for writes; `config` is initialised exactly
            // as NCCL_CONFIG_INITIALIZER does for the NCCL 2.29 layout cudarc was built with.
            let code =
                unsafe { nc::ncclCommInitRankConfig(&mut comm, world, id, rank, &mut config) };
            ((!comm.is_null()).then_some(Self(comm)), code)
        }

        /// `ncclCommGetAsyncError`: `ncclInProgress` while a non-blocking operation continues,
        /// `ncclSuccess` when idle and healthy, the error otherwise.
        pub fn async_error(&self) -> Code {
            let mut state = Code::ncclInProgress;
            // SAFETY: `self.0` is a live communicator (never used after abort/destroy).
            let code = unsafe { nc::ncclCommGetAsyncError(self.0, &mut state) };
            if code == Code::ncclSuccess {
                state
            } else {
                code
            }
        }

        /// `ncclGetLastError` for this communicator.
        pub fn last_error(&self) -> String {
            // SAFETY: `self.0` is live; NCCL returns a string it owns.
            let text = unsafe { nc::ncclGetLastError(self.0) };
            c_string(text).unwrap_or_default()
        }

        /// Enqueues an in-place sum of `count` elements at `data` on `stream`.
        ///
        /// The caller guarantees that `data` is `count` contiguous elements of `dtype` on this
        /// communicator's device, kept alive (and not resized) until the operation completes,
        /// and that `stream` is a live stream of that device.
        pub fn all_reduce_sum_in_place(
            &self,
            data: *mut c_void,
            count: usize,
            dtype: DataType,
            stream: Stream,
        ) -> Code {
            // SAFETY: per the caller's guarantee above; in-place (send = receive buffer) is
            // supported by ncclAllReduce.
            unsafe {
                nc::ncclAllReduce(
                    data,
                    data,
                    count,
                    dtype,
                    nc::ncclRedOp_t::ncclSum,
                    self.0,
                    stream.0.cast(),
                )
            }
        }

        /// Starts `ncclCommFinalize` (non-blocking: poll [`Self::async_error`] afterwards).
        pub fn finalize(&self) -> Code {
            // SAFETY: `self.0` is live.
            unsafe { nc::ncclCommFinalize(self.0) }
        }

        /// `ncclCommDestroy`; consumes the handle.
        pub fn destroy(self) -> Code {
            // SAFETY: `self.0` is live and not used again (moved in).
            unsafe { nc::ncclCommDestroy(self.0) }
        }

        /// `ncclCommAbort`: stops pending operations and frees the communicator.
        pub fn abort(self) -> Code {
            // SAFETY: `self.0` is live and not used again (moved in).
            unsafe { nc::ncclCommAbort(self.0) }
        }
    }

    /// NCCL_CONFIG_INITIALIZER with `blocking = 0`.
    fn config_nonblocking() -> nc::ncclConfig_t {
        const UNDEF: i32 = i32::MIN;
        nc::ncclConfig_t {
            size: std::mem::size_of::<nc::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: 22907,
            blocking: 0,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: std::ptr::null(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
            graphUsageMode: UNDEF,
            numRmaCtx: UNDEF,
        }
    }

    /// A CUDA stream owned by libtorch.
    #[derive(Debug, Clone, Copy)]
    pub struct Stream(cusys::CUstream);

    /// libtorch's current stream on `device`, through the C shim of `libtorch_cuda.so` (looked up
    /// at run time, so CPU-only libtorch builds still link).
    pub fn torch_current_stream(device: i32) -> Result<Stream, String> {
        type GetStream = unsafe extern "C" fn(i32, *mut *mut c_void) -> i32;
        static GET: std::sync::OnceLock<Result<GetStream, String>> = std::sync::OnceLock::new();
        let get = GET.get_or_init(|| {
            let this = libloading::os::unix::Library::this();
            // SAFETY: the symbol, when present, has this signature (torch/csrc/inductor/
            // aoti_torch/c/shim.h: `AOTITorchError aoti_torch_get_current_cuda_stream(int32_t,
            // void**)`). The pointer is copied out: libtorch_cuda is a DT_NEEDED library of the
            // program and is never unloaded.
            unsafe { this.get::<GetStream>(b"aoti_torch_get_current_cuda_stream\0") }
                .map(|symbol| *symbol)
                .map_err(|e| format!("libtorch_cuda is not loaded ({e})"))
        });
        let get = get.clone()?;
        let mut stream: *mut c_void = std::ptr::null_mut();
        // SAFETY: `stream` is valid for writes; the shim reports failures through its result.
        let code = unsafe { get(device, &mut stream) };
        if code == 0 {
            Ok(Stream(stream.cast()))
        } else {
            Err(format!(
                "aoti_torch_get_current_cuda_stream({device}) failed with {code}"
            ))
        }
    }

    /// A CUDA driver error as text.
    pub fn driver_error(e: cu::DriverError) -> String {
        let text = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{:?} ({text})", e.0)
    }

    /// The primary context of one device (the one libtorch's runtime API uses), retained.
    #[derive(Debug)]
    pub struct Context {
        device: cusys::CUdevice,
        ctx: cusys::CUcontext,
    }

    // SAFETY: a primary context may be made current on any thread; the handle is plain data.
    unsafe impl Send for Context {}

    impl Context {
        /// Initialises the driver and retains `index`'s primary context. Only call when
        /// `tch::Cuda::is_available()` (the driver library loads).
        pub fn retain(index: i32) -> Result<Self, String> {
            cu::init().map_err(driver_error)?;
            let device = cu::device::get(index).map_err(driver_error)?;
            // SAFETY: `device` came from cuDeviceGet.
            let ctx = unsafe { cu::primary_ctx::retain(device) }.map_err(driver_error)?;
            Ok(Self { device, ctx })
        }

        /// Makes the context current on the calling thread (NCCL and the event calls need it).
        pub fn bind(&self) -> Result<(), String> {
            // SAFETY: `self.ctx` is retained until drop.
            unsafe { cu::ctx::set_current(self.ctx) }.map_err(driver_error)
        }
    }

    impl Drop for Context {
        fn drop(&mut self) {
            // SAFETY: balances the retain in `Context::retain`.
            let _ = unsafe { cu::primary_ctx::release(self.device) };
        }
    }

    /// A timing-free CUDA event, to learn when work on a stream has finished without blocking.
    #[derive(Debug)]
    pub struct Event(cusys::CUevent);

    // SAFETY: events may be recorded and queried from any thread with the context current.
    unsafe impl Send for Event {}

    impl Event {
        /// Creates an event in the current context.
        pub fn new() -> Result<Self, String> {
            cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map(Self)
                .map_err(driver_error)
        }

        /// Records the event after the work queued so far on `stream`.
        pub fn record(&self, stream: Stream) -> Result<(), String> {
            // SAFETY: the event is live; `stream` is a live stream of the same context.
            unsafe { cu::event::record(self.0, stream.0) }.map_err(driver_error)
        }

        /// `Ok(true)` once the recorded work has completed, `Ok(false)` while it has not.
        pub fn done(&self) -> Result<bool, String> {
            // SAFETY: the event is live.
            match unsafe { cu::event::query(self.0) } {
                Ok(()) => Ok(true),
                Err(cu::DriverError(cusys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
                Err(e) => Err(driver_error(e)),
            }
        }
    }

    impl Drop for Event {
        fn drop(&mut self) {
            // SAFETY: the event is live and not used again; destroying a pending event is allowed.
            let _ = unsafe { cu::event::destroy(self.0) };
        }
    }
}

/// Whether NCCL can be used here: a CUDA device visible to libtorch and `libnccl.so` loadable.
/// Never panics.
pub fn available() -> bool {
    tch::Cuda::is_available() && ffi::nccl_loadable()
}

/// 128-byte NCCL unique id, made by rank 0 and shared through the coordinator's rendezvous.
///
/// Needs `libnccl.so` but no GPU (the id names a host socket that rank 0's NCCL listens on).
pub fn unique_id() -> Result<[u8; 128]> {
    if !ffi::nccl_loadable() {
        return Err(Error::Nccl {
            rank: 0,
            world: 0,
            reason: "libnccl.so cannot be loaded: install the nvidia-nccl wheel (scripts/setup.sh) and put libnccl.so on the library path".into(),
        });
    }
    ffi::unique_id().map_err(|code| Error::Nccl {
        rank: 0,
        world: 0,
        reason: format!("ncclGetUniqueId: {}", describe(code, "")),
    })
}

/// `code N (description): last error`.
fn describe(code: ffi::Code, last_error: &str) -> String {
    let mut text = format!("NCCL code {} ({})", code as u32, ffi::error_string(code));
    if !last_error.is_empty() {
        text.push_str(": ");
        text.push_str(last_error.trim());
    }
    text
}

/// Polls until `comm` has no operation in progress and `finished()` says so, an error, or the
/// deadline (counted from `start`). Returns why it gave up; the caller aborts the communicator.
fn wait_idle(
    comm: &ffi::Comm,
    what: &str,
    start: Instant,
    deadline: Duration,
    mut finished: impl FnMut() -> std::result::Result<bool, String>,
) -> std::result::Result<(), String> {
    let mut pause = Duration::from_micros(5);
    loop {
        let failure = match comm.async_error() {
            ffi::Code::ncclSuccess => match finished() {
                Ok(true) => return Ok(()),
                Ok(false) => None,
                Err(e) => Some(e),
            },
            ffi::Code::ncclInProgress => None,
            code => Some(describe(code, &comm.last_error())),
        };
        let waited = start.elapsed().as_secs_f64();
        if let Some(reason) = failure {
            return Err(format!("{what} failed after {waited:.1} s: {reason}"));
        }
        if start.elapsed() >= deadline {
            let last = comm.last_error();
            let last = last.trim();
            return Err(format!(
                "{what}: not done within the {:.1} s deadline ({waited:.1} s waited; a peer is dead, hung or missing){}{last}",
                deadline.as_secs_f64(),
                if last.is_empty() {
                    ""
                } else {
                    "; NCCL last error: "
                },
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// One rank of an NCCL communicator; see the module documentation.
#[derive(Debug)]
pub struct NcclCollective {
    rank: usize,
    world: usize,
    device_index: usize,
    deadline: Duration,
    /// `None` once aborted or destroyed.
    comm: Option<ffi::Comm>,
    /// Marks the end of each all-reduce on the stream. Declared before `context`: dropped first.
    event: ffi::Event,
    context: ffi::Context,
    /// Why the communicator broke, once it has: later calls fail at once.
    broken: Option<String>,
}

impl NcclCollective {
    /// Joins the communicator of `world` ranks as `rank` on CUDA device `device_index`;
    /// gives up with an error after `deadline` (init is non-blocking + polled).
    pub fn connect(
        rank: usize,
        world: usize,
        id: &[u8; 128],
        device_index: usize,
        deadline: Duration,
    ) -> Result<Self> {
        let fail = |reason: String| Error::Nccl {
            rank,
            world,
            reason,
        };
        let (Ok(rank_i32), Ok(world_i32), Ok(device_i32)) = (
            i32::try_from(rank),
            i32::try_from(world),
            i32::try_from(device_index),
        ) else {
            return Err(fail("rank, world size or device index out of range".into()));
        };
        if world == 0 || rank >= world {
            return Err(Error::Input {
                name: "nccl".into(),
                reason: format!("rank {rank} of world {world}: need rank < world"),
            });
        }
        if !tch::Cuda::is_available() || !ffi::driver_loadable() {
            return Err(fail(
                "no CUDA device visible to libtorch: the NCCL backend needs a GPU (use the ring backend on CPUs)".into(),
            ));
        }
        let devices = tch::Cuda::device_count();
        if device_index as i64 >= devices {
            return Err(fail(format!(
                "CUDA device {device_index} does not exist ({devices} visible)"
            )));
        }
        if !ffi::nccl_loadable() {
            return Err(fail(
                "libnccl.so cannot be loaded: install the nvidia-nccl wheel (scripts/setup.sh) and put libnccl.so on the library path".into(),
            ));
        }
        let context = ffi::Context::retain(device_i32)
            .and_then(|c| c.bind().map(|()| c))
            .map_err(|e| fail(format!("CUDA device {device_index}: {e}")))?;
        let event = ffi::Event::new().map_err(|e| {
            fail(format!(
                "creating a CUDA event on device {device_index}: {e}"
            ))
        })?;

        let start = Instant::now();
        tracing::info!(
            rank,
            world,
            device_index,
            ?deadline,
            "joining the NCCL communicator"
        );
        let (comm, code) = ffi::Comm::init_nonblocking(world_i32, id, rank_i32);
        let mut nccl = Self {
            rank,
            world,
            device_index,
            deadline,
            comm,
            event,
            context,
            broken: None,
        };
        match code {
            ffi::Code::ncclSuccess | ffi::Code::ncclInProgress => {}
            code => {
                let last = nccl.comm.as_ref().map(ffi::Comm::last_error);
                return Err(nccl.break_with(format!(
                    "ncclCommInitRankConfig: {}",
                    describe(code, last.as_deref().unwrap_or(""))
                )));
            }
        }
        if nccl.comm.is_none() {
            return Err(nccl.break_with("ncclCommInitRankConfig returned no communicator".into()));
        }
        if let Some(comm) = &nccl.comm
            && let Err(reason) =
                wait_idle(comm, "joining the communicator", start, deadline, || {
                    Ok(true)
                })
        {
            return Err(nccl.break_with(reason));
        }
        tracing::info!(
            rank,
            world,
            device_index,
            seconds = start.elapsed().as_secs_f64(),
            "NCCL communicator ready"
        );
        Ok(nccl)
    }

    /// Records why the communicator is unusable, aborts it, and returns the error to report.
    fn break_with(&mut self, reason: String) -> Error {
        tracing::error!(
            rank = self.rank,
            world = self.world,
            device_index = self.device_index,
            %reason,
            "NCCL communicator broken; aborting it"
        );
        if let Some(comm) = self.comm.take() {
            let code = comm.abort();
            if code != ffi::Code::ncclSuccess {
                tracing::warn!(
                    code = code as u32,
                    "ncclCommAbort: {}",
                    ffi::error_string(code)
                );
            }
        }
        self.broken = Some(reason.clone());
        Error::Nccl {
            rank: self.rank,
            world: self.world,
            reason,
        }
    }

    fn check_buffer(&self, buffer: &Tensor) -> Result<ffi::DataType> {
        let device = Device::Cuda(self.device_index);
        if buffer.device() != device {
            return Err(Error::Input {
                name: "all-reduce buffer".into(),
                reason: format!(
                    "is on {:?}, this rank's communicator is on {device:?}",
                    buffer.device()
                ),
            });
        }
        if !buffer.is_contiguous() {
            return Err(Error::Input {
                name: "all-reduce buffer".into(),
                reason: "is not contiguous".into(),
            });
        }
        match buffer.kind() {
            Kind::Float => Ok(ffi::DataType::ncclFloat32),
            Kind::BFloat16 => Ok(ffi::DataType::ncclBfloat16),
            Kind::Half => Ok(ffi::DataType::ncclFloat16),
            Kind::Double => Ok(ffi::DataType::ncclFloat64),
            other => Err(Error::DType {
                name: "all-reduce buffer".into(),
                found: format!("{other:?}"),
                expected: "float32, bfloat16, float16 or float64",
            }),
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        if let Some(reason) = &self.broken {
            return Err(Error::Nccl {
                rank: self.rank,
                world: self.world,
                reason: format!("communicator already broken: {reason}"),
            });
        }
        let dtype = self.check_buffer(buffer)?;
        let count = buffer.numel();
        if count == 0 {
            return Ok(());
        }
        let start = Instant::now();
        let device = self.device_index as i32;
        let stream = self
            .context
            .bind()
            .and_then(|()| ffi::torch_current_stream(device))
            .map_err(|e| self.break_with(format!("finding libtorch's CUDA stream: {e}")))?;
        let Some(comm) = &self.comm else {
            return Err(self.break_with("the communicator is gone".into()));
        };
        // The buffer stays borrowed (alive, unresized) until this function returns, and it only
        // returns once the event behind the all-reduce completed or the communicator is aborted.
        let code = comm.all_reduce_sum_in_place(buffer.data_ptr(), count, dtype, stream);
        let waited = match code {
            // Non-blocking communicators may still be enqueueing: the event goes in after that.
            ffi::Code::ncclSuccess | ffi::Code::ncclInProgress => {
                wait_idle(comm, "all-reduce (enqueue)", start, self.deadline, || {
                    Ok(true)
                })
                .and_then(|()| {
                    self.event
                        .record(stream)
                        .map_err(|e| format!("recording a CUDA event: {e}"))
                })
                .and_then(|()| {
                    wait_idle(comm, "all-reduce", start, self.deadline, || {
                        self.event.done()
                    })
                })
            }
            code => Err(format!(
                "ncclAllReduce: {}",
                describe(code, &comm.last_error())
            )),
        };
        if let Err(reason) = waited {
            return Err(self.break_with(format!("{reason} ({count} elements of {dtype:?})")));
        }
        tracing::trace!(
            count,
            seconds = start.elapsed().as_secs_f64(),
            "NCCL all-reduce"
        );
        Ok(())
    }
}

impl Drop for NcclCollective {
    /// Finalises and destroys a healthy communicator (waiting at most [`FINALIZE_DEADLINE`] for
    /// its pending work); aborts it when that fails. A broken one was aborted already.
    fn drop(&mut self) {
        let Some(comm) = self.comm.take() else {
            return;
        };
        if let Err(e) = self.context.bind() {
            tracing::warn!(error = %e, "binding the CUDA context before destroying the communicator");
        }
        let start = Instant::now();
        let finalized = match comm.finalize() {
            ffi::Code::ncclSuccess | ffi::Code::ncclInProgress => wait_idle(
                &comm,
                "finalising the communicator",
                start,
                FINALIZE_DEADLINE,
                || Ok(true),
            ),
            code => Err(format!(
                "ncclCommFinalize: {}",
                describe(code, &comm.last_error())
            )),
        };
        let code = match finalized {
            Ok(()) => comm.destroy(),
            Err(reason) => {
                tracing::warn!(rank = self.rank, world = self.world, %reason, "aborting the NCCL communicator");
                comm.abort()
            }
        };
        if code != ffi::Code::ncclSuccess {
            tracing::warn!(
                code = code as u32,
                "releasing the NCCL communicator: {}",
                ffi::error_string(code)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn available_answers_without_panicking() {
        let here = available();
        if !tch::Cuda::is_available() {
            assert!(!here, "NCCL cannot be available without a CUDA device");
        }
    }

    #[test]
    fn unique_id_works_or_errors_cleanly() {
        match unique_id() {
            Ok(id) => {
                assert!(id.iter().any(|&b| b != 0), "an all-zero unique id");
                assert_ne!(unique_id().ok(), Some(id), "two calls gave the same id");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.starts_with("nccl: "), "{text}");
            }
        }
    }

    #[test]
    fn connect_without_gpu_is_an_error() {
        if tch::Cuda::is_available() {
            return;
        }
        let id = [0u8; 128];
        let err = NcclCollective::connect(0, 1, &id, 0, Duration::from_secs(1))
            .expect_err("connect without a GPU");
        let text = err.to_string();
        assert!(text.contains("no CUDA device"), "{text}");
    }

    #[test]
    fn connect_checks_rank_against_world() {
        let id = [0u8; 128];
        for (rank, world) in [(1, 1), (0, 0), (5, 2)] {
            let err = NcclCollective::connect(rank, world, &id, 0, Duration::from_secs(1))
                .expect_err("invalid rank");
            assert!(matches!(err, Error::Input { .. }), "{err}");
        }
    }

    #[test]
    fn libtorch_stream_lookup_never_panics() {
        match ffi::torch_current_stream(0) {
            Ok(_) => assert!(tch::Cuda::is_available()),
            // The shim is found (libtorch_cuda is linked) and refuses without a GPU.
            Err(e) => {
                assert!(!tch::Cuda::is_available(), "{e}");
                assert!(e.contains("failed with"), "the shim was not found: {e}");
            }
        }
    }

    #[test]
    fn config_has_the_layout_of_nccl_2_29() {
        // nccl.h of nvidia-nccl-cu13 2.29.7: size_t, 2 unsigned, 4 int, pointer, 2 int, pointer,
        // 8 int. A different size means cudarc's bindings and the library disagree.
        assert_eq!(std::mem::size_of::<cudarc::nccl::sys::ncclConfig_t>(), 88);
    }
}
