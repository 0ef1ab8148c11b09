//! The all-reduce for CUDA replicas: NCCL through cudarc, one rank per GPU, all in this process.
//!
//! cudarc loads `libcuda` (the driver's) and `libnccl` when they are first used, so building
//! needs no CUDA toolkit. cudarc looks for NCCL by the names `libnccl.so` and `libnccl.so.<N>`
//! for a few N, not `libnccl.so.2`, the only name the `nvidia-nccl-cu13` wheel (which torch
//! 2.11.0+cu130 installs next to itself, in `nvidia/nccl/lib`) provides: a link named
//! `libnccl.so` to it must be on the library path. Builds with this feature embed
//! `<libtorch>/../../nvidia/nccl/lib` as an rpath (build.rs), so a link made there is found
//! without `LD_LIBRARY_PATH`; elsewhere, put a directory holding such a link on
//! `LD_LIBRARY_PATH` (`scripts/gpu-check` does).
//!
//! **Stream ordering.** libtorch (through tch, which cannot name streams) queues its kernels on
//! the device's current stream; NCCL runs on a stream of its own, made here. The all-reduce
//! therefore waits for every stream on the device before it starts (the gradients are written)
//! and for NCCL's stream before it returns (the sum is there before libtorch's next kernel
//! reads it). Two host synchronisations per inner step: the single-replica path already has one
//! (it reads the loss back to check it), and the order does not depend on which stream
//! libtorch happens to use.

// cudarc's dynamic loader can only be probed through an `unsafe fn` (its safe API panics when a
// library is missing). The workspace allows `unsafe` only here, in worker/src/adamw_cpu.rs
// (tensor memory as slices) and in common/src/autocast.rs (libtorch's autocast state).
#![allow(unsafe_code)]

