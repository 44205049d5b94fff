//! Data-parallel runs over several processes: the collectives they need, behind one small
//! trait so that the training loop, BatchNorm and evaluation do not know which transport
//! carries them.
//!
//! A process runs alone ([`SingleProcess`], every collective the identity) unless it was
//! started by an MPI launcher and built with the `mpi` feature, in which case
//! [`launch`] installs the MPI transport as the process-global [`collective`]. The handle is
//! global because the ops that need it (synchronised BatchNorm) are created deep inside a
//! model's forward, far from any argument list. Everything here is over plain slices, so a
//! transport for device memory (NCCL) fits the same trait.

mod digest;
pub mod grads;
#[cfg(feature = "mpi")]
mod mpi;
mod shard;
#[cfg(test)]
pub(crate) mod threads;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

pub use digest::{ensure_same, Digest};
pub use shard::shard;

/// The collective operations of a data-parallel job. Every rank must call the same ones in the
/// same order with buffers of the same length; a transport that cannot complete one ends the
/// job rather than return a result that differs between ranks.
pub trait Collective: Send + Sync {
    /// This process's index, `0..size()`.
    fn rank(&self) -> usize;
    /// Processes in the job.
    fn size(&self) -> usize;
    /// Replaces `values` on every rank by their elementwise sum over all ranks (the same bits
    /// on every rank).
    fn all_reduce_sum_f32(&self, values: &mut [f32]);
    fn all_reduce_sum_f64(&self, values: &mut [f64]);
    /// Replaces `values` on every rank by rank 0's.
    fn broadcast_f32(&self, values: &mut [f32]);
    /// Every rank's `value`, in rank order (digests and checksums).
    fn all_gather_u64(&self, value: u64) -> Vec<u64>;
    /// Waits until every rank has arrived.
    fn barrier(&self);
    /// Ends every process of the job with `code`, after printing `message` on this one.
    fn abort(&self, message: &str, code: i32) -> !;
}

/// A job of one process: every collective leaves its buffers as they are.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _: &mut [f64]) {}
    fn broadcast_f32(&self, _: &mut [f32]) {}
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        vec![value]
    }
    fn barrier(&self) {}
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("{message}");
        std::process::exit(code)
    }
}

static COLLECTIVE: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// Whether training-mode BatchNorm takes its statistics over the whole job's batch.
static SYNC_BATCH_NORM: AtomicBool = AtomicBool::new(true);

/// The process's collective: the one [`launch`] installed, else [`SingleProcess`].
pub fn collective() -> &'static dyn Collective {
    COLLECTIVE.get_or_init(|| Box::new(SingleProcess)).as_ref()
}

/// Whether this process is one of several.
pub fn is_distributed() -> bool {
    collective().size() > 1
}

/// Whether this process writes the job's files (checkpoints, metrics, reports).
pub fn is_writer() -> bool {
    collective().rank() == 0
}

/// Turns synchronised BatchNorm off (`--no-sync-bn`): each rank then normalises its own slice
/// of the batch with that slice's statistics, and the running statistics drift apart.
pub fn set_sync_batch_norm(on: bool) {
    SYNC_BATCH_NORM.store(on, Ordering::Relaxed);
}

/// The collective over which training-mode BatchNorm sums its statistics, when it does.
pub fn batch_norm_group() -> Option<&'static dyn Collective> {
    let c = collective();
    (c.size() > 1 && SYNC_BATCH_NORM.load(Ordering::Relaxed)).then_some(c)
}

/// Calls, bytes and time of one kind of collective since the process started: the cost model
/// of many ranks (README's scaling table) is built from these counts per training step.
#[derive(Debug, Default)]
pub struct Tally {
    calls: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

impl Tally {
    pub const fn new() -> Self {
        Self {
            calls: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
        }
    }

    /// Runs `f`, a collective over `bytes`, and counts it.
    pub fn time<R>(&self, bytes: usize, f: impl FnOnce() -> R) -> R {
        let start = std::time::Instant::now();
        let r = f();
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    /// Calls, bytes and seconds so far.
    pub fn read(&self) -> (u64, u64, f64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
            self.nanos.load(Ordering::Relaxed) as f64 * 1e-9,
        )
    }
}

/// The all-reduces of synchronised BatchNorm (small, one per statistic and layer: their cost
/// is the network's latency, not its bandwidth).
pub static BATCH_NORM_TRAFFIC: Tally = Tally::new();

/// What [`launch`] started; MPI is finalised when it is dropped, so `main` holds it to the end.
pub struct Launch {
    #[cfg(feature = "mpi")]
    _universe: Option<::mpi::environment::Universe>,
}

/// Joins the MPI job this process was started in, if any: with the `mpi` feature and an MPI
/// launcher's environment (`mpirun`, `srun`), MPI becomes the process's [`collective`], and a
/// panic on any rank ends the whole job with a message naming the rank. Otherwise the process
/// runs alone.
pub fn launch() -> anyhow::Result<Launch> {
    #[cfg(feature = "mpi")]
    {
        let universe = mpi::join()?;
        if universe.is_some() {
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                hook(info);
                let c = collective();
                c.abort(&format!("rank {} of {}: panicked", c.rank(), c.size()), 101);
            }));
        }
        Ok(Launch {
            _universe: universe,
        })
    }
    #[cfg(not(feature = "mpi"))]
    Ok(Launch {})
}

/// Ends the job for an error on this rank: alone, the caller reports it as usual; one of
/// several, every rank is stopped (`MPI_Abort`) with the message naming this one, so that no
/// rank is left waiting in a collective.
pub fn fail_job(err: &anyhow::Error) {
    let c = collective();
    if c.size() > 1 {
        c.abort(
            &format!("rank {} of {}: error: {err:#}", c.rank(), c.size()),
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_keeps_its_values_and_writes_the_files() {
        let c = SingleProcess;
        let mut v = [1.5f32, -2.0];
        c.all_reduce_sum_f32(&mut v);
        c.broadcast_f32(&mut v);
        let mut w = [0.25f64];
        c.all_reduce_sum_f64(&mut w);
        assert_eq!((v, w), ([1.5, -2.0], [0.25]));
        assert_eq!(c.all_gather_u64(7), [7]);
        assert!(!is_distributed() && is_writer());
        assert!(batch_norm_group().is_none(), "one process never syncs");
    }
}
