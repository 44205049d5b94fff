//! `spikeclip import`: the SpikeCLIP authors' PyTorch checkpoints as a checkpoint directory that
//! `eval`, `classify`, `energy` and `embed` read.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use crate::model::config::SpikeClipConfig;
use crate::model::import::import_spikeclip;

#[derive(clap::Args)]
pub struct Args {
    /// The authors' image encoder: `.pth` / `.pth.tar`, a plain state_dict or one under
    /// `state_dict`, with or without DDP's `module.` prefix.
    #[arg(long)]
    image_encoder: PathBuf,
    /// Their text encoder, in the same forms; without it the text encoder is a fresh draw from
    /// `--seed`.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// The configuration the weights were trained with.
    #[arg(long, default_value = "paper")]
    preset: String,
    /// Override a preset setting, e.g. `--set image.depth=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// How the text side reads sentences: `world`, or CLIP's BPE (tokenizer.json, a CLIP
    /// directory or bpe_simple_vocab_16e6.txt.gz), whose vocabulary must fit `text.vocab_size`.
    #[arg(long)]
    tokenizer: String,
    /// Seed of the text encoder's weights when `--text-encoder` is not given.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The checkpoint directory to write (model.safetensors + model.json).
    #[arg(long)]
    out: PathBuf,
}

/// The tokenizer `spec` names, checked against the text encoder's vocabulary.
fn tokenizer(spec: &str, config: &SpikeClipConfig) -> anyhow::Result<TokenizerSpec> {
    let tokenizer = match spec {
        "world" => TokenizerSpec::World,
        path => TokenizerSpec::Clip {
            // Absolute, so that the checkpoint opens from any working directory.
            path: std::fs::canonicalize(path)
                .with_context(|| format!("--tokenizer {path}: no such file or directory"))?,
        },
    };
    let vocab = tokenizer.open()?.vocab_size();
    if vocab > config.text.vocab_size {
        bail!(
            "--tokenizer {spec}: its vocabulary has {vocab} ids but the text encoder's \
             text.vocab_size is {}",
            config.text.vocab_size
        );
    }
    Ok(tokenizer)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = SpikeClipConfig::preset(&args.preset)?.with_overrides(&args.sets)?;
    let tokenizer = tokenizer(&args.tokenizer, &config)?;
    let model = import_spikeclip(
        &config,
        &args.image_encoder,
        args.text_encoder.as_deref(),
        args.seed,
    )?;
    if args.text_encoder.is_none() {
        tracing::warn!(
            "no --text-encoder: the text encoder's weights are a fresh draw (seed {})",
            args.seed
        );
    }
    let card = ModelCard {
        kind: ModelKind::SpikeClip,
        config,
        tokenizer,
    };
    let weights = checkpoint::save(&args.out, &model, &card)?;
    println!("wrote {}", weights.display());
    Ok(())
}
