//! One training stage of the recipe (text distillation, image distillation or fine-tuning) run
//! to completion: epochs of shuffled minibatches with cosine-annealed Adam, a checkpoint written
//! atomically after every epoch, the best one kept by a validation metric, metrics appended to a
//! JSONL file, and `--resume` continuing bit-identically from the last checkpoint.
//!
//! The stage knows nothing about models: the caller supplies the loss of a batch and the
//! metric of an evaluation, so SpikeCLIP and ScratchCLIP share every line of it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::kernels::grad_slot::GradSlot;

use super::checkpoint::{self, TrainState};
use super::data_parallel::DataParallel;
use super::epoch::run_epoch;
use super::grads::Gradients;
use super::guard;
use super::metrics::JsonlWriter;
use super::optim::{Adam, AdamConfig};
use super::rng::Rng;
use super::schedule::CosineAnnealing;

/// Optimisation settings of a stage. The paper's: lr 5e-3 annealed to 5e-4 for pre-training,
/// 5e-4 for fine-tuning, batch 196, Adam.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Floor of the cosine schedule.
    pub eta_min: f64,
    /// Period of the cosine schedule in epochs; `None` anneals over the whole run.
    pub t_max: Option<usize>,
    pub weight_decay: f64,
    pub amsgrad: bool,
    /// Seeds the batch order.
    pub seed: u64,
}

impl StageConfig {
    /// The paper's pre-training settings (distillation of either encoder).
    pub fn paper_pretrain() -> Self {
        Self {
            epochs: 100,
            batch_size: 196,
            lr: 5e-3,
            eta_min: 5e-4,
            t_max: None,
            weight_decay: 0.0,
            amsgrad: false,
            seed: 0,
        }
    }

    /// The paper's fine-tuning settings.
    pub fn paper_finetune() -> Self {
        Self {
            lr: 5e-4,
            eta_min: 5e-5,
            ..Self::paper_pretrain()
        }
    }
}

/// Where a stage keeps its files, and how it runs.
pub struct StageRun<'a> {
    /// Names the checkpoints (`{name}_last.safetensors`, `{name}_best.safetensors`) and tags
    /// the metrics lines.
    pub name: &'a str,
    pub out_dir: &'a Path,
    /// Every weight of the model, saved whole in checkpoints.
    pub varmap: &'a VarMap,
    pub config: &'a StageConfig,
    /// Continue from `{name}_last.safetensors` instead of starting afresh.
    pub resume: bool,
    pub show_progress: bool,
    /// Watches the training without changing it (the demo's health log); `None` for most runs.
    pub observer: Option<Box<dyn StageObserver + 'a>>,
}

/// Watches a stage as it trains: every step's gradients and the model after every epoch. It
/// must leave the training as it was (no optimiser state, batch order or weights touched), so
/// that a run with an observer follows the same path as one without.
pub trait StageObserver {
    /// After a step's backward pass, before the optimiser applies `grads` to `trainable`.
    fn after_step(&mut self, grads: &Gradients, trainable: &[(String, Var)]) -> anyhow::Result<()> {
        let _ = (grads, trainable);
        Ok(())
    }
    /// After an epoch's checkpoint is written, with the epoch's record.
    fn after_epoch(&mut self, record: &EpochRecord) -> anyhow::Result<()>;
}

/// An observer that only looks at each finished epoch (`train`'s warning about a dead model).
pub struct AfterEpoch<F>(pub F);

impl<F: FnMut(&EpochRecord) -> anyhow::Result<()>> StageObserver for AfterEpoch<F> {
    fn after_epoch(&mut self, record: &EpochRecord) -> anyhow::Result<()> {
        (self.0)(record)
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub stage: String,
    pub epoch: usize,
    pub step: u64,
    pub lr: f64,
    pub loss: f64,
    pub metric: Option<f64>,
    pub items_per_s: f64,
    /// Where the stage trained (`cpu`, `cuda:0`): the device of its parameters. Empty in
    /// metrics written before it was recorded.
    #[serde(default)]
    pub device: String,
}

/// What a finished stage leaves behind.
#[derive(Debug, Clone)]
pub struct StageOutcome {
    /// Records of the epochs this invocation ran (a resumed run lists only the new ones).
    pub epochs: Vec<EpochRecord>,
    pub last: PathBuf,
    /// The checkpoint with the best metric, when a metric was given.
    pub best: Option<PathBuf>,
}

impl StageRun<'_> {
    pub fn last_path(&self) -> PathBuf {
        self.out_dir.join(format!("{}_last.safetensors", self.name))
    }

    pub fn best_path(&self) -> PathBuf {
        self.out_dir.join(format!("{}_best.safetensors", self.name))
    }

