//! `embed --model spikeclip:DIR`: a checkpoint's image and text features with the spikes of
//! every LIF layer, from the student's own inputs (`--pixels`, `--ids`) or from images and
//! sentences it prepares as `classify` does.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::{finish, save, texts, Args};
use crate::cli::classify::student_images;
use crate::data::student_inputs::{read_pixels, read_token_ids};
use crate::energy::MonitorSet;
use crate::neuron::SpikeCounts;
use crate::recipe::classifier::LoadedStudent;

/// Samples per forward pass, so that a large input file runs in bounded memory.
const CHUNK: usize = 64;

pub(super) fn run(args: &Args, dir: &Path, dev: &Device) -> Result<()> {
    let loaded = LoadedStudent::open(dir, dev)?;
    let config = &loaded.card.config;
    let texts = texts(args)?;
    if args.ids.is_some() && !texts.is_empty() {
        bail!("give either --ids or --text / --texts-file, not both");
    }
    if args.pixels.is_some() && !args.image.is_empty() {
        bail!("give either --pixels or --image, not both");
    }
    let ids = match &args.ids {
        Some(f) => Some(
            read_token_ids(f, config.text.context_length, config.text.vocab_size)?
                .to_device(dev)?,
        ),
        None if !texts.is_empty() => {
            let rows = loaded
                .tokenizer
                .encode(&texts, config.text.context_length)?;
            let len = config.text.context_length;
            let flat: Vec<u32> = rows.concat();
            Some(Tensor::from_vec(flat, (texts.len(), len), dev)?)
        }
        None => None,
    };
    let pixels = match &args.pixels {
        Some(f) => Some(read_pixels(f, config.image.in_channels)?.to_device(dev)?),
        None if !args.image.is_empty() => Some(student_images(&args.image, dev)?),
        None => None,
    };
    if ids.is_none() && pixels.is_none() {
        bail!("nothing to embed: give --pixels, --ids, --image, --text or --texts-file");
    }
    let inference = loaded.for_inference(args.dense)?;
    let student = inference.student();
    let monitors: HashMap<String, MonitorSet> = loaded
        .student
        .energy_ops()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.monitors))
        .collect();
    let mut out = HashMap::new();
    if let Some(pixels) = pixels {
        let features = features(&pixels, monitors.get("image"), "image", &mut out, |x| {
            student.image_features(x, false)
        })?;
        out.insert("image_features".into(), finish(args, features)?);
    }
    if let Some(ids) = ids {
        out.insert("input_ids".into(), ids.to_dtype(DType::I64)?);
        let features = features(&ids, monitors.get("text"), "text", &mut out, |x| {
            student.text_features(x, false)
        })?;
        out.insert("text_features".into(), finish(args, features)?);
    }
    save(out, &args.out)
}

/// Runs `forward` over `inputs` a chunk at a time; with `monitors`, adds every layer's spikes
/// per time step to `out` as `{encoder}_spikes.{layer}` (i64 `[T]`).
fn features(
    inputs: &Tensor,
    monitors: Option<&MonitorSet>,
    encoder: &str,
    out: &mut HashMap<String, Tensor>,
    forward: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    let n = inputs.dim(0)?;
    let mut chunks = Vec::new();
    let mut totals: HashMap<String, Vec<u64>> = HashMap::new();
    for start in (0..n).step_by(CHUNK) {
        let x = inputs.narrow(0, start, CHUNK.min(n - start))?;
        let Some(monitors) = monitors else {
            chunks.push(forward(&x)?);
            continue;
        };
        let (f, counts) = monitors.record(|| Ok(forward(&x)?))?;
        chunks.push(f);
        for (
            layer,
            SpikeCounts {
                per_step_spikes, ..
            },
        ) in counts
        {
            let total = totals.entry(layer).or_default();
            total.resize(per_step_spikes.len().max(total.len()), 0);
            total
                .iter_mut()
                .zip(per_step_spikes)
                .for_each(|(t, s)| *t += s);
        }
    }
    for (layer, spikes) in totals {
        let spikes: Vec<i64> = spikes.into_iter().map(|s| s as i64).collect();
        let steps = spikes.len();
        out.insert(
            format!("{encoder}_spikes.{layer}"),
            Tensor::from_vec(spikes, steps, &Device::Cpu)?,
        );
    }
    Ok(Tensor::cat(&chunks, 0)?)
}
