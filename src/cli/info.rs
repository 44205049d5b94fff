//! `spikeclip info`: a preset's configuration and the parameter budgets of both encoders, so a
//! size can be judged before anything is built or trained.

use anyhow::Result;

use crate::model::config::SpikeClipConfig;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration preset: paper or tiny.
    #[arg(long, default_value = "paper")]
    preset: String,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = SpikeClipConfig::preset(&args.preset)?;
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    println!("image encoder parameters: {}", cfg.image_param_count());
    println!("text encoder parameters:  {}", cfg.text_param_count());
    Ok(())
}
