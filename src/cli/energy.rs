//! `spikeclip energy`: per-layer firing rates, operation counts and energy of a SpikeCLIP
//! checkpoint against its ANN twin, from a normal evaluation pass.

use std::path::PathBuf;

use anyhow::bail;
use candle_core::Device;

use super::classify::{label_prompts, LabelArgs};
use crate::data::cache::Cache;
use crate::data::world::{Split, World, WorldConfig};
use crate::data::ImageFeatureSet;
use crate::energy::EnergyConstants;
use crate::recipe::classifier::LoadedStudent;
use crate::recipe::energy::{measure_energy, prompt_token_ids};

#[derive(clap::Args)]
pub struct Args {
    /// A SpikeCLIP checkpoint directory (model.safetensors + model.json).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Images to measure on: `world` (the built-in world's seen test split) or `cache:DIR`.
    #[arg(long, default_value = "world")]
    dataset: String,
    /// How many images (and sentences) the evaluation pass runs.
    #[arg(long, default_value_t = 256)]
    samples: usize,
    /// Energy per operation: fp32 (4.6 / 0.9 pJ, 45 nm), fp16, int8, or `MAC,AC` in pJ.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// The label set whose prompt sentences drive the text encoder (default for a
    /// world-trained checkpoint: the world's classes).
    #[command(flatten)]
    labels: LabelArgs,
    /// Where energy.json, energy.txt and the plots go.
    #[arg(long, default_value = "runs/energy")]
    out: PathBuf,
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let loaded = LoadedStudent::open(&args.checkpoint, dev)?;
    let constants: EnergyConstants = args.precision.parse()?;
    let idx: Vec<usize> = (0..args.samples.max(1)).collect();
    let images = if args.dataset == "world" {
        let set = World::new(WorldConfig::default()).images(Split::TestSeen);
        set.batch(&idx[..idx.len().min(set.len())], dev)?.inputs
    } else if let Some(dir) = args.dataset.strip_prefix("cache:") {
        let set = Cache::open_images(&PathBuf::from(dir))?;
        set.batch(&idx[..idx.len().min(set.len())], dev)?.inputs
    } else {
        bail!("--dataset {:?}: expected world or cache:DIR", args.dataset);
    };
    let prompts = label_prompts(&loaded, &args.labels)?;
    let ids = prompt_token_ids(
        &prompts,
        loaded.tokenizer.as_ref(),
        loaded.card.config.text.context_length,
        args.samples,
        dev,
    )?;
    let Some(report) =
        measure_energy(loaded.student.as_ref(), &images, &ids, constants, &args.out)?
    else {
        bail!(
            "{}: not a spiking checkpoint (energy compares SpikeCLIP with its ANN twin)",
            args.checkpoint.display()
        );
    };
    print!("{}", report.table());
    println!("wrote {}", args.out.join("energy.json").display());
    Ok(())
}