use super::{Collective, CollectiveError, Connect};
use cudarc::driver::{sys::CUdeviceptr, CudaContext, CudaStream, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use tch::{Device, Kind, Tensor};

/// One rank's member: its communicator and NCCL's stream on its GPU.
struct Nccl {
    comm: Comm,
    ordinal: usize,
}

/// The ranks of one group, rank = position in `ordinals`. Rank 0 makes the communicator id and
/// hands it to the others through channels; every rank then joins on its own thread.
pub(super) fn group(ordinals: &[usize]) -> Vec<Connect> {
    let size = ordinals.len();
    let (senders, receivers): (Vec<_>, Vec<_>) = (1..size).map(|_| mpsc::channel::<Id>()).unzip();
    let mut receivers = receivers.into_iter();
    let mut senders = Some(senders);
    // Every rank passes this gate once, ready or not, so a rank that fails to start releases
    // the others instead of leaving them in NCCL's set-up, which waits for every rank.
    let gate = Arc::new((Barrier::new(size), Mutex::new(Vec::<String>::new())));
    ordinals
        .iter()
        .enumerate()
        .map(|(rank, &ordinal)| {
            let id_source = match rank {
                0 => IdSource::Make(senders.take().unwrap_or_default()),
                _ => IdSource::Receive(receivers.next()),
            };
            let gate = gate.clone();
            Box::new(move || {
                let ready = prepare(ordinal).and_then(|stream| Ok((stream, id_source.get()?)));
                let (barrier, failures) = &*gate;
                let failures_now = || failures.lock().unwrap_or_else(PoisonError::into_inner);
                if let Err(e) = &ready {
                    failures_now().push(format!("rank {rank} (cuda:{ordinal}): {e}"));
                }
                barrier.wait();
                let failures = failures_now().clone();
                let (stream, id) = ready?;
                if !failures.is_empty() {
                    return Err(CollectiveError::Nccl(format!(
                        "another rank did not start: {}",
                        failures.join("; ")
                    )));
                }
                let comm =
                    Comm::from_rank(stream, rank, size, id).map_err(|e| nccl_error("joining the communicator", &e))?;
                Ok(Box::new(Nccl { comm, ordinal }) as Box<dyn Collective>)
            }) as Connect
        })
        .collect()
}

/// Where a rank's communicator id comes from.
enum IdSource {
    /// Rank 0 makes it and sends it to the others.
    Make(Vec<mpsc::Sender<Id>>),
    Receive(Option<mpsc::Receiver<Id>>),
}

impl IdSource {
    fn get(self) -> Result<Id, CollectiveError> {
        match self {
            IdSource::Make(others) => {
                let id = Id::new().map_err(|e| nccl_error("making the communicator id", &e))?;
                for tx in others {
                    // A rank that is gone fails on its own.
                    let _ = tx.send(id);
                }
                Ok(id)
            }
            IdSource::Receive(rx) => rx
                .and_then(|rx| rx.recv().ok())
                .ok_or_else(|| CollectiveError::Nccl("rank 0 did not make a communicator id".into())),
        }
    }
}

/// Checks that the driver and NCCL can be loaded, binds this thread to the GPU's primary
/// context (the one libtorch uses) and makes NCCL's stream there.
fn prepare(ordinal: usize) -> Result<Arc<CudaStream>, CollectiveError> {
    // SAFETY: these only try to open the libraries (dlopen) and report whether that worked;
    // nothing from them is called.
    let (driver, nccl) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nccl::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(CollectiveError::Nccl(
            "the NVIDIA driver's libcuda.so could not be loaded".into(),
        ));
    }
    if !nccl {
        return Err(CollectiveError::Nccl(
            "libnccl.so could not be loaded: torch wheels ship it as nvidia/nccl/lib/libnccl.so.2 in site-packages; \
             make a link named libnccl.so to that file in a directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| CollectiveError::Nccl(format!("opening cuda:{ordinal}: {e}")))?;
    ctx.new_stream()
        .map_err(|e| CollectiveError::Nccl(format!("making a stream on cuda:{ordinal}: {e}")))
}

fn nccl_error(what: &str, e: &cudarc::nccl::result::NcclError) -> CollectiveError {
    CollectiveError::Nccl(format!("{what}: {:?}", e.0))
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.world_size()
    }

    /// NCCL cannot tell buffers of different lengths apart (they are the caller's promise).
    fn all_reduce_sum(&self, buf: &mut Tensor) -> Result<(), CollectiveError> {
        if buf.dim() != 1
            || buf.kind() != Kind::Float
            || buf.device() != Device::Cuda(self.ordinal)
            || !buf.is_contiguous()
        {
            return Err(CollectiveError::Buffer(format!(
                "{:?} {:?} on {:?}",
                buf.kind(),
                buf.size(),
                buf.device()
            )));
        }
        // libtorch's kernels that wrote `buf`, on whichever stream, are finished.
        tch::Cuda::synchronize(self.ordinal as i64);
        let stream = self.comm.stream();
        let mut view = TorchBuffer {
            ptr: buf.data_ptr() as CUdeviceptr,
            len: buf.numel(),
            stream: stream.clone(),
        };
        self.comm
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| nccl_error("all-reduce", &e))?;
        // The sum is in `buf` before libtorch's next kernel reads it.
        stream
            .synchronize()
            .map_err(|e| CollectiveError::Nccl(format!("waiting for the all-reduce: {e}")))
    }
}

/// A libtorch tensor's memory seen as cudarc device memory, for one call. Ordering with
/// libtorch's stream is done by the caller (see the module's comment), so the pointer comes
/// with nothing to wait for.
struct TorchBuffer {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceSlice<f32> for TorchBuffer {
    fn len(&self) -> usize {
        self.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl DevicePtrMut<f32> for TorchBuffer {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (here: no driver), every rank fails to start and says why; none waits
    /// forever for the others. (With GPUs, `engine::tests::gpu` exercises the real thing.)
    #[test]
    fn ranks_that_cannot_start_all_return_an_error() {
        if tch::Cuda::device_count() > 0 {
            return;
        }
        let errors: Vec<Option<String>> = std::thread::scope(|s| {
            let ranks: Vec<_> = group(&[0, 1])
                .into_iter()
                .map(|connect| s.spawn(move || connect().err().map(|e| e.to_string())))
                .collect();
            ranks.into_iter().map(|r| r.join().expect("rank thread")).collect()
        });
        for e in errors {
            let e = e.expect("a rank started without a GPU");
            assert!(e.starts_with("NCCL: ") && e.contains("could not be loaded"), "{e}");
        }
    }
}
