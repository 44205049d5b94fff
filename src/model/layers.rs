//! Building blocks shared by the spiking encoders and their ANN twins.

use candle_core::{Module, ModuleT, Result, Tensor, D};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, VarBuilder};

/// BatchNorm as the paper trains it: eps 1e-5, momentum 0.1, affine.
pub fn batch_norm(channels: usize, vb: VarBuilder) -> Result<BatchNorm> {
    candle_nn::batch_norm(
        channels,
        BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        },
        vb,
    )
}

/// Every convolution of the image encoders goes through here, so the kernel behind them can be
/// swapped in one place.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize) -> Result<Tensor> {
    x.conv2d(weight, padding, 1, 1, 1)
}

/// Runs `f` on all time steps at once: `[T, B, ...]` is seen as a batch of `T * B` samples,
/// as SpikingJelly's `SeqToANNContainer` does for convolutions and BatchNorm.
pub fn over_time(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (t, b) = (x.dim(0)?, x.dim(1)?);
    let y = f(&x.flatten_to(1)?)?;
    let mut dims = vec![t, b];
    dims.extend_from_slice(&y.dims()[1..]);
    y.reshape(dims)
}

/// A square convolution (stride 1, same padding) followed by BatchNorm.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: BatchNorm,
    padding: usize,
}

impl ConvBn {
    /// Weights at `{conv}.weight` (and `.bias`), BatchNorm at `{bn}.*`, under `vb`.
    pub fn new(
        vb: &VarBuilder,
        (c_in, c_out, k): (usize, usize, usize),
        with_bias: bool,
        (conv, bn): (&str, &str),
    ) -> Result<Self> {
        let weight = vb.pp(conv).get_with_hints(
            (c_out, c_in, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if with_bias {
            Some(
                vb.pp(conv)
                    .get_with_hints(c_out, "bias", candle_nn::Init::Const(0.0))?,
            )
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            bn: batch_norm(c_out, vb.pp(bn))?,
            padding: k / 2,
        })
    }

    /// `[N, C, H, W]` to `[N, C_out, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = conv2d(x, &self.weight, self.padding)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        }
        self.bn.forward_t(&y, train)
    }
}

/// A 1x1 convolution over tokens, written as a linear layer on `[M, C]` rows, followed by
/// BatchNorm over the channels.
#[derive(Debug, Clone)]
pub struct LinearBn {
    linear: Linear,
    bn: BatchNorm,
}

impl LinearBn {
    pub fn new(
        vb: &VarBuilder,
        (c_in, c_out): (usize, usize),
        with_bias: bool,
        (lin, bn): (&str, &str),
    ) -> Result<Self> {
        let linear = if with_bias {
            candle_nn::linear(c_in, c_out, vb.pp(lin))?
        } else {
            candle_nn::linear_no_bias(c_in, c_out, vb.pp(lin))?
        };
        Ok(Self {
            linear,
            bn: batch_norm(c_out, vb.pp(bn))?,
        })
    }

    /// `[..., C]` to `[..., C_out]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = x.flatten_to(dims.len() - 2)?;
        let y = self.bn.forward_t(&self.linear.forward(&rows)?, train)?;
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = y.dim(1)?;
        y.reshape(out)
    }
}

/// Max-pooling with a 3x3 window, stride 2 and padding 1 on `[N, C, H, W]` (even H and W),
/// built from shifted views and `maximum` so that it has a correct backward pass (candle's
/// `max_pool2d` has no padding and no backward for overlapping windows).
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("max-pool 3x3/2: height and width must be even, got {h}x{w}")
    }
    let (ho, wo) = (h / 2, w / 2);
    let neg = |shape: (usize, usize, usize, usize)| {
        Tensor::full(f32::NEG_INFINITY, shape, x.device())?.to_dtype(x.dtype())
    };
    // Pad one row/column of -inf on each side: [N, C, H + 2, W + 2].
    let rows = Tensor::cat(&[neg((n, c, 1, w))?, x.clone(), neg((n, c, 1, w))?], 2)?;
    let padded = Tensor::cat(&[neg((n, c, h + 2, 1))?, rows, neg((n, c, h + 2, 1))?], 3)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        // Rows dy, dy + 2, ...: take 2 * Ho rows from dy and keep the even ones.
        let r = padded
            .narrow(2, dy, 2 * ho)?
            .reshape((n, c, ho, 2, w + 2))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for dx in 0..3 {
            let v = r
                .narrow(3, dx, 2 * wo)?
                .reshape((n, c, ho, wo, 2))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            out = Some(match out {
                None => v,
                Some(m) => m.maximum(&v)?,
            });
        }
    }
    out.expect("nine windows").contiguous()
}

/// LayerNorm over the last axis, composed from differentiable ops (candle's fused layer norm
/// has no backward pass).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn max_pool_matches_a_direct_loop_and_routes_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 6, 8), &dev)?)?;
        let y = max_pool_3x3_s2(x.as_tensor())?;
        assert_eq!(y.dims(), &[2, 3, 3, 4]);
        let xv: Vec<f32> = x.as_tensor().flatten_all()?.to_vec1()?;
        let yv: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let at = |n: usize, c: usize, i: i64, j: i64| -> f32 {
            if i < 0 || j < 0 || i >= 6 || j >= 8 {
                f32::NEG_INFINITY
            } else {
                xv[((n * 3 + c) * 6 + i as usize) * 8 + j as usize]
            }
        };
        for n in 0..2 {
            for c in 0..3 {
                for i in 0..3 {
                    for j in 0..4 {
                        let mut m = f32::NEG_INFINITY;
                        for dy in -1..=1 {
                            for dx in -1..=1 {
                                m = m.max(at(n, c, 2 * i as i64 + dy, 2 * j as i64 + dx));
                            }
                        }
                        assert_eq!(yv[((n * 3 + c) * 3 + i) * 4 + j], m);
                    }
                }
            }
        }
        // Each output's gradient lands on its window's maximum only.
        let g = y.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("gradient");
        assert_eq!(gx.sum_all()?.to_scalar::<f32>()?, 2.0 * 3.0 * 3.0 * 4.0);
        Ok(())
    }

    #[test]
    fn layer_norm_normalises_rows() -> Result<()> {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let ln = LayerNorm::new(
            5,
            VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev),
        )?;
        let x = Tensor::randn(3f32, 2.0, (4, 5), &dev)?;
        let y = ln.forward(&x)?;
        let m: Vec<f32> = y.mean(1)?.to_vec1()?;
        assert!(m.iter().all(|v| v.abs() < 1e-5));
        Ok(())
    }
}
