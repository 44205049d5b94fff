//! Bench cases for the full paper model ("4-384", T = 4, 32x32 images): the training steps and
//! inference passes of both towers, to compare with the PyTorch + SpikingJelly reference
//! (`scripts/bench_reference.py`). A step takes seconds, hence the smaller default budget
//! (`--iters 5 --warmup 1`).

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use super::{Case, Run};
use crate::bench::{measure_on, set_batch_norm_shift, BenchResult, Budget};
use crate::kernels::grad_slot::GradSlot;
use crate::model::config::SpikeClipConfig;
use crate::model::spikingformer::ImageEncoder;
use crate::model::spikingformer::SparseWeights;
use crate::model::{SpikeClip, Tower};
use crate::ops::Ops;
use crate::recipe::student::trainable_in;
use crate::train::grads::Gradients;
use crate::train::loss::cosine_distillation;
use crate::train::optim::{Adam, AdamConfig};
use crate::train::rng::Rng;

pub const CASES: &[Case] = &[
    ("img_train_b32", Run::OnDevice(img_train_b32)),
    ("img_train_b64", Run::OnDevice(img_train_b64)),
    ("img_infer_b64", Run::OnDevice(img_infer_b64)),
    ("img_infer_b64_dense", Run::OnDevice(img_infer_b64_dense)),
    ("sparse_sweep", Run::Cpu(sparse_sweep)),
    ("txt_train_b256", Run::OnDevice(txt_train_b256)),
    ("txt_infer_b1024", Run::OnDevice(txt_infer_b1024)),
];

/// Default budget of these cases.
pub const BUDGET: Budget = Budget {
    warmup: 1,
    iters: 5,
};

/// The paper's image tower with fresh weights, built alone (see [`crate::model::Tower`]).
fn paper_image_tower(cfg: &SpikeClipConfig, dev: &Device) -> anyhow::Result<Tower<ImageEncoder>> {
    Ok(SpikeClip::image_tower(cfg, 0, dev)?)
}

/// Random CLIP-normalised-like images `[b, 3, 32, 32]`.
fn images(b: usize, dev: &Device) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, (b, 3, 32, 32), dev)?)
}

/// Random token ids `[b, L]` in the model's vocabulary.
fn token_ids(cfg: &SpikeClipConfig, b: usize, dev: &Device) -> anyhow::Result<Tensor> {
    let c = &cfg.text;
    let mut rng = Rng::new(0);
    let ids: Vec<u32> = (0..b * c.context_length)
        .map(|_| rng.below(c.vocab_size) as u32)
        .collect();
    Ok(Tensor::from_vec(ids, (b, c.context_length), dev)?)
}

/// One distillation step of a tower of the model `cfg` built alone (its parameters in `varmap`
/// under `prefix`, its gradient slots `slots`): features in training mode, `1 - cos` against
/// random teacher features, backward, Adam over all of the tower's parameters. Under
/// MPI, a data-parallel step: each rank takes its part of the batch and the gradients are
/// summed over the ranks (their bytes and time printed by rank 0).
fn train_step(
    (budget, cfg): (Budget, &SpikeClipConfig),
    (varmap, prefix, slots): (&VarMap, &str, Vec<GradSlot>),
    input: &Tensor,
    features: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> anyhow::Result<BenchResult> {
    let b = input.dim(0)?;
    let dev = input.device();
    let job = crate::dist::collective();
    let rows: Vec<usize> = (0..b).collect();
    let mine = crate::dist::shard(&rows, job);
    let input = input.narrow(0, mine.first().copied().unwrap_or(0), mine.len())?;
    let targets = Tensor::randn(0f32, 1.0, (mine.len(), cfg.out_dim), dev)?;
    let params = trainable_in(varmap, prefix);
    let mut adam = Adam::new(params.clone(), AdamConfig::default());
    let (mut steps, mut bytes, mut reduce_s) = (0usize, 0usize, 0f64);
    let bn_before = crate::dist::BATCH_NORM_TRAFFIC.read();
    let result = measure_on(dev, budget, || {
        let mut loss = cosine_distillation(&features(&input)?, &targets)?;
        if job.size() > 1 {
            loss = (loss * (mine.len() as f64 / b as f64))?;
        }
        let mut grads = Gradients::backward(&loss, &slots)?;
        let start = std::time::Instant::now();
        bytes += grads.all_reduce(&params, job)?;
        reduce_s += start.elapsed().as_secs_f64();
        steps += 1;
        adam.step(&grads)?;
        Ok(())
    })?;
    if job.size() > 1 && crate::dist::is_writer() {
        let bn = crate::dist::BATCH_NORM_TRAFFIC.read();
        let per_step = |a: f64, b: f64| (a - b) / steps as f64;
        eprintln!(
            "{} ranks: all-reduce {:.1} MB in {:.1} ms per step; synchronised BatchNorm {:.0} \
             all-reduces of {:.0} bytes in all, {:.1} ms per step",
            job.size(),
            bytes as f64 / steps as f64 / 1e6,
            1e3 * reduce_s / steps as f64,
            per_step(bn.0 as f64, bn_before.0 as f64),
            per_step(bn.1 as f64, bn_before.1 as f64),
            1e3 * per_step(bn.2, bn_before.2),
        );
    }
    Ok(result.per_step(b))
}

fn img_train(budget: Budget, b: usize, dev: &Device) -> anyhow::Result<BenchResult> {
    let cfg = SpikeClipConfig::preset("paper")?;
    let tower = paper_image_tower(&cfg, dev)?;
    let params = (&tower.varmap, "image.", Vec::new());
    train_step((budget, &cfg), params, &images(b, dev)?, |x| {
        tower.encoder.forward(x, true)
    })
}

fn img_train_b32(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    img_train(budget, 32, dev)
}

fn img_train_b64(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    img_train(budget, 64, dev)
}

/// BatchNorm shift of the inference cases: a fresh model's spikes die out after a few layers,
/// this one fires at about the rates of a trained one (printed with the result).
const INFER_SHIFT: f32 = 0.5;

/// Which image-encoder path an inference case runs.
#[derive(Debug, Clone, Copy)]
enum ImagePath {
    Dense,
    Sparse,
}

/// Eval-mode image features of `x` on one path.
struct ImageInference<'a> {
    encoder: &'a ImageEncoder,
    /// Folded weights for the sparse path, prepared once outside the timing.
    sparse: Option<SparseWeights>,
}

