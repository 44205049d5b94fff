//! `spikeclip classify`: ranked label probabilities for images, from a trained checkpoint and
//! label names alone (zero-shot).

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};

use super::prompt_args::PromptFileArgs;
use crate::data::prompts::DatasetPrompts;
use crate::eval::zeroshot::ranked_classes;
use crate::recipe::classifier::{clip_pixels, student_inputs, LoadedStudent};
use crate::recipe::dead_features::warn_each;
use crate::train::loss::cosine_logits;

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

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let loaded = LoadedStudent::open(&args.checkpoint, dev)?;
    let prompts = label_prompts(&loaded, &args.labels)?;
    let classes = loaded.class_embeddings(&prompts, dev)?;
    let files = image_files(&args.image)?;
    let inference = loaded.for_inference(args.dense)?;
    // Probabilities as CLIP reports them: softmax over cosine similarities times 100.
    for (i, chunk) in files.chunks(64).enumerate() {
        let images = student_images(chunk, dev)?;
        if i == 0 {
            let student = inference.student();
            warn_each(&loaded.feature_warnings(student, &images, &prompts, &classes, dev)?);
        }
        let feats = inference.student().image_features(&images, false)?;
        let probs = candle_nn::ops::softmax(
            &cosine_logits(&feats, &classes, Some(100.0))?,
            candle_core::D::Minus1,
        )?
        .to_vec2::<f32>()?;
        for (file, row) in chunk.iter().zip(probs) {
            println!("{}", file.display());
            print!("{}", ranked_lines(&row, &prompts, args.top));
        }
    }
    Ok(())
}

/// The `top` most probable labels, one line each, in the order argmax ranks them (ties in label
/// order), and a note when several labels share the top probability, since then the first
/// listed is a prediction only by the tie-break.
fn ranked_lines(probs: &[f32], prompts: &DatasetPrompts, top: usize) -> String {
    let order = ranked_classes(probs);
    let mut out = String::new();
    for &c in order.iter().take(top) {
        out += &format!("  {:6.2}%  {}\n", 100.0 * probs[c], prompts.classes[c][0]);
    }
    let tied = probs.iter().filter(|&&p| p == probs[order[0]]).count();
    if tied > 1 {
        out += &format!(
            "  ({tied} of {} labels tie for the top probability; the first listed wins only \
             by label order)\n",
            probs.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_are_listed_in_label_order_and_flagged() {
        let prompts = DatasetPrompts {
            classes: ["a", "b", "c"]
                .iter()
                .map(|c| vec![c.to_string()])
                .collect(),
            templates: vec!["{}".into()],
        };
        let third = 1.0f32 / 3.0;
        let lines = ranked_lines(&[third; 3], &prompts, 2);
        assert_eq!(
            lines,
            "   33.33%  a\n   33.33%  b\n  (3 of 3 labels tie for the top probability; the \
             first listed wins only by label order)\n"
        );
        let lines = ranked_lines(&[0.2, 0.4, 0.4], &prompts, 3);
        assert!(lines.starts_with("   40.00%  b\n   40.00%  c\n   20.00%  a\n  (2 of 3"));
        assert_eq!(
            ranked_lines(&[0.1, 0.2, 0.7], &prompts, 5),
            "   70.00%  c\n   20.00%  b\n   10.00%  a\n"
        );
    }
}
