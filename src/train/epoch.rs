//! One pass over a dataset in shuffled minibatches, shared by every training stage: the
//! stage supplies only "train on these indices and return the loss".

use std::time::Instant;

use super::rng::Rng;
use crate::progress::Progress;

/// What an epoch did, for logs and metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpochSummary {
    pub mean_loss: f64,
    pub batches: usize,
    pub items: usize,
    pub items_per_s: f64,
}

/// Shuffles `0..len` with `rng` and calls `step` on consecutive batches of at most
/// `batch_size` indices (the last one may be shorter), showing loss, rate and ETA as
/// [`Progress`] labelled `label` (hidden when `show` is false, as in tests).
pub fn run_epoch(
    len: usize,
    batch_size: usize,
    rng: &mut Rng,
    label: &str,
    show: bool,
    mut step: impl FnMut(&[usize]) -> anyhow::Result<f32>,
) -> anyhow::Result<EpochSummary> {
    anyhow::ensure!(batch_size > 0, "batch size must be positive");
    let mut order: Vec<usize> = (0..len).collect();
    rng.shuffle(&mut order);
    let mut bar = Progress::new(label, len, show);
    let start = Instant::now();
    let (mut total, mut batches) = (0.0f64, 0usize);
    for chunk in order.chunks(batch_size) {
        let loss = step(chunk)?;
        total += loss as f64;
        batches += 1;
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(chunk.len());
    }
    bar.finish();
    Ok(EpochSummary {
        mean_loss: if batches == 0 {
            f64::NAN
        } else {
            total / batches as f64
        },
        batches,
        items: len,
        items_per_s: len as f64 / start.elapsed().as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visits_every_index_once_in_a_seeded_order() {
        let run = |seed| {
            let mut seen = Vec::new();
            let s = run_epoch(10, 4, &mut Rng::new(seed), "t", false, |b| {
                seen.extend_from_slice(b);
                Ok(b.len() as f32)
            })
            .unwrap();
            (seen, s)
        };
        let (a, summary) = run(3);
        assert_eq!(summary.batches, 3);
        assert!((summary.mean_loss - 10.0 / 3.0).abs() < 1e-9);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, run(3).0);
        assert_ne!(a, run(4).0);
    }
}