impl<'a> ImageInference<'a> {
    fn new(encoder: &'a ImageEncoder, path: ImagePath) -> anyhow::Result<Self> {
        let sparse = match path {
            ImagePath::Dense => None,
            ImagePath::Sparse => Some(encoder.sparse_weights()?),
        };
        Ok(Self { encoder, sparse })
    }

    fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.sparse {
            None => self.encoder.forward(x, false),
            Some(w) => self.encoder.forward_sparse(x, w),
        }
    }

    fn time(&self, budget: Budget, x: &Tensor) -> anyhow::Result<BenchResult> {
        let result = measure_on(x.device(), budget, || {
            self.features(x)?;
            Ok(())
        })?;
        Ok(result.per_step(x.dim(0)?))
    }

    /// Spikes per neuron-step over all of the encoder's LIF layers in one pass on `x`.
    fn firing_rate(&self, x: &Tensor) -> anyhow::Result<f64> {
        let lifs = self.encoder.lif_layers();
        for l in &lifs {
            l.lif.monitor().reset();
            l.lif.monitor().enable();
        }
        self.features(x)?;
        let (mut spikes, mut steps) = (0, 0);
        for l in &lifs {
            let c = l.lif.monitor().counts();
            (spikes, steps) = (spikes + c.spikes, steps + c.neuron_steps);
            l.lif.monitor().disable();
        }
        Ok(spikes as f64 / steps.max(1) as f64)
    }
}

/// Eval-mode features of 64 images on `path`, the paper's model shifted to fire at inference
/// rates (printed).
fn img_infer_b64_on(budget: Budget, path: ImagePath, dev: &Device) -> anyhow::Result<BenchResult> {
    let tower = paper_image_tower(&SpikeClipConfig::preset("paper")?, dev)?;
    set_batch_norm_shift(&tower.varmap, INFER_SHIFT)?;
    let x = images(64, dev)?;
    let infer = ImageInference::new(&tower.encoder, path)?;
    println!("  firing rate {:.3}", infer.firing_rate(&x)?);
    infer.time(budget, &x)
}

/// Eval-mode image features of 64 images on the path `eval` and `classify` take: with the
/// fused ops spike-driven, BatchNorm folded from the running statistics; with the portable
/// ones (a GPU, `--ops portable`) dense, as they have no spike-driven path.
fn img_infer_b64(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let path = match Ops::for_device(dev) {
        Ops::Fused => ImagePath::Sparse,
        Ops::Portable => ImagePath::Dense,
    };
    img_infer_b64_on(budget, path, dev)
}

/// The same through the dense path (`--dense`).
fn img_infer_b64_dense(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    img_infer_b64_on(budget, ImagePath::Dense, dev)
}

