//! Summing gradients across a worker's model replicas (docs/algorithms.md §2): the [`Collective`] trait,
//! the in-process sum for CPU replicas ([`InProcess`]), NCCL for CUDA replicas (the `nccl`
//! feature), which of them a device list gets ([`group`]), and which rows of a batch each
//! replica takes ([`share`]).
//!
//! The operation is a **sum**, not an average: a replica's loss is its rows' part of the
//! batch's weighted sum Σ_i w_i ℓ_i, with weights already normalised by the whole batch, so
//! the sum of the replicas' gradients is the whole batch's gradient.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use tch::{Device, Kind, Tensor};

#[cfg(feature = "nccl")]
mod nccl;

/// An all-reduce among the replicas of one worker, one member per replica (rank), each used
/// from its replica's own thread.
pub trait Collective {
    /// This member's rank: 0 for the first replica.
    fn rank(&self) -> usize;
    /// The number of replicas.
    fn size(&self) -> usize;
    /// Replaces `buf` (a 1-D f32 tensor on this replica's device, of the same length on every
    /// replica) with the elementwise sum of every replica's `buf`; every replica gets the same
    /// bits. Returns once every replica has called it.
    ///
    /// # Errors
    /// A buffer of another kind or shape, lengths that differ between replicas (where the
    /// implementation can tell), a replica that went away, or a failure of the transport.
    fn all_reduce_sum(&self, buf: &mut Tensor) -> Result<(), CollectiveError>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectiveError {
    #[error("the all-reduce takes a 1-D f32 tensor on the replica's device, got {0}")]
    Buffer(String),
    #[error("the replicas' buffers differ in length (by rank: {0:?})")]
    Mismatch(Vec<usize>),
    #[error("another replica stopped while this one waited in the all-reduce")]
    Broken,
    #[error("libtorch: {0}")]
    Torch(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("replicas on {0} cannot share a collective (CPU replicas, or CUDA replicas with the `nccl` feature)")]
    Unsupported(String),
}

impl From<tch::TchError> for CollectiveError {
    fn from(e: tch::TchError) -> Self {
        CollectiveError::Torch(e.to_string())
    }
}

/// Builds one replica's member on that replica's own thread: NCCL's set-up returns only once
/// every rank has called it, so the members of a group must connect at the same time.
pub type Connect = Box<dyn FnOnce() -> Result<Box<dyn Collective>, CollectiveError> + Send>;

/// One [`Connect`] per device, rank = position in `devices`: the in-process sum for CPU
/// replicas, NCCL for CUDA replicas.
///
/// # Errors
/// `Unsupported` for a mixed list, or CUDA replicas in a build without the `nccl` feature.
pub fn group(devices: &[Device]) -> Result<Vec<Connect>, CollectiveError> {
    let unsupported = || CollectiveError::Unsupported(format!("{devices:?}"));
    if devices.iter().all(|d| *d == Device::Cpu) {
        return Ok(InProcess::group(devices.len())
            .into_iter()
            .map(|m| Box::new(move || Ok(Box::new(m) as Box<dyn Collective>)) as Connect)
            .collect());
    }
    let ordinals: Vec<usize> = devices
        .iter()
        .map(|d| match d {
            Device::Cuda(i) => Ok(*i),
            _ => Err(unsupported()),
        })
        .collect::<Result<_, _>>()?;
    #[cfg(feature = "nccl")]
    {
        Ok(nccl::group(&ordinals))
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = ordinals;
        Err(unsupported())
    }
}

/// The rows of an `n`-row batch that replica `rank` of `size` takes: contiguous, in rank
/// order, as even as possible (the first `n % size` replicas take one more). A replica may
/// get none when `n < size`.
pub fn share(n: usize, rank: usize, size: usize) -> Range<usize> {
    let (base, extra) = (n / size, n % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The all-reduce for replicas in one process that can read their buffers on the host (CPU
/// replicas): every member deposits its buffer, the last to arrive adds them up in rank order
/// (so the result does not depend on thread timing) and every member copies the sum back.
/// A member dropped while others wait (its thread died) breaks the group: they get
/// [`CollectiveError::Broken`] instead of waiting forever.
pub struct InProcess {
    rank: usize,
    group: Arc<Group>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("rank", &self.rank)
            .field("size", &self.group.size)
            .finish()
    }
}

struct Group {
    size: usize,
    state: Mutex<Exchange>,
    done: Condvar,
}

/// One all-reduce at a time: `generation` counts the finished ones.
struct Exchange {
    generation: u64,
    deposits: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// The last finished all-reduce's result; members of that generation read it before any
    /// of them can finish the next one (which needs every member to deposit first).
    result: Result<Arc<[f32]>, CollectiveError>,
    broken: bool,
}

impl InProcess {
    /// The `size` members of a new group, in rank order.
    pub fn group(size: usize) -> Vec<InProcess> {
        let group = Arc::new(Group {
            size,
            state: Mutex::new(Exchange {
                generation: 0,
                deposits: vec![None; size],
                arrived: 0,
                result: Ok(Arc::from(Vec::new())),
                broken: false,
            }),
            done: Condvar::new(),
        });
        (0..size)
            .map(|rank| InProcess {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    fn exchange(&self, data: Vec<f32>) -> Result<Arc<[f32]>, CollectiveError> {
        let g = &self.group;
        let mut s = g.state.lock().map_err(|_| CollectiveError::Broken)?;
        if s.broken {
            return Err(CollectiveError::Broken);
        }
        s.deposits[self.rank] = Some(data);
        s.arrived += 1;
        let generation = s.generation;
        if s.arrived == g.size {
            let deposits: Vec<Vec<f32>> = s.deposits.iter_mut().filter_map(Option::take).collect();
            s.result = sum_in_order(deposits);
            s.arrived = 0;
            s.generation += 1;
            g.done.notify_all();
        } else {
            while s.generation == generation && !s.broken {
                s = g.done.wait(s).map_err(|_| CollectiveError::Broken)?;
            }
            if s.generation == generation {
                return Err(CollectiveError::Broken);
            }
        }
        s.result.clone()
    }
}

/// Σ_r deposits[r], added in rank order.
fn sum_in_order(deposits: Vec<Vec<f32>>) -> Result<Arc<[f32]>, CollectiveError> {
    let lengths: Vec<usize> = deposits.iter().map(Vec::len).collect();
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Err(CollectiveError::Mismatch(lengths));
    }
    let mut deposits = deposits.into_iter();
    let mut sum = deposits.next().unwrap_or_default();
    for d in deposits {
        for (s, x) in sum.iter_mut().zip(d) {
            *s += x;
        }
    }
    Ok(sum.into())
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_reduce_sum(&self, buf: &mut Tensor) -> Result<(), CollectiveError> {
        if buf.dim() != 1 || buf.kind() != Kind::Float {
            return Err(CollectiveError::Buffer(format!("{:?} {:?}", buf.kind(), buf.size())));
        }
        if self.group.size == 1 {
            return Ok(());
        }
        let sum = self.exchange(Vec::<f32>::try_from(&*buf)?)?;
        buf.f_copy_(&Tensor::from_slice(&sum))?;
        Ok(())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Ok(mut s) = self.group.state.lock() {
            s.broken = true;
        }
        self.group.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every member of an `n` group all-reduces its buffer from `values(rank)` on its own
    /// thread; the results by rank.
    fn run(n: usize, values: impl Fn(usize) -> Vec<f32>) -> Vec<Result<Vec<f32>, CollectiveError>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::group(n)
                .into_iter()
                .map(|m| {
                    let data = values(m.rank());
                    s.spawn(move || {
                        let mut t = Tensor::from_slice(&data);
                        m.all_reduce_sum(&mut t)?;
                        Ok(Vec::<f32>::try_from(&t)?)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).collect()
        })
    }

    #[test]
    fn every_member_gets_the_sum_in_rank_order() {
        // Values whose float sum depends on the order of the additions.
        let values = |rank: usize| vec![[1e8f32, 1.0, -1e8][rank], rank as f32, 0.5];
        let in_order = ((1e8f32 + 1.0) + -1e8, 3.0, 1.5);
        for _ in 0..20 {
            for r in run(3, values) {
                assert_eq!(r.expect("sum"), vec![in_order.0, in_order.1, in_order.2]);
            }
        }
        // Many rounds in a row on the same group, each with its own values.
        let members = InProcess::group(2);
        std::thread::scope(|s| {
            for m in &members {
                s.spawn(move || {
                    for round in 0..200 {
                        let mut t = Tensor::from_slice(&[round as f32 * (m.rank() as f32 + 1.0)]);
                        m.all_reduce_sum(&mut t).expect("sum");
                        assert_eq!(t.double_value(&[0]), f64::from(round * 3));
                    }
                });
            }
        });
    }

    #[test]
    fn one_member_leaves_the_buffer_alone() {
        let [m] = <[InProcess; 1]>::try_from(InProcess::group(1)).expect("one");
        let mut t = Tensor::from_slice(&[1.5f32, -2.0]);
        m.all_reduce_sum(&mut t).expect("no-op");
        assert_eq!(Vec::<f32>::try_from(&t).expect("vec"), vec![1.5, -2.0]);
    }

    #[test]
    fn mismatched_or_malformed_buffers_are_errors_for_everyone() {
        for r in run(2, |rank| vec![1.0; rank + 2]) {
            assert!(
                matches!(r, Err(CollectiveError::Mismatch(ref l)) if *l == vec![2, 3]),
                "{r:?}"
            );
        }
        let [m] = <[InProcess; 1]>::try_from(InProcess::group(1)).expect("one");
        let mut doubles = Tensor::from_slice(&[1.0f64]);
        assert!(matches!(
            m.all_reduce_sum(&mut doubles),
            Err(CollectiveError::Buffer(_))
        ));
        let mut matrix = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        assert!(matches!(m.all_reduce_sum(&mut matrix), Err(CollectiveError::Buffer(_))));
    }

    #[test]
    fn a_member_that_goes_away_releases_the_others() {
        let mut members = InProcess::group(2);
        let gone = members.pop().expect("rank 1");
        let waiting = std::thread::spawn(move || {
            let m = &members[0];
            m.all_reduce_sum(&mut Tensor::from_slice(&[1.0f32]))
        });
        drop(gone);
        assert!(matches!(waiting.join().expect("thread"), Err(CollectiveError::Broken)));
    }

    #[test]
    fn shares_cover_the_batch_in_order_and_differ_by_at_most_one_row() {
        for n in 0..20 {
            for size in 1..5 {
                let parts: Vec<Range<usize>> = (0..size).map(|r| share(n, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, n);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
                let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                assert!(lens.iter().max().unwrap_or(&0) - lens.iter().min().unwrap_or(&0) <= 1);
            }
        }
        assert_eq!(share(9, 0, 2), 0..5);
        assert_eq!(share(9, 1, 2), 5..9);
    }

    #[test]
    fn cpu_lists_get_the_in_process_sum() {
        assert_eq!(group(&[Device::Cpu, Device::Cpu]).expect("cpu").len(), 2);
        assert!(group(&[Device::Cpu, Device::Cuda(0)]).is_err());
        #[cfg(not(feature = "nccl"))]
        assert!(group(&[Device::Cuda(0), Device::Cuda(1)]).is_err());
    }
}
