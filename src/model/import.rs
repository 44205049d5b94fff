//! Import of the SpikeCLIP authors' PyTorch checkpoints (`.pth` / `.pth.tar`, a plain
//! state_dict or one under `state_dict`, with or without DDP's `module.` prefix). Their names
//! are ours; only the 1x1 convolutions (stored `[Cout, Cin, 1(, 1)]`, ours are matmuls
//! `[Cout, Cin]`) and two buffers differ: BatchNorm's `num_batches_tracked` and the
//! `clip_embedding.position_ids` that transformers 4.30's CLIP embeddings carry, both unused here.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use super::checkpoint::assign;
use super::config::SpikeClipConfig;
use super::SpikeClip;
use crate::recipe::Student;
use crate::train::checkpoint::named_vars;

/// Buffers of the authors' modules that hold no learnt value: BatchNorm's step counter and the
/// `arange` of position ids that transformers' CLIP embeddings register.
const IGNORED_BUFFERS: [&str; 2] = ["num_batches_tracked", "position_ids"];

/// Reads every tensor of a PyTorch zip checkpoint, looking under `state_dict` when the top
/// level holds no tensors.
fn read_state_dict(path: &Path) -> anyhow::Result<Vec<(String, Tensor)>> {
    let plain = candle_core::pickle::read_all_with_key(path, None);
    match plain {
        Ok(tensors) if !tensors.is_empty() => Ok(tensors),
        _ => candle_core::pickle::read_all_with_key(path, Some("state_dict")).with_context(|| {
            format!(
                "{}: not a PyTorch checkpoint with a state_dict (plain or under `state_dict`)",
                path.display()
            )
        }),
    }
}

/// Loads the authors' state_dict at `path` into the variables of `varmap` under `prefix`
/// (`"image."` or `"text."` for a [`super::SpikeClip`]); every missing, unexpected or
/// wrong-shaped tensor is reported in one error.
pub fn load_pth(path: &Path, varmap: &VarMap, prefix: &str) -> anyhow::Result<()> {
    let shapes: HashMap<String, Vec<usize>> = named_vars(varmap)
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    let mut tensors = HashMap::new();
    for (name, t) in read_state_dict(path)? {
        let name = name.strip_prefix("module.").unwrap_or(&name);
        if IGNORED_BUFFERS
            .iter()
            .any(|b| name.rsplit('.').next() == Some(b))
        {
            continue;
        }
        let ours = format!("{prefix}{name}");
        let t = match shapes.get(&ours) {
            Some(want) if pointwise_squeeze(t.dims()) == want.as_slice() => {
                t.reshape(want.clone())?
            }
            _ => t,
        };
        tensors.insert(ours, t);
    }
    assign(varmap, prefix, tensors, path)
}

/// The dims of a 1x1 convolution kernel without its trailing unit dims: `[Cout, Cin]`.
fn pointwise_squeeze(dims: &[usize]) -> &[usize] {
    match dims {
        [_, _, rest @ ..] if !rest.is_empty() && rest.iter().all(|&d| d == 1) => &dims[..2],
        _ => dims,
    }
}

/// SpikeCLIP with the authors' image encoder from `image` and, when given, their text encoder
/// from `text`; without it the text encoder keeps the fresh weights `seed` draws. When both files
/// have problems, the one error lists those of both.
pub fn import_spikeclip(
    config: &SpikeClipConfig,
    image: &Path,
    text: Option<&Path>,
    seed: u64,
) -> anyhow::Result<SpikeClip> {
    let model = SpikeClip::new(config, seed, &Device::Cpu)?;
    let image = load_pth(image, model.varmap(), "image.");
    let text = text.map_or(Ok(()), |t| load_pth(t, model.varmap(), "text."));
    match (image, text) {
        (Ok(()), Ok(())) => Ok(model),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(i), Err(t)) => anyhow::bail!("{i:#}\n{t:#}"),
    }
}
