//! `spikeclip bench`: the benchmark cases, timed by [`crate::bench`].

mod child;
mod kernels;
mod model;

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use image::RgbImage;

use crate::bench::{measure, measure_on, BenchResult, Budget};
use crate::data::cache::{cache_images, Cache, CacheOptions};
use crate::data::sources::ImageSource;
use crate::data::world::{Split, World, WorldConfig};
use crate::data::ImageFeatureSet;
use crate::kernels::simd;
use crate::neuron::{LifConfig, MultiStepLif};
use crate::ops::device;
use crate::teacher::clip::{ClipConfig, ClipModel};
use crate::teacher::preprocess::Preprocessor;
use crate::teacher::ImageTeacher;
use crate::train::grads::Gradients;
use crate::train::init::seeded_var_builder;
use crate::train::optim::{Adam, AdamConfig};
use crate::train::rng::Rng;

#[derive(clap::Args)]
pub struct Args {
    /// Run only these cases, comma-separated (default: all; several run each in a child
    /// process, so each one's peak RSS is its own). Cases: lif_fwd_bwd, world_batch,
    /// adam_step, clip_b16_images, clip_b16_texts, cache_read, the kernels' (conv_*, spike_*,
    /// dense_*) and the full paper model's (img_*, txt_*, sparse_sweep); an unknown name lists
    /// them all.
    #[arg(long, value_delimiter = ',')]
    case: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Timed iterations per case (default: 20, or 5 for the full-model cases, whose steps take
    /// seconds).
    #[arg(long)]
    iters: Option<usize>,
    /// Untimed warm-up iterations per case (default: 3, or 1 for the full-model cases).
    #[arg(long)]
    warmup: Option<usize>,
}

/// How a case runs, which decides where: the cases that time our fused CPU kernels run on the
/// CPU only, the others on the run's `--device`.
#[derive(Clone, Copy)]
pub enum Run {
    Cpu(fn(Budget) -> anyhow::Result<BenchResult>),
    OnDevice(fn(Budget, &Device) -> anyhow::Result<BenchResult>),
}

impl Run {
    fn run(self, name: &str, budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
        match self {
            Run::OnDevice(case) => case(budget, dev),
            Run::Cpu(case) if dev.is_cpu() => case(budget),
            Run::Cpu(_) => bail!(
                "bench case {name} times a fused CPU kernel; run it with --device cpu, not {}",
                device::name(dev)
            ),
        }
    }
}

type Case = (&'static str, Run);

const CASES: &[Case] = &[
    ("lif_fwd_bwd", Run::Cpu(lif_fwd_bwd)),
    ("world_batch", Run::OnDevice(world_batch)),
    ("adam_step", Run::OnDevice(adam_step)),
    ("clip_b16_images", Run::OnDevice(clip_b16_images)),
    ("clip_b16_texts", Run::OnDevice(clip_b16_texts)),
    ("cache_read", Run::OnDevice(cache_read)),
];

/// Default budget of the cases that take milliseconds per step.
const QUICK: Budget = Budget {
    warmup: 3,
    iters: 20,
};

/// Every case with its default budget: the end-to-end ones above, the kernels', then the full
/// model's.
fn all_cases() -> impl Iterator<Item = (&'static Case, Budget)> {
    CASES
        .iter()
        .chain(kernels::CASES)
        .map(|c| (c, QUICK))
        .chain(model::CASES.iter().map(|c| (c, model::BUDGET)))
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let selected: Vec<_> = if args.case.is_empty() {
        all_cases().collect()
    } else {
        args.case
            .iter()
            .map(|name| match all_cases().find(|((n, _), _)| n == name) {
                Some(case) => Ok(case),
                None => bail!(
                    "unknown bench case {name:?}; cases: {}",
                    all_cases()
                        .map(|((n, _), _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect::<anyhow::Result<_>>()?
    };
    print_kernel_paths();
    println!("device: {}", device::name(dev));
    println!(
        "{:<20} {:>11} {:>11} {:>11} {:>12} {:>12}  (threads: {})",
        "case",
        "median_s",
        "min_s",
        "max_s",
        "peak_rss_mib",
        "items_per_s",
        rayon::current_num_threads()
    );
    let in_children = selected.len() > 1;
    let mut results = serde_json::Map::new();
    for (&(name, case), default) in selected {
        let r = if in_children {
            child::run_case(name, args.iters, args.warmup, dev)?
        } else {
            let budget = Budget {
                warmup: args.warmup.unwrap_or(default.warmup),
                iters: args.iters.unwrap_or(default.iters).max(1),
            };
            case.run(name, budget, dev)
                .with_context(|| format!("bench case {name}"))?
        };
        let throughput = r
            .throughput_per_s
            .map_or(String::new(), |t| format!("{t:.1}"));
        println!(
            "{:<20} {:>11.5} {:>11.5} {:>11.5} {:>12.1} {:>12}",
            name, r.median_s, r.min_s, r.max_s, r.peak_rss_mib, throughput
        );
        results.insert(name.to_string(), serde_json::to_value(&r)?);
        // Each case says where it ran: the fused-kernel cases only ever run on the CPU.
        results[name]["device"] = match case {
            Run::Cpu(_) => "cpu".into(),
            Run::OnDevice(_) => device::name(dev).into(),
        };
    }
    if let Some(path) = args.json.filter(|_| crate::dist::is_writer()) {
        let text = serde_json::to_string_pretty(&results)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The CPU and the instruction set each hot kernel runs at (see [`simd`]), so that a timing
/// says what it measured.
fn print_kernel_paths() {
    println!("cpu: {}", simd::cpu_model());
    let mut paths: Vec<String> = simd::KERNELS
        .iter()
        .map(|k| format!("{} {}", k.name, k.level()))
        .collect();
    paths.push(format!("matmul {}", simd::matmul_level()));
    println!("simd: {}", paths.join(", "));
}

/// The LIF op forward and backward on the Spikingformer tokenizer's output shape.
fn lif_fwd_bwd(budget: Budget) -> anyhow::Result<BenchResult> {
    let dev = Device::Cpu;
    // Mean 0.5, std 1: about 20 % of neuron-steps fire.
    let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (4, 32, 384, 8, 8), &dev)? + 0.5)?)?;
    let g = Tensor::randn(0f32, 1.0, (4, 32, 384, 8, 8), &dev)?;
    let lif = MultiStepLif::new(LifConfig::default());
    measure(budget, || {
        let s = lif.forward(x.as_tensor())?;
        let grads = (s * &g)?.sum_all()?.backward()?;
        grads.get(x.as_tensor()).context("no gradient")?;
        Ok(())
    })
}

/// Generating one training batch of the built-in world (256 images with teacher features):
/// the world is rendered on the fly every epoch, so this bounds the demo's data cost.
fn world_batch(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let images = World::new(WorldConfig::default()).images(Split::Train);
    let indices: Vec<usize> = (0..256).collect();
    measure_on(dev, budget, || {
        images.batch(&indices, dev)?;
        Ok(())
    })
}

/// One AMSGrad step over 4M parameters (about a small Spikingformer), the optimiser's share
/// of every training step.
fn adam_step(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let params: Vec<(String, Var)> = (0..4)
        .map(|i| Ok((format!("w{i}"), Var::randn(0f32, 1.0, (1024, 1024), dev)?)))
        .collect::<anyhow::Result<_>>()?;
    let squares = params
        .iter()
        .map(|(_, v)| v.as_tensor().sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let grads = Tensor::stack(&squares, 0)?.sum_all()?.backward()?;
    let amsgrad = AdamConfig {
        amsgrad: true,
        ..Default::default()
    };
    let mut adam = Adam::new(params, amsgrad);
    let grads = Gradients::from(grads);
    measure_on(dev, budget, || Ok(adam.step(&grads)?))
}

/// CLIP ViT-B/16 (the paper's teacher) with random weights.
fn clip_b16(dev: &Device) -> anyhow::Result<ClipModel> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, DType::F32, dev);
    ClipModel::new(vb, &ClipConfig::vit_b16())
}

/// Teacher image features for 8 images at 224x224: images/s = 8 / median_s. Bounds the
/// one-off cost of `spikeclip cache` over a dataset.
fn clip_b16_images(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let model = clip_b16(dev)?;
    let pixels = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), dev)?;
    measure_on(dev, budget, || {
        model.image_features(&pixels)?;
        Ok(())
    })
}

/// Teacher text features for 32 sentences of 77 tokens: texts/s = 32 / median_s (D-text).
fn clip_b16_texts(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let model = clip_b16(dev)?;
    let ids: Vec<u32> = (0..32 * 77).map(|i| (i * 7919 % 49405) as u32).collect();
    let ids = Tensor::from_vec(ids, (32, 77), dev)?;
    measure_on(dev, budget, || {
        model.text_features(&ids, 49407)?;
        Ok(())
    })
}

/// Blank 32x32 images: the cache_read case times reading, not decoding.
struct BlankImages(Vec<String>);

impl ImageSource for BlankImages {
    fn len(&self) -> usize {
        8192
    }
    fn class_names(&self) -> &[String] {
        &self.0
    }
    fn label(&self, index: usize) -> u32 {
        (index % 10) as u32
    }
    fn image(&self, _: usize) -> anyhow::Result<RgbImage> {
        Ok(RgbImage::new(32, 32))
    }
}

/// Stands in for CLIP so building the cache is quick; features are 512-d as ViT-B/16's.
struct RandomTeacher;

impl ImageTeacher for RandomTeacher {
    fn image_size(&self) -> usize {
        32
    }
    fn image_features(&self, pixels: &Tensor) -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(
            0f32,
            1.0,
            (pixels.dim(0)?, 512),
            pixels.device(),
        )?)
    }
}

/// One training batch of 256 random rows from an 8192-image cache (2 shards): the per-step
/// data cost of training on a real dataset.
fn cache_read(budget: Budget, dev: &Device) -> anyhow::Result<BenchResult> {
    let dir = std::env::temp_dir().join(format!("spikeclip-bench-cache-{}", std::process::id()));
    let source = BlankImages((0..10).map(|i| format!("c{i}")).collect());
    let opts = CacheOptions {
        progress: false,
        ..Default::default()
    };
    let job = serde_json::json!("bench");
    cache_images(
        &source,
        &RandomTeacher,
        &Preprocessor::square(32),
        job,
        &dir,
        &opts,
    )?;
    let cache = Cache::open(&dir)?;
    let mut rng = Rng::new(0);
    let result = measure_on(dev, budget, || {
        let indices: Vec<usize> = (0..256).map(|_| rng.below(8192)).collect();
        ImageFeatureSet::batch(&cache, &indices, dev)?;
        Ok(())
    });
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    result
}
