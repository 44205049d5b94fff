//! A layer table of an encoder, built from the modules themselves (their tensors and the shapes
//! they produce), so `spikeclip info` describes the model that is actually built.

use candle_core::Tensor;
use candle_nn::{BatchNorm, Linear};
use serde::Serialize;

/// One row: a layer's name, what it is, its output for one sample (`[T, C, H, W]`, `[T, N, C]`
/// or `[T, C]`; readouts have no T) and its trainable parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layer {
    pub name: String,
    pub kind: &'static str,
    pub shape: Vec<usize>,
    pub params: usize,
}

impl Layer {
    pub fn new(
        name: impl Into<String>,
        kind: &'static str,
        shape: Vec<usize>,
        params: usize,
    ) -> Self {
        Self {
            name: name.into(),
            kind,
            shape,
            params,
        }
    }
}

/// Weight and bias of a linear layer.
pub fn linear_params(l: &Linear) -> usize {
    l.weight().elem_count() + l.bias().map_or(0, Tensor::elem_count)
}

/// BatchNorm's affine weight and bias; the running statistics are not trained.
pub fn batch_norm_params(bn: &BatchNorm) -> usize {
    bn.weight_and_bias()
        .map_or(0, |(w, b)| w.elem_count() + b.elem_count())
}

/// The table as aligned text with a total line.
pub fn render(title: &str, layers: &[Layer]) -> String {
    let row = |name: &str, kind: &str, shape: &str, params: &str| {
        format!("{name:<28} {kind:<28} {shape:<18} {params:>12}\n")
    };
    let mut out = format!("{title}\n{}", row("layer", "kind", "output", "params"));
    for l in layers {
        out.push_str(&row(
            &l.name,
            l.kind,
            &format!("{:?}", l.shape),
            &l.params.to_string(),
        ));
    }
    out.push_str(&row("total", "", "", &total(layers).to_string()));
    out
}

pub fn total(layers: &[Layer]) -> usize {
    layers.iter().map(|l| l.params).sum()
}
