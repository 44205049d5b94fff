//! The health log of a recipe run (`demo --health`): after every epoch of every stage, one
//! line of `health.jsonl` with what tells a spiking student that trains from one that stalls —
//! zero-shot top-1 on the world's validation splits (the learning curve), every LIF layer's
//! firing rate per time step (dead or saturated layers), each parameter's gradient RMS over the
//! epoch's steps (how much surrogate gradient reaches it) beside its weight RMS, the TDW
//! weights and how far they moved from their start, and the BatchNorm statistics.
//!
//! The probe only reads: gradients before the optimiser uses them, and eval-mode passes that
//! update no running statistics and draw no random numbers, so a run with the log follows the
//! same path as one without.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::stages::{teacher_zero_shot, zero_shot};
use super::student::Student;
use super::world_recipe::WorldRecipe;
use crate::data::world::{Split, World, WorldImages, DATASET};
use crate::energy::EncoderOps;
use crate::eval::zeroshot::{class_embeddings, TopK};
use crate::model::readout::{tdw_init, TDW_NAME};
use crate::teacher::TextTeacher;
use crate::train::checkpoint::named_vars;
use crate::train::grads::{Grad, Gradients};
use crate::train::metrics::JsonlWriter;
use crate::train::stage::{EpochRecord, StageObserver};

/// One LIF layer's firing over an evaluation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerFiring {
    pub layer: String,
    /// Spikes per neuron per step over all steps.
    pub rate: f64,
    pub per_step: Vec<f64>,
}

/// One parameter's gradient over an epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGradient {
    pub param: String,
    /// Root of the mean over the epoch's steps of the gradient's mean square.
    pub grad_rms: f64,
    /// The parameter's own RMS at the end of the epoch, the scale the gradient moves.
    pub weight_rms: f64,
}

/// A TDW readout's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TdwState {
    pub param: String,
    pub weights: Vec<f32>,
    /// Euclidean distance from the paper's initialisation, ln(0.1, 0.2, 0.4, 0.8) at T = 4.
    pub moved: f64,
}

/// A BatchNorm layer's statistics, each averaged over its channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchNormStats {
    pub layer: String,
    pub running_mean: f64,
    pub running_var: f64,
    pub gamma: f64,
    pub beta: f64,
}

/// Validation top-1 on seen and unseen pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeenUnseen {
    pub seen: f64,
    pub unseen: f64,
}

/// One line of `health.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub stage: String,
    pub epoch: usize,
    pub loss: f64,
    pub val_seen_top1: f64,
    pub val_unseen_top1: f64,
    /// The student's image encoder against the teacher's class embeddings: how much of the
    /// top-1 the image side alone would give.
    pub image_side: SeenUnseen,
    /// The teacher's image features against the student's class embeddings: the text side alone.
    pub text_side: SeenUnseen,
    /// Empty for a student without spikes.
    pub firing: Vec<LayerFiring>,
    pub gradients: Vec<ParamGradient>,
    pub tdw: Vec<TdwState>,
    pub batch_norm: Vec<BatchNormStats>,
}

/// The [`StageObserver`] that writes the health log of one student's run.
pub struct HealthProbe<'a> {
    recipe: &'a WorldRecipe,
    student: &'a dyn Student,
    log: JsonlWriter,
    /// Per parameter: the sum over steps of the gradient's mean square, and the steps.
    squares: BTreeMap<String, (f64, usize)>,
}

