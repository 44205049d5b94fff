//! Readouts that turn T time steps into one feature: the time-dependent weights (TDW) of the
//! paper, and the fixed alternatives of its ablation (Table 6).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ReadoutKind;
use super::summary::Layer;

/// A weighted sum over time of `[T, B, D]`, giving `[B, D]`.
#[derive(Debug, Clone)]
pub struct Readout {
    /// `[T, 1, 1]` weights: learnable for TDW, fixed otherwise.
    weights: Tensor,
    learnable: bool,
}

impl Readout {
    /// TDW weights live at `weights_tensor` (`[1, T, 1]`, the authors' name and shape); a
    /// VarBuilder cannot initialise element-wise, so whoever owns the VarMap sets them to
    /// [`tdw_init`] after building. Mean: 1/T each. AD: an arithmetic progression, (t + 1) / sum.
    /// AR: a geometric one, 2^t / sum.
    pub fn new(kind: ReadoutKind, steps: usize, vb: VarBuilder) -> Result<Self> {
        let fixed = |w: Vec<f32>| -> Result<Tensor> {
            let total: f32 = w.iter().sum();
            let w: Vec<f32> = w.iter().map(|v| v / total).collect();
            Tensor::from_vec(w, (steps, 1, 1), vb.device())
        };
        let weights = match kind {
            ReadoutKind::Tdw => vb
                .get_with_hints((1, steps, 1), TDW_NAME, candle_nn::Init::Const(0.0))?
                .reshape((steps, 1, 1))?,
            ReadoutKind::Mean => fixed(vec![1.0; steps])?,
            ReadoutKind::Ad => fixed((1..=steps).map(|t| t as f32).collect())?,
            ReadoutKind::Ar => fixed((0..steps).map(|t| 2f32.powi(t as i32)).collect())?,
        };
        Ok(Self {
            weights,
            learnable: kind == ReadoutKind::Tdw,
        })
    }

    /// The readout's layer-table row, its output `[out]` for one sample.
    pub fn layer(&self, out: usize) -> Layer {
        let params = if self.learnable {
            self.weights.elem_count()
        } else {
            0
        };
        Layer::new("readout", "readout over T", vec![out], params)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.weights)?.sum(0)
    }
}

/// Name of the learnable TDW weights.
pub const TDW_NAME: &str = "weights_tensor";

/// The paper's TDW initialisation: ln(0.1), ln(0.2), ln(0.4), ln(0.8) for T = 4, generally
/// ln(0.8 / 2^(T-1-t)).
pub fn tdw_init(steps: usize) -> Vec<f32> {
    (0..steps)
        .map(|t| (0.8f64 / 2f64.powi((steps - 1 - t) as i32)).ln() as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tdw_init_is_the_papers() {
        let w = tdw_init(4);
        for (a, b) in w
            .iter()
            .zip([-std::f32::consts::LN_10, -1.6094, -0.9163, -0.2231])
        {
            assert!((a - b).abs() < 1e-4, "{w:?}");
        }
    }
}
