//! `spikeclip classify`: ranked label probabilities for images, from a trained checkpoint and
//! label names alone (zero-shot).

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};

use super::prompt_args::PromptFileArgs;
use crate::data::prompts::DatasetPrompts;
use crate::recipe::classifier::{clip_pixels, ranked_probabilities, student_inputs, LoadedStudent};

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (model.safetensors + model.json), e.g. runs/demo/spikeclip.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Image files or folders of images (JPEG/PNG).
    #[arg(long, required = true)]
    image: Vec<PathBuf>,
    #[command(flatten)]
    labels: LabelArgs,
    /// How many labels to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Run a spiking image encoder on the dense path instead of the spike-driven one
    /// (bit-packed spikes, accumulate-only layers), which gives the same predictions faster.
    #[arg(long)]
    dense: bool,
}

/// Where the label set comes from.
#[derive(clap::Args)]
pub(crate) struct LabelArgs {
    /// Comma-separated label names.
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    #[command(flatten)]
    prompts: PromptFileArgs,
}

/// The label set: a prompts file's dataset, names given on the command line, or for a
/// world-trained checkpoint the world's classes.
pub(crate) fn label_prompts(
    loaded: &LoadedStudent,
    args: &LabelArgs,
) -> anyhow::Result<DatasetPrompts> {
    match args.prompts.load()? {
        Some(prompts) => Ok(prompts),
        None => loaded.prompts_for_labels(&args.labels),
    }
}

fn image_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading folder {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                    })
                })
                .collect();
            inside.sort();
            files.extend(inside);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            bail!("{}: no such image or folder", p.display());
        }
    }
    if files.is_empty() {
        bail!("no images found in the given paths");
    }
    Ok(files)
}

/// Student inputs `[B, 3, 32, 32]` of image files.
pub(crate) fn student_images(files: &[PathBuf], device: &Device) -> anyhow::Result<Tensor> {
    let pixels = files
        .iter()
        .map(|f| {
            let image =
                image::open(f).with_context(|| format!("{}: unreadable image", f.display()))?;
            Ok(clip_pixels(&image))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    student_inputs(pixels, device)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let loaded = LoadedStudent::open(&args.checkpoint, &dev)?;
    let prompts = label_prompts(&loaded, &args.labels)?;
    let classes = loaded.class_embeddings(&prompts, &dev)?;
    let files = image_files(&args.image)?;
    let inference = loaded.for_inference(args.dense)?;
    for chunk in files.chunks(64) {
        let feats = inference
            .student()
            .image_features(&student_images(chunk, &dev)?, false)?;
        for (file, ranked) in chunk.iter().zip(ranked_probabilities(&feats, &classes)?) {
            println!("{}", file.display());
            for (c, p) in ranked.into_iter().take(args.top) {
                println!("  {:6.2}%  {}", 100.0 * p, prompts.classes[c][0]);
            }
        }
    }
    Ok(())
}
