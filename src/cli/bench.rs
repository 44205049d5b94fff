//! `spikeclip bench`: the benchmark cases, timed by [`crate::bench`].

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor, Var};

use crate::bench::{measure, BenchResult, Budget};
use crate::neuron::{LifConfig, MultiStepLif};

#[derive(clap::Args)]
pub struct Args {
    /// Run only this case (default: all). Cases: lif_fwd_bwd.
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

const CASES: &[Case] = &[("lif_fwd_bwd", lif_fwd_bwd)];

pub fn run(args: Args) -> anyhow::Result<()> {
    let selected: Vec<&Case> = match &args.case {
        Some(name) => match CASES.iter().find(|(n, _)| n == name) {
            Some(case) => vec![case],
            None => bail!(
                "unknown bench case {name:?}; cases: {}",
                CASES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        },
        None => CASES.iter().collect(),
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