    /// Trains `trainable` (each must receive a gradient at every step) for the configured
    /// epochs over `len` items; `slots` are where the model's ops write the gradients of the
    /// parameters that bypass candle's `GradStore` ([`crate::recipe::Student::grad_slots`]). `loss` maps a batch of item indices to a scalar loss tensor;
    /// `metric`, when given, scores the model after each epoch (higher is better) to select the
    /// best checkpoint.
    pub fn run(
        self,
        trainable: Vec<(String, Var)>,
        slots: &[GradSlot],
        len: usize,
        mut loss: impl FnMut(&[usize]) -> anyhow::Result<Tensor>,
        mut metric: Option<&mut dyn FnMut() -> anyhow::Result<f64>>,
    ) -> anyhow::Result<StageOutcome> {
        let cfg = self.config;
        anyhow::ensure!(len > 0, "stage {}: the training set is empty", self.name);
        anyhow::ensure!(
            !trainable.is_empty(),
            "stage {}: no trainable parameters",
            self.name
        );
        std::fs::create_dir_all(self.out_dir)
            .with_context(|| format!("creating {}", self.out_dir.display()))?;
        let mut optim = Adam::new(
            trainable.clone(),
            AdamConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                amsgrad: cfg.amsgrad,
                ..AdamConfig::default()
            },
        );
        let schedule = CosineAnnealing {
            base_lr: cfg.lr,
            t_max: cfg.t_max.unwrap_or(cfg.epochs).max(1),
            eta_min: cfg.eta_min,
        };
        let (last, best) = (self.last_path(), self.best_path());
        let mut state = if self.resume {
            checkpoint::load(&last, self.varmap, &mut optim)
                .with_context(|| format!("resuming stage {} from {}", self.name, last.display()))?
        } else {
            TrainState {
                epoch: 0,
                step: 0,
                best_metric: None,
                rng: Rng::new(cfg.seed),
            }
        };
        let device = crate::ops::device::name(trainable[0].1.device());
        let mut dp = DataParallel::start(self.name, cfg, len, self.varmap)?;
        let writer = crate::dist::is_writer();
        let metrics = self.out_dir.join("metrics.jsonl");
        let mut log = writer.then(|| JsonlWriter::append(&metrics)).transpose()?;
        let mut observer = self.observer;
        let mut records = Vec::new();
        for epoch in state.epoch..cfg.epochs {
            let lr = schedule.lr_at(epoch);
            optim.set_lr(lr);
            let label = format!("{} {}/{}", self.name, epoch + 1, cfg.epochs);
            let mut step = state.step;
            let summary = run_epoch(
                len,
                cfg.batch_size,
                &mut state.rng,
                &label,
                self.show_progress && writer,
                |global| {
                    let idx = dp.local(global);
                    let l = dp.weighted(loss(idx)?, idx.len(), global.len())?;
                    let value = guard::finite_loss(&l, step).with_context(|| {
                        format!(
                            "stage {} stopped; the last good checkpoint is {}",
                            self.name,
                            last.display()
                        )
                    })?;
                    let mut grads = Gradients::backward(&l, slots)?;
                    guard::all_have_gradients(&grads, &trainable)?;
                    dp.reduce(&mut grads, &trainable)?;
                    if let Some(o) = observer.as_mut() {
                        o.after_step(&grads, &trainable)?;
                    }
                    optim.step(&grads)?;
                    step += 1;
                    dp.check_drift(self.varmap, step, false)?;
                    let value = dp.global_loss(value);
                    if writer {
                        tracing::debug!(target: "spikeclip::steps", "step {step} loss {value}");
                    }
                    Ok(value)
                },
            )?;
            dp.check_drift(self.varmap, step, true)?;
            state.step = step;
            state.epoch = epoch + 1;
            let score = match metric.as_mut() {
                Some(m) => Some(m()?),
                None => None,
            };
            let is_best = score.is_some_and(|s| state.record_metric(s));
            // Rank 0 alone writes the job's files.
            if writer {
                checkpoint::save(&last, self.varmap, &optim, &state)?;
                if is_best {
                    checkpoint::write_atomic_with(&best, |tmp| {
                        std::fs::copy(&last, tmp)?;
                        Ok(())
                    })?;
                }
            }
            let record = EpochRecord {
                stage: self.name.to_string(),
                epoch: epoch + 1,
                step: state.step,
                lr,
                loss: summary.mean_loss,
                metric: score,
                items_per_s: summary.items_per_s,
                device: device.clone(),
            };
            if let Some(log) = log.as_mut() {
                log.write(&record)?;
                tracing::info!(
                    "{} epoch {}/{}: loss {:.4}{} ({:.0} items/s){}",
                    self.name,
                    epoch + 1,
                    cfg.epochs,
                    summary.mean_loss,
                    score.map_or(String::new(), |s| format!(", metric {s:.4}")),
                    summary.items_per_s,
                    dp.traffic().map_or(String::new(), |t| format!(", {t}"))
                );
            }
            if let Some(o) = observer.as_mut() {
                o.after_epoch(&record)?;
            }
            records.push(record);
        }
        Ok(StageOutcome {
            epochs: records,
            last,
            best: state.best_metric.map(|_| best),
        })
    }
}
