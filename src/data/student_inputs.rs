//! Student inputs a user prepared elsewhere (for example with their PyTorch pipeline), read from
//! safetensors so that both models can be held against each other on identical inputs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::model::INPUT_SIDE;

/// The tensor called `name`, or the file's only tensor whatever its name.
fn named_or_only(path: &Path, name: &str) -> anyhow::Result<Tensor> {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("{}: not a readable safetensors file", path.display()))?;
    if let Some(t) = tensors.remove(name) {
        return Ok(t);
    }
    if tensors.len() == 1 {
        return Ok(tensors.into_values().next().expect("one tensor"));
    }
    let mut names: Vec<String> = tensors.into_keys().collect();
    names.sort();
    bail!(
        "{}: no tensor named {name} and not exactly one tensor (it holds {})",
        path.display(),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// Preprocessed images `[N, channels, 32, 32]` f32, named `pixel_values` or the file's only
/// tensor; every value must be finite.
pub fn read_pixels(path: &Path, channels: usize) -> anyhow::Result<Tensor> {
    let t = named_or_only(path, "pixel_values")?;
    if t.dtype() != DType::F32 {
        bail!(
            "{}: pixels must be f32, not {:?}",
            path.display(),
            t.dtype()
        );
    }
    match t.dims() {
        [n, c, h, w] if *n > 0 && *c == channels && *h == INPUT_SIDE && *w == INPUT_SIDE => {}
        dims => bail!(
            "{}: pixels must be [N, {channels}, {INPUT_SIDE}, {INPUT_SIDE}] with N > 0, not {dims:?}",
            path.display()
        ),
    }
    let finite = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        bail!("{}: pixels hold NaN or infinite values", path.display());
    }
    Ok(t)
}

/// Token ids `[N, context]` as u32, named `input_ids` or the file's only tensor, of an integer
/// dtype, each inside the vocabulary of `vocab` ids.
pub fn read_token_ids(path: &Path, context: usize, vocab: usize) -> anyhow::Result<Tensor> {
    let t = named_or_only(path, "input_ids")?;
    match t.dims() {
        [n, l] if *n > 0 && *l == context => {}
        dims => bail!(
            "{}: token ids must be [N, {context}] with N > 0, not {dims:?}",
            path.display()
        ),
    }
    let ids: Vec<i64> = match t.dtype() {
        DType::U8 | DType::U32 | DType::I16 | DType::I32 | DType::I64 => {
            t.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?
        }
        other => bail!(
            "{}: token ids must be integers, not {other:?}",
            path.display()
        ),
    };
    if let Some(bad) = ids.iter().find(|&&id| id < 0 || id >= vocab as i64) {
        bail!(
            "{}: token id {bad} is outside the text encoder's vocabulary of {vocab}",
            path.display()
        );
    }
    let ids: Vec<u32> = ids.into_iter().map(|id| id as u32).collect();
    Ok(Tensor::from_vec(ids, t.dims(), &Device::Cpu)?)
}
