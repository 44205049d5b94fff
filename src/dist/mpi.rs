//! The MPI transport (rsmpi over the system's MPI library, `--features mpi`).

use std::sync::{Mutex, MutexGuard};

use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::Threading;

use super::{Collective, COLLECTIVE};

/// Environment variables that MPI launchers set in the processes they start (Open MPI's
/// `mpirun`, PMIx as under `srun --mpi=pmix`, MPICH's Hydra and Slurm's PMI-2).
const LAUNCHER_VARS: &[&str] = &["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"];

/// `MPI_COMM_WORLD`, its calls serialised: candle may run ops on any thread, and MPI is asked
/// only for `MPI_THREAD_SERIALIZED`.
struct MpiWorld {
    rank: usize,
    size: usize,
    serial: Mutex<()>,
}

impl MpiWorld {
    /// The world communicator, for one call at a time.
    fn world(&self) -> (MutexGuard<'_, ()>, SimpleCommunicator) {
        // A poisoned lock means a panic inside a collective; the panic hook is ending the job.
        let guard = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        (guard, SimpleCommunicator::world())
    }

    fn all_reduce<T: ::mpi::datatype::Equivalence + Copy>(&self, values: &mut [T]) {
        let send = values.to_vec();
        let (_serial, world) = self.world();
        world.all_reduce_into(&send[..], values, SystemOperation::sum());
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) {
        self.all_reduce(values)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) {
        self.all_reduce(values)
    }
    fn broadcast_f32(&self, values: &mut [f32]) {
        let (_serial, world) = self.world();
        world.process_at_rank(0).broadcast_into(values);
    }
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let mut all = vec![0u64; self.size];
        let (_serial, world) = self.world();
        world.all_gather_into(&value, &mut all[..]);
        all
    }
    fn barrier(&self) {
        let (_serial, world) = self.world();
        world.barrier();
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("{message}");
        // No lock: the rank may be stuck in a collective on another thread.
        SimpleCommunicator::world().abort(code)
    }
}

/// Initialises MPI and installs it as the process's collective when a launcher started this
/// process; `None` (the process runs alone) otherwise.
pub(super) fn join() -> anyhow::Result<Option<Universe>> {
    if !LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        return Ok(None);
    }
    let (universe, threading) = ::mpi::initialize_with_threading(Threading::Serialized)
        .ok_or_else(|| anyhow::anyhow!("MPI was already initialised"))?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if threading < Threading::Serialized {
        eprintln!(
            "rank {rank}: the MPI library offers threading {threading:?}, spikeclip needs Serialized"
        );
        world.abort(1);
    }
    COLLECTIVE
        .set(Box::new(MpiWorld {
            rank,
            size,
            serial: Mutex::new(()),
        }))
        .map_err(|_| anyhow::anyhow!("the process's collective was already chosen"))?;
    Ok(Some(universe))
}
