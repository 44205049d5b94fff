//! `spikeclip embed`: features of texts and images from a model, written as safetensors.

mod student;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use crate::teacher::clip::ClipTeacher;
use crate::teacher::preprocess::{self, Preprocessor};
use crate::teacher::{ImageTeacher, ModelSpec, TextTeacher};
use crate::train::checkpoint::write_atomic_with;
use crate::train::loss::normalize;

#[derive(clap::Args)]
pub struct Args {
    /// The model: `clip:DIR` (a Hugging Face CLIP) or `spikeclip:DIR` (a checkpoint directory).
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
    /// spikeclip: preprocessed student images, one f32 tensor `[N, 3, 32, 32]` named
    /// `pixel_values` or the file's only tensor.
    #[arg(long)]
    pixels: Option<PathBuf>,
    /// spikeclip: token ids `[N, context_length]` named `input_ids` or the file's only tensor.
    #[arg(long)]
    ids: Option<PathBuf>,
    /// spikeclip: run the image encoder's dense path instead of the spike-driven one.
    #[arg(long)]
    dense: bool,
    /// Output: `text_features`, `image_features`, `input_ids`; for spikeclip also the spikes
    /// per time step of every LIF layer, `image_spikes.LAYER` / `text_spikes.LAYER`.
    #[arg(long)]
    out: PathBuf,
    /// L2-normalise the features (they are written unnormalised otherwise).
    #[arg(long)]
    normalize: bool,
}

pub fn run(args: Args, dev: &Device) -> Result<()> {
    if let Some(dir) = args.model.strip_prefix("spikeclip:") {
        return student::run(&args, dir.as_ref(), dev);
    }
    if args.pixels.is_some() || args.ids.is_some() || args.dense {
        anyhow::bail!("--pixels, --ids and --dense are for a spikeclip:DIR model");
    }
    let texts = texts(&args)?;
    anyhow::ensure!(
        !texts.is_empty() || !args.image.is_empty(),
        "nothing to embed: give --text, --texts-file or --image"
    );
    let ModelSpec::Clip(dir) = ModelSpec::parse(&args.model)?;
    let teacher = ClipTeacher::load(&dir, dev)?;
    let finish = |x: Tensor| finish(&args, x);
    let mut out = HashMap::new();
    if !texts.is_empty() {
        out.insert(
            "input_ids".to_string(),
            teacher.token_ids(&texts)?.to_device(&Device::Cpu)?,
        );
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
    save(out, &args.out)
}

/// `--text` and the lines of `--texts-file`.
fn texts(args: &Args) -> Result<Vec<String>> {
    let mut texts = args.text.clone();
    if let Some(f) = &args.texts_file {
        let content =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        texts.extend(content.lines().map(String::from));
    }
    Ok(texts)
}

/// The features as `--normalize` asks.
fn finish(args: &Args, x: Tensor) -> candle_core::Result<Tensor> {
    if args.normalize {
        normalize(&x)
    } else {
        Ok(x)
    }
}

/// Writes `out` from host memory, wherever its tensors were computed.
fn save(out: HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let out = out
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    write_atomic_with(path, |tmp| Ok(candle_core::safetensors::save(&out, tmp)?))
        .with_context(|| format!("writing {}", path.display()))
}
