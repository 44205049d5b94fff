//! The batching queue between the HTTP handlers and the model.
//!
//! The model lives on one thread of its own (its tensors and views are not shared between
//! threads, and a batch of 16 images costs far less than 16 batches of one). Handlers submit a
//! job and await its answer; the thread takes the first waiting job, collects more for a short
//! window or until the batch is full, and runs them together. Admission is bounded: beyond
//! `queue_bound` jobs waiting or running, a submit is refused at once (the server answers 503),
//! so a burst never grows memory or latency without limit.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How jobs are collected into batches and how many may wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    /// How long the first job of a batch waits for others to join it.
    pub window: Duration,
    /// Most jobs run together.
    pub max_batch: usize,
    /// Most jobs admitted at once, waiting or running; more are refused.
    pub queue_bound: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(5),
            max_batch: 8,
            queue_bound: 256,
        }
    }
}

/// Why a job got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the server is busy: {0} requests are waiting or running, try again shortly")]
    Full(usize),
    #[error("the model failed on this batch: {0}")]
    Panicked(String),
    #[error("the model thread has stopped")]
    Stopped,
}

/// When a job ran: for the time a response reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// From submit to the start of its batch.
    pub queued: Duration,
    /// The batch's run.
    pub model: Duration,
    /// Jobs in the batch.
    pub batch_size: usize,
}

type Reply<A> = oneshot::Sender<Result<(A, Timing), Refusal>>;

struct Pending<J, A> {
    job: J,
    reply: Reply<A>,
    submitted: Instant,
}

/// A handle for submitting jobs; clones share the queue and its thread, which stops when the
/// last handle is dropped (after the jobs already admitted).
pub struct Batcher<J, A> {
    tx: mpsc::Sender<Pending<J, A>>,
    admitted: Arc<AtomicUsize>,
    bound: usize,
}

impl<J, A> Clone for Batcher<J, A> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            admitted: self.admitted.clone(),
            bound: self.bound,
        }
    }
}

/// The model thread's side of a starting [`Batcher`]: once the model is built, [`Self::serve`]
/// reports it ready and answers batches until the last handle is dropped.
pub struct Startup<J, A, I> {
    config: BatchConfig,
    rx: mpsc::Receiver<Pending<J, A>>,
    ready: mpsc::Sender<anyhow::Result<I>>,
    admitted: Arc<AtomicUsize>,
}

impl<J, A, I> Startup<J, A, I> {
    /// Reports `info` to [`Batcher::start`], then runs every batch through `run`, which
    /// answers the jobs of a batch in order.
    pub fn serve(self, info: I, run: impl FnMut(Vec<J>) -> Vec<A>) {
        let _ = self.ready.send(Ok(info));
        serve_batches(self.config, self.rx, run, &self.admitted);
    }
}

impl<J: Send + 'static, A: Send + 'static> Batcher<J, A> {
    /// Starts the model thread, which runs `body`: it builds the model there (it need not be
    /// `Send`) and calls [`Startup::serve`]. An error before that is returned here, with
    /// what `body` passed to `serve` on success.
    pub fn start<I: Send + 'static>(
        config: BatchConfig,
        body: impl FnOnce(Startup<J, A, I>) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<(Self, I)> {
        anyhow::ensure!(
            config.max_batch > 0 && config.queue_bound > 0,
            "the maximum batch and the queue bound must be at least 1"
        );
        let (tx, rx) = mpsc::channel::<Pending<J, A>>();
        let (ready, ready_rx) = mpsc::channel();
        let admitted = Arc::new(AtomicUsize::new(0));
        let startup = Startup {
            config,
            rx,
            ready: ready.clone(),
            admitted: admitted.clone(),
        };
        std::thread::Builder::new()
            .name("spikeclip-model".into())
            .spawn(move || {
                if let Err(e) = body(startup) {
                    // Received only if the model failed before it was ready.
                    let _ = ready.send(Err(e));
                }
            })?;
        let info = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the model thread died while starting"))??;
        let batcher = Self {
            tx,
            admitted,
            bound: config.queue_bound,
        };
        Ok((batcher, info))
    }

    /// Runs `job` in the next batch with room and returns its answer, or refuses it at once
    /// when the queue is full.
    pub async fn submit(&self, job: J) -> Result<(A, Timing), Refusal> {
        let before = self.admitted.fetch_add(1, Ordering::SeqCst);
        if before >= self.bound {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(Refusal::Full(before));
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            job,
            reply,
            submitted: Instant::now(),
        };
        if self.tx.send(pending).is_err() {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            return Err(Refusal::Stopped);
        }
        answer.await.unwrap_or(Err(Refusal::Stopped))
    }

