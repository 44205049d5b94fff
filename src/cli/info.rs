//! `spikeclip info`: a preset's configuration, with overrides, and a layer table of both
//! encoders with their parameter budgets, so a size can be judged before anything is trained.

use anyhow::{ensure, Result};
use candle_core::Device;

use crate::model::config::SpikeClipConfig;
use crate::model::summary::{render, total};
use crate::model::{SpikeClip, INPUT_SIDE};
use crate::ops::device;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration preset: paper or tiny.
    #[arg(long, default_value = "paper")]
    preset: String,
    /// Override a setting, e.g. `--set image.depth=2 --set text.kind=transformer`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

pub fn run(args: Args, dev: &Device) -> Result<()> {
    let cfg = SpikeClipConfig::preset(&args.preset)?.with_overrides(&args.sets)?;
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    // The tables come from a built model, so they show what is built, not what is intended.
    let model = SpikeClip::new(&cfg, 0, dev)?;
    let towers = [
        (
            "image encoder",
            model.image.layers(INPUT_SIDE),
            cfg.image_param_count(),
        ),
        ("text encoder", model.text.layers(), cfg.text_param_count()),
    ];
    for (name, layers, expected) in &towers {
        ensure!(
            total(layers) == *expected,
            "{name}: the layer table sums to {} parameters, the formula gives {expected}",
            total(layers)
        );
        println!();
        print!("{}", render(name, layers));
    }
    println!();
    println!("image encoder parameters: {}", towers[0].2);
    println!("text encoder parameters:  {}", towers[1].2);
    println!(
        "device: {}, ops: {}",
        device::name(dev),
        model.image.op_impl().name()
    );
    Ok(())
}
