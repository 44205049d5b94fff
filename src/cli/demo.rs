//! `spikeclip demo`: the whole recipe on the built-in world, SpikeCLIP against ScratchCLIP.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;

use crate::recipe::demo::{markdown, run_demo, DemoConfig, DemoReport};
use crate::recipe::seeds;

#[derive(clap::Args)]
pub struct Args {
    /// Where the report, plots and checkpoints go.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// A smoke test of under a minute on two cores: too short to learn the unseen pairs.
    #[arg(long)]
    quick: bool,
    /// Seeds the world, the initial weights and the batch order.
    #[arg(long, default_value_t = 0, conflicts_with = "seeds")]
    seed: u64,
    /// Runs the demo once per seed (`0,1,2`), each in `OUT/seed-N/`, and writes the figures as
    /// mean ± sd over the seeds to `OUT/report.md` and `OUT/report.json`.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Writes each student's health log, one line per epoch (`NAME/health.jsonl`): validation
    /// top-1, firing rates, gradient RMS, TDW weights, BatchNorm statistics.
    #[arg(long)]
    health: bool,
    /// Overrides of the demo configuration's JSON form, as `report.json` shows it
    /// (`--set pretrain.epochs=10 --set finetune.amsgrad=true --set world.train_images=800`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

fn config(args: &Args, seed: u64) -> anyhow::Result<DemoConfig> {
    let base = if args.quick {
        DemoConfig::quick(seed)
    } else {
        DemoConfig::standard(seed)
    };
    let mut cfg = base.with_overrides(&args.sets)?;
    cfg.health |= args.health;
    Ok(cfg)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    if args.seeds.len() <= 1 {
        let seed = args.seeds.first().copied().unwrap_or(args.seed);
        let report = run_demo(&config(&args, seed)?, &args.out, true, dev)?;
        print!("{}", markdown(&report));
    } else {
        let reports = args
            .seeds
            .iter()
            .map(|&seed| {
                let out = args.out.join(format!("seed-{seed}"));
                run_demo(&config(&args, seed)?, &out, true, dev)
                    .with_context(|| format!("demo with seed {seed}"))
            })
            .collect::<anyhow::Result<Vec<DemoReport>>>()?;
        let summary = seeds::summarise(&args.seeds, &reports)?;
        let text = seeds::markdown(&summary);
        write(&args.out.join("report.md"), &text)?;
        write(
            &args.out.join("report.json"),
            &serde_json::to_string_pretty(&summary)?,
        )?;
        print!("{text}");
    }
    println!(
        "\nwrote {} in {:.0} s",
        args.out.join("report.md").display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
