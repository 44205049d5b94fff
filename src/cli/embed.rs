//! `spikeclip embed`: features of texts and images from a model, written as safetensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use crate::teacher::clip::ClipTeacher;
use crate::teacher::preprocess::{self, Preprocessor};
use crate::teacher::{ImageTeacher, ModelSpec, TextTeacher};
use crate::train::loss::normalize;

#[derive(clap::Args)]
pub struct Args {
    /// The model, `clip:DIR`.
    #[arg(long)]
    model: String,
    /// A sentence to embed (repeatable).
    #[arg(long)]
    text: Vec<String>,
    /// A file of sentences, one per line.
    #[arg(long)]
    texts_file: Option<PathBuf>,
    /// An image file to embed (repeatable).
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Output: `text_features`, `image_features`, `input_ids`.
    #[arg(long)]
    out: PathBuf,
    /// L2-normalise the features (they are written unnormalised otherwise).
    #[arg(long)]
    normalize: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut texts = args.text.clone();
    if let Some(f) = &args.texts_file {
        let content =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        texts.extend(content.lines().map(String::from));
    }
    anyhow::ensure!(
        !texts.is_empty() || !args.image.is_empty(),
        "nothing to embed: give --text, --texts-file or --image"
    );
    let ModelSpec::Clip(dir) = ModelSpec::parse(&args.model)?;
    let teacher = ClipTeacher::load(&dir, &Device::Cpu)?;
    let finish = |x: Tensor| if args.normalize { normalize(&x) } else { Ok(x) };
    let mut out = std::collections::HashMap::new();
    if !texts.is_empty() {
        out.insert("input_ids".to_string(), teacher.token_ids(&texts)?);
        out.insert(
            "text_features".to_string(),
            finish(teacher.text_features(&texts)?)?,
        );
    }
    if !args.image.is_empty() {
        let size = teacher.image_size();
        let pre = Preprocessor::from_dir_or_square(&dir, size as u32)?;
        let pixels = args
            .image
            .iter()
            .map(|p| pre.load(p))
            .collect::<Result<Vec<_>>>()?;
        let (h, w) = (pre.crop_size.height as usize, pre.crop_size.width as usize);
        let batch = preprocess::batch(pixels, h, w, &Device::Cpu)?;
        out.insert(
            "image_features".to_string(),
            finish(teacher.image_features(&batch)?)?,
        );
    }
    candle_core::safetensors::save(&out, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}