    /// Jobs admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.admitted.load(Ordering::SeqCst)
    }
}

/// The model thread's loop: until every handle is gone, collect a batch and answer it.
fn serve_batches<J, A>(
    config: BatchConfig,
    rx: mpsc::Receiver<Pending<J, A>>,
    mut run: impl FnMut(Vec<J>) -> Vec<A>,
    admitted: &AtomicUsize,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + config.window;
        while batch.len() < config.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let start = Instant::now();
        let (jobs, waiting): (Vec<J>, Vec<(Reply<A>, Instant)>) = batch
            .into_iter()
            .map(|p| (p.job, (p.reply, p.submitted)))
            .unzip();
        let size = jobs.len();
        // A panic inside the model fails this batch's requests, not the server.
        let answers = catch_unwind(AssertUnwindSafe(|| run(jobs))).map_err(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Refusal::Panicked(msg)
        });
        let model = start.elapsed();
        let answers: Vec<Result<A, Refusal>> = match answers {
            Ok(a) if a.len() == size => a.into_iter().map(Ok).collect(),
            Ok(a) => {
                let msg = format!("{} answers for {size} jobs", a.len());
                (0..size)
                    .map(|_| Err(Refusal::Panicked(msg.clone())))
                    .collect()
            }
            Err(refusal) => (0..size).map(|_| Err(refusal.clone())).collect(),
        };
        for ((reply, submitted), answer) in waiting.into_iter().zip(answers) {
            let timing = Timing {
                queued: start.saturating_duration_since(submitted),
                model,
                batch_size: size,
            };
            // Released before the answer is sent: a client that sends its next request the
            // moment it has this answer must find the job gone, or it is refused (503) below
            // the bound and `/v1/health` counts an answered request.
            admitted.fetch_sub(1, Ordering::SeqCst);
            let _ = reply.send(answer.map(|a| (a, timing)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window_ms: u64, max_batch: usize, queue_bound: usize) -> BatchConfig {
        BatchConfig {
            window: Duration::from_millis(window_ms),
            max_batch,
            queue_bound,
        }
    }

    /// A batcher whose batch function doubles numbers and panics on 13.
    fn doubler(cfg: BatchConfig) -> Batcher<u32, u32> {
        let body = |startup: Startup<u32, u32, ()>| {
            startup.serve((), |jobs| {
                assert!(!jobs.contains(&13), "unlucky");
                jobs.into_iter().map(|j| 2 * j).collect()
            });
            Ok(())
        };
        Batcher::start(cfg, body).unwrap().0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_jobs_share_a_batch_and_get_their_own_answers() {
        let b = doubler(config(200, 8, 16));
        let answers = futures_join(&b, [1, 2, 3, 4]).await;
        for (i, a) in answers.into_iter().enumerate() {
            let (value, timing) = a.unwrap();
            assert_eq!(value, 2 * (i as u32 + 1));
            assert_eq!(timing.batch_size, 4, "collected within the window");
        }
        assert_eq!(b.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_the_bound_jobs_are_refused_and_a_panic_fails_only_its_batch() {
        let b = doubler(config(300, 8, 2));
        let answers = futures_join(&b, [1, 2, 3]).await;
        let refused = answers
            .iter()
            .filter(|a| matches!(a, Err(Refusal::Full(2))))
            .count();
        assert_eq!(refused, 1, "{answers:?}");
        assert!(matches!(
            b.submit(13).await,
            Err(Refusal::Panicked(m)) if m == "unlucky"
        ));
        assert_eq!(b.submit(5).await.unwrap().0, 10, "the thread survived");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_sends_on_each_answer_is_never_refused_at_a_bound_of_one() {
        let b = doubler(config(0, 8, 1));
        for j in 100..400 {
            assert_eq!(b.submit(j).await.map(|a| a.0), Ok(2 * j), "job {j}");
            assert_eq!(b.in_flight(), 0, "job {j} still counted once answered");
        }
    }

    async fn futures_join<const N: usize>(
        b: &Batcher<u32, u32>,
        jobs: [u32; N],
    ) -> Vec<Result<(u32, Timing), Refusal>> {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|j| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(j).await })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }
}
