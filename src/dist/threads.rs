//! Ranks as threads of one process, for tests of the collective code paths without MPI.

use std::sync::{Arc, Barrier, Mutex};

use super::Collective;

/// A job whose ranks are threads sharing one board: each collective writes its part, waits for
/// the others, and reads the combined result.
pub struct ThreadGroup {
    rank: usize,
    size: usize,
    barrier: Arc<Barrier>,
    board: Arc<Mutex<Vec<Vec<f64>>>>,
}

impl ThreadGroup {
    /// Runs `f` on `size` ranks at once, each a thread; their results in rank order.
    pub fn run<R: Send>(size: usize, f: impl Fn(&ThreadGroup) -> R + Sync) -> Vec<R> {
        let barrier = Arc::new(Barrier::new(size));
        let board = Arc::new(Mutex::new(vec![Vec::new(); size]));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let group = ThreadGroup {
                        rank,
                        size,
                        barrier: barrier.clone(),
                        board: board.clone(),
                    };
                    let f = &f;
                    s.spawn(move || f(&group))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Every rank's `mine`, in rank order.
    fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
        self.board.lock().unwrap()[self.rank] = mine;
        self.barrier.wait();
        let all = self.board.lock().unwrap().clone();
        self.barrier.wait();
        all
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) {
        let all = self.exchange(values.iter().map(|&v| v as f64).collect());
        for (i, v) in values.iter_mut().enumerate() {
            *v = all.iter().fold(0f32, |s, r| s + r[i] as f32);
        }
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) {
        let all = self.exchange(values.to_vec());
        for (i, v) in values.iter_mut().enumerate() {
            *v = all.iter().map(|r| r[i]).sum();
        }
    }
    fn broadcast_f32(&self, values: &mut [f32]) {
        let all = self.exchange(values.iter().map(|&v| v as f64).collect());
        for (v, &root) in values.iter_mut().zip(&all[0]) {
            *v = root as f32;
        }
    }
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let all = self.exchange(vec![f64::from_bits(value)]);
        all.iter().map(|r| r[0].to_bits()).collect()
    }
    fn barrier(&self) {
        self.barrier.wait();
    }
    fn abort(&self, message: &str, _code: i32) -> ! {
        panic!("{message}")
    }
}