impl<'a> HealthProbe<'a> {
    /// Appends to `dir/health.jsonl`.
    pub fn new(
        recipe: &'a WorldRecipe,
        student: &'a dyn Student,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            recipe,
            student,
            log: JsonlWriter::append(&dir.join("health.jsonl"))?,
            squares: BTreeMap::new(),
        })
    }

    /// Validation top-1 on seen and unseen pairs, with the firing of every LIF layer during it
    /// (the image layers over the validation images, the text layers over the class prompts).
    fn validate(&self) -> anyhow::Result<([SeenUnseen; 3], Vec<LayerFiring>)> {
        let world = &self.recipe.world;
        let dev = &self.recipe.device;
        let prompts = &World::prompts().datasets[DATASET];
        let teacher = class_embeddings(prompts, |t| world.teacher().text_features(t))?;
        let score = || -> anyhow::Result<[SeenUnseen; 3]> {
            let student = self.recipe.class_embeddings(self.student, prompts)?;
            let both =
                |data: &WorldImages, classes: &Tensor| zero_shot(self.student, data, classes, dev);
            let teacher_images =
                |data: &WorldImages, classes: &Tensor| teacher_zero_shot(data, classes, dev);
            let pair = |f: &dyn Fn(&WorldImages, &Tensor) -> anyhow::Result<TopK>,
                        classes: &Tensor|
             -> anyhow::Result<SeenUnseen> {
                Ok(SeenUnseen {
                    seen: f(&world.images(Split::ValSeen), classes)?.top1(),
                    unseen: f(&world.images(Split::ValUnseen), classes)?.top1(),
                })
            };
            Ok([
                pair(&both, &student)?,
                pair(&both, &teacher)?,
                pair(&teacher_images, &student)?,
            ])
        };
        let Some(encoders) = self.student.energy_ops() else {
            return Ok((score()?, Vec::new()));
        };
        let mut score = score;
        let top1 = record_all(&encoders, &mut score)?;
        let firing = encoders
            .iter()
            .flat_map(|enc| {
                let counts = enc.monitors.counts();
                enc.monitors
                    .names()
                    .map(|layer| LayerFiring {
                        layer: layer.to_string(),
                        rate: counts[layer].firing_rate(),
                        per_step: counts[layer].per_step_rates(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok((top1, firing))
    }

    fn gradients(&mut self) -> anyhow::Result<Vec<ParamGradient>> {
        let vars: BTreeMap<String, Var> = named_vars(self.student.varmap()).into_iter().collect();
        let rows = std::mem::take(&mut self.squares)
            .into_iter()
            .map(|(param, (sum, steps))| {
                let weight_rms = mean_square(vars[&param].as_tensor())?.sqrt();
                Ok(ParamGradient {
                    grad_rms: (sum / steps.max(1) as f64).sqrt(),
                    weight_rms,
                    param,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(rows)
    }
}

impl StageObserver for HealthProbe<'_> {
    fn after_step(&mut self, grads: &Gradients, trainable: &[(String, Var)]) -> anyhow::Result<()> {
        for (name, var) in trainable {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let square = grad_mean_square(grad, var.as_tensor().elem_count())?;
            let entry = self.squares.entry(name.clone()).or_insert((0.0, 0));
            entry.0 += square;
            entry.1 += 1;
        }
        Ok(())
    }

    fn after_epoch(&mut self, record: &EpochRecord) -> anyhow::Result<()> {
        let ([both, image_side, text_side], firing) = self.validate()?;
        let tdw = tdw_weights(self.student)?
            .into_iter()
            .map(|(param, weights)| {
                let start = tdw_init(weights.len());
                let moved = weights
                    .iter()
                    .zip(&start)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                TdwState {
                    param,
                    weights,
                    moved,
                }
            })
            .collect();
        let line = HealthRecord {
            stage: record.stage.clone(),
            epoch: record.epoch,
            loss: record.loss,
            val_seen_top1: both.seen,
            val_unseen_top1: both.unseen,
            image_side,
            text_side,
            firing,
            gradients: self.gradients()?,
            tdw,
            batch_norm: batch_norm_stats(self.student)?,
        };
        self.log.write(&line)
    }
}

/// Runs `work` with the monitors of every encoder counting: each encoder's monitors count only
/// its own layers, so their recordings nest.
fn record_all<R>(
    encoders: &[EncoderOps],
    work: &mut dyn FnMut() -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    match encoders.split_first() {
        None => work(),
        Some((first, rest)) => Ok(first.monitors.record(|| record_all(rest, work))?.0),
    }
}

fn mean_square(t: &Tensor) -> anyhow::Result<f64> {
    Ok(f64::from(t.sqr()?.mean_all()?.to_scalar::<f32>()?))
}

fn sum_squares(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v) * f64::from(v)).sum()
}

/// Mean square of a gradient of `len` values, whichever form it takes.
fn grad_mean_square(grad: Grad, len: usize) -> anyhow::Result<f64> {
    let total = match grad {
        Grad::Tensor(t) => return mean_square(t),
        Grad::Values(v) => sum_squares(v),
        Grad::Rows(rows) => rows
            .rows()
            .iter()
            .filter_map(|&id| rows.row(id as usize))
            .map(sum_squares)
            .sum(),
        Grad::Product(product) => {
            let (o, k) = product.dims();
            let mut dense = vec![0f32; o * k];
            product.write_into(&mut dense)?;
            sum_squares(&dense)
        }
    };
    Ok(total / len.max(1) as f64)
}

/// Every TDW weight vector of the student, by parameter name.
fn tdw_weights(student: &dyn Student) -> anyhow::Result<Vec<(String, Vec<f32>)>> {
    named_vars(student.varmap())
        .into_iter()
        .filter(|(name, _)| name.ends_with(TDW_NAME))
        .map(|(name, var)| Ok((name, var.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// Channel means of every BatchNorm's running statistics and affine parameters.
fn batch_norm_stats(student: &dyn Student) -> anyhow::Result<Vec<BatchNormStats>> {
    let vars: BTreeMap<String, Var> = named_vars(student.varmap()).into_iter().collect();
    let mean = |name: String| -> anyhow::Result<f64> {
        let t = vars
            .get(&name)
            .ok_or_else(|| anyhow::anyhow!("BatchNorm parameter {name} is missing"))?;
        Ok(f64::from(t.as_tensor().mean_all()?.to_scalar::<f32>()?))
    };
    vars.keys()
        .filter_map(|name| name.strip_suffix(".running_mean"))
        .map(|layer| {
            Ok(BatchNormStats {
                running_mean: mean(format!("{layer}.running_mean"))?,
                running_var: mean(format!("{layer}.running_var"))?,
                gamma: mean(format!("{layer}.weight"))?,
                beta: mean(format!("{layer}.bias"))?,
                layer: layer.to_string(),
            })
        })
        .collect()
}
