//! `spikeclip bench`: the benchmark cases, timed by [`crate::bench`].

mod kernels;

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor, Var};

use crate::bench::{measure, BenchResult, Budget};
use crate::data::world::{Split, World, WorldConfig};
use crate::data::ImageFeatureSet;
use crate::neuron::{LifConfig, MultiStepLif};
use crate::train::optim::{Adam, AdamConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Run only this case (default: all). Cases: lif_fwd_bwd, world_batch, adam_step,
    /// and the kernels' (conv_*, spike_*, dense_*; an unknown name lists them all).
    #[arg(long)]
    case: Option<String>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Timed iterations per case.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed warm-up iterations per case.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
}

type Case = (&'static str, fn(Budget) -> anyhow::Result<BenchResult>);

const CASES: &[Case] = &[
    ("lif_fwd_bwd", lif_fwd_bwd),
    ("world_batch", world_batch),
    ("adam_step", adam_step),
];

/// Every case: the end-to-end ones above, then the kernels'.
fn all_cases() -> impl Iterator<Item = &'static Case> {
    CASES.iter().chain(kernels::CASES)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let selected: Vec<&Case> = match &args.case {
        Some(name) => match all_cases().find(|(n, _)| n == name) {
            Some(case) => vec![case],
            None => bail!(
                "unknown bench case {name:?}; cases: {}",
                all_cases().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        },
        None => all_cases().collect(),
    };
    let budget = Budget {
        warmup: args.warmup,
        iters: args.iters.max(1),
    };
    println!(
        "{:<18} {:>11} {:>11} {:>11} {:>12}  (threads: {})",
        "case",
        "median_s",
        "min_s",
        "max_s",
        "peak_rss_mib",
        rayon::current_num_threads()
    );
    let mut results = serde_json::Map::new();
    for (name, case) in selected {
        let r = case(budget).with_context(|| format!("bench case {name}"))?;
        println!(
            "{:<18} {:>11.5} {:>11.5} {:>11.5} {:>12.1}",
            name, r.median_s, r.min_s, r.max_s, r.peak_rss_mib
        );
        results.insert(name.to_string(), serde_json::to_value(&r)?);
    }
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&results)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
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
fn world_batch(budget: Budget) -> anyhow::Result<BenchResult> {
    let images = World::new(WorldConfig::default()).images(Split::Train);
    let indices: Vec<usize> = (0..256).collect();
    measure(budget, || {
        images.batch(&indices, &Device::Cpu)?;
        Ok(())
    })
}

/// One AMSGrad step over 4M parameters (about a small Spikingformer), the optimiser's share
/// of every training step.
fn adam_step(budget: Budget) -> anyhow::Result<BenchResult> {
    let dev = Device::Cpu;
    let params: Vec<(String, Var)> = (0..4)
        .map(|i| Ok((format!("w{i}"), Var::randn(0f32, 1.0, (1024, 1024), &dev)?)))
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
    measure(budget, || Ok(adam.step(&grads)?))
}