/// One point of the firing-rate sweep.
#[derive(Debug, Serialize)]
struct SweepPoint {
    batch_norm_shift: f32,
    firing_rate: f64,
    dense_median_s: f64,
    sparse_median_s: f64,
    /// Dense time over sparse time: above 1 the sparse path is faster.
    speedup: f64,
}

/// BatchNorm shifts of the sweep, chosen to span about 5 to 40 % firing on the paper's model.
const SWEEP_SHIFTS: [f32; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// Images per sweep step: a quarter of the inference batch keeps ten timings short.
const SWEEP_BATCH: usize = 16;

/// The whole image encoder, dense and sparse, at rising firing rates (raised by shifting every
/// BatchNorm), with the rate where the sparse path stops paying off. The case's own timing is
/// the dense one at the middle shift; the table is in `details`.
fn sparse_sweep(budget: Budget) -> anyhow::Result<BenchResult> {
    let tower = paper_image_tower(&SpikeClipConfig::preset("paper")?, &Device::Cpu)?;
    let x = images(SWEEP_BATCH, &Device::Cpu)?;
    let mut points = Vec::new();
    let mut middle = None;
    println!(
        "  {:>6} {:>8} {:>9} {:>9} {:>8}",
        "shift", "firing", "dense_s", "sparse_s", "speedup"
    );
    for (i, &shift) in SWEEP_SHIFTS.iter().enumerate() {
        set_batch_norm_shift(&tower.varmap, shift)?;
        let dense_path = ImageInference::new(&tower.encoder, ImagePath::Dense)?;
        let rate = dense_path.firing_rate(&x)?;
        let dense = dense_path.time(budget, &x)?;
        let sparse = ImageInference::new(&tower.encoder, ImagePath::Sparse)?.time(budget, &x)?;
        let point = SweepPoint {
            batch_norm_shift: shift,
            firing_rate: rate,
            dense_median_s: dense.median_s,
            sparse_median_s: sparse.median_s,
            speedup: dense.median_s / sparse.median_s,
        };
        println!(
            "  {:>6.2} {:>7.1}% {:>9.4} {:>9.4} {:>7.2}x",
            shift,
            100.0 * rate,
            point.dense_median_s,
            point.sparse_median_s,
            point.speedup
        );
        points.push(point);
        if i == SWEEP_SHIFTS.len() / 2 {
            middle = Some(dense);
        }
    }
    let crossover = crossover(&points);
    match crossover {
        Some(rate) => println!("  sparse is faster below about {:.1}% firing", 100.0 * rate),
        None if points.iter().all(|p| p.speedup > 1.0) => {
            println!("  sparse is faster at every measured rate")
        }
        None if points.iter().all(|p| p.speedup < 1.0) => {
            println!("  sparse is slower at every measured rate")
        }
        None => println!("  no clean crossover: see the table"),
    }
    let mut result = middle.expect("the sweep has a middle point");
    result.details = Some(serde_json::json!({
        "batch": SWEEP_BATCH,
        "points": points,
        "crossover_firing_rate": crossover,
    }));
    Ok(result)
}

/// The firing rate where the speedup falls through 1, interpolated linearly between the two
/// points around it (points in rising firing rate); `None` if it never does.
fn crossover(points: &[SweepPoint]) -> Option<f64> {
    points.windows(2).find_map(|w| {
        let (a, b) = (&w[0], &w[1]);
        (a.speedup >= 1.0 && b.speedup < 1.0).then(|| {
            let t = (a.speedup - 1.0) / (a.speedup - b.speedup);
            a.firing_rate + t * (b.firing_rate - a.firing_rate)
        })
    })
}

/// A text training step on 256 random sentences; the embeddings are trained too.
fn txt_train_b256(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let cfg = SpikeClipConfig::preset("paper")?;
    let tower = SpikeClip::text_tower(&cfg, 0, dev)?;
    let ids = token_ids(&cfg, 256, dev)?;
    let params = (&tower.varmap, "text.", tower.encoder.grad_slots());
    train_step((budget, &cfg), params, &ids, |ids| {
        tower.encoder.forward(ids, true)
    })
}

fn txt_infer_b1024(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let cfg = SpikeClipConfig::preset("paper")?;
    let tower = SpikeClip::text_tower(&cfg, 0, dev)?;
    let ids = token_ids(&cfg, 1024, dev)?;
    let result = measure_on(dev, budget, || {
        tower.encoder.forward(&ids, false)?;
        Ok(())
    })?;
    Ok(result.per_step(1024))
}
