//! Bench cases for the full paper model ("4-384", T = 4, 32x32 images): the training steps and
//! inference passes of both towers, to compare with the PyTorch + SpikingJelly reference
//! (`scripts/bench_reference.py`). A step takes seconds, hence the smaller default budget
//! (`--iters 5 --warmup 1`).

use candle_core::{Device, Tensor};

use super::Case;
use crate::bench::{measure, BenchResult, Budget};
use crate::model::config::SpikeClipConfig;
use crate::model::SpikeClip;
use crate::recipe::student::{trainable, Student};
use crate::train::loss::cosine_distillation;
use crate::train::optim::{Adam, AdamConfig};
use crate::train::rng::Rng;

pub const CASES: &[Case] = &[
    ("img_train_b32", img_train_b32),
    ("img_train_b64", img_train_b64),
    ("img_infer_b64", img_infer_b64),
    ("txt_train_b256", txt_train_b256),
    ("txt_infer_b1024", txt_infer_b1024),
];

/// Default budget of these cases.
pub const BUDGET: Budget = Budget {
    warmup: 1,
    iters: 5,
};

/// The paper's model with fresh weights.
fn paper_model() -> anyhow::Result<SpikeClip> {
    let cfg = SpikeClipConfig::preset("paper")?;
    Ok(SpikeClip::new(&cfg, 0, &Device::Cpu)?)
}

/// Random CLIP-normalised-like images `[b, 3, 32, 32]`.
fn images(b: usize) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &Device::Cpu)?)
}

/// Random token ids `[b, L]` in the model's vocabulary.
fn token_ids(model: &SpikeClip, b: usize) -> anyhow::Result<Tensor> {
    let c = &model.config.text;
    let mut rng = Rng::new(0);
    let ids: Vec<u32> = (0..b * c.context_length)
        .map(|_| rng.below(c.vocab_size) as u32)
        .collect();
    Ok(Tensor::from_vec(ids, (b, c.context_length), &Device::Cpu)?)
}

/// One distillation step of the tower under `prefix`: features in training mode, `1 - cos`
/// against random teacher features, backward, Adam over all of the tower's parameters.
fn train_step(
    budget: Budget,
    model: &SpikeClip,
    prefix: &str,
    input: &Tensor,
    features: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> anyhow::Result<BenchResult> {
    let b = input.dim(0)?;
    let targets = Tensor::randn(0f32, 1.0, (b, model.config.out_dim), &Device::Cpu)?;
    let mut adam = Adam::new(trainable(model, prefix), AdamConfig::default());
    let result = measure(budget, || {
        let loss = cosine_distillation(&features(input)?, &targets)?;
        adam.step(&loss.backward()?)?;
        Ok(())
    })?;
    Ok(result.per_step(b))
}

fn img_train(budget: Budget, b: usize) -> anyhow::Result<BenchResult> {
    let model = paper_model()?;
    train_step(budget, &model, "image.", &images(b)?, |x| {
        model.image_features(x, true)
    })
}

fn img_train_b32(budget: Budget) -> anyhow::Result<BenchResult> {
    img_train(budget, 32)
}

fn img_train_b64(budget: Budget) -> anyhow::Result<BenchResult> {
    img_train(budget, 64)
}

/// Eval-mode image features of 64 images (BatchNorm on running statistics).
fn img_infer_b64(budget: Budget) -> anyhow::Result<BenchResult> {
    let model = paper_model()?;
    let x = images(64)?;
    let result = measure(budget, || {
        model.image_features(&x, false)?;
        Ok(())
    })?;
    Ok(result.per_step(64))
}

/// A text training step on 256 random sentences; the embeddings are trained too.
fn txt_train_b256(budget: Budget) -> anyhow::Result<BenchResult> {
    let model = paper_model()?;
    let ids = token_ids(&model, 256)?;
    train_step(budget, &model, "text.", &ids, |ids| {
        model.text_features(ids, true)
    })
}

fn txt_infer_b1024(budget: Budget) -> anyhow::Result<BenchResult> {
    let model = paper_model()?;
    let ids = token_ids(&model, 1024)?;
    let result = measure(budget, || {
        model.text_features(&ids, false)?;
        Ok(())
    })?;
    Ok(result.per_step(1024))
}
