//! Building blocks shared by the spiking encoders and their ANN twins.

use candle_core::{Module, ModuleT, Result, Tensor, D};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, VarBuilder};

use super::summary::{batch_norm_params, linear_params};
use crate::kernels::batch_norm::per_layer;
use crate::kernels::spikes::{SpikeBits, SpikeLayer};
use crate::neuron::MultiStepLif;
use crate::ops::{Ops, Then};

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

/// BatchNorms `bns` on `x [N, C, ...]`, their channels side by side along C (one layer's, or
/// the stacked outputs of layers fed by the same input): training mode by `ops` (the fused op
/// makes one pass per statistic and keeps nothing for backward but the input), eval mode on the
/// running statistics.
fn normalise(ops: Ops, bns: &[&BatchNorm], x: &Tensor, train: bool) -> Result<Tensor> {
    if train {
        ops.batch_norm_train(x, bns)
    } else {
        per_layer(x, bns, |bn, x| bn.forward_t(x, false))
    }
}

/// A spike-fed layer with its eval-mode BatchNorm folded in, so that the accumulate-only
/// kernels produce the normalised output directly: the weight of output channel `o` scaled by
/// `gamma_o / sqrt(var_o + eps)`, the bias `(b_o - mean_o) * scale_o + beta_o`.
fn fold_batch_norm(bn: &BatchNorm, weight: &Tensor, bias: Option<&Tensor>) -> Result<SpikeLayer> {
    let o = weight.dim(0)?;
    let mut scale = (bn.running_var().detach() + bn.eps())?.sqrt()?.recip()?;
    let mut shift = bn.running_mean().detach().neg()?;
    if let Some(b) = bias {
        shift = (shift + b.detach())?;
    }
    shift = (shift * &scale)?;
    if let Some((gamma, beta)) = bn.weight_and_bias() {
        scale = (scale * gamma.detach())?;
        shift = ((shift * gamma.detach())? + beta.detach())?;
    }
    let mut scale_shape = vec![1; weight.rank()];
    scale_shape[0] = o;
    let weight = weight
        .detach()
        .broadcast_mul(&scale.reshape(scale_shape)?)?;
    SpikeLayer::new(&weight, Some(&shift))
}

/// A square convolution (stride 1, same padding) followed by BatchNorm.
#[derive(Debug, Clone)]
pub struct ConvBn {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: BatchNorm,
    padding: usize,
    ops: Ops,
}

impl ConvBn {
    /// Weights at `{conv}.weight` (and `.bias`), BatchNorm at `{bn}.*`, under `vb`; the
    /// convolution (our im2col kernel when fused, about twice as fast as candle's forward and
    /// backward, `spikeclip bench --case conv_tokenizer`) and BatchNorm run by `ops`.
    pub fn new(
        vb: &VarBuilder,
        (c_in, c_out, k): (usize, usize, usize),
        with_bias: bool,
        (conv, bn): (&str, &str),
        ops: Ops,
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
            ops,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Trainable parameters: the kernel, its bias if any, BatchNorm's affine pair.
    pub fn params(&self) -> usize {
        self.weight.elem_count()
            + self.bias.as_ref().map_or(0, Tensor::elem_count)
            + batch_norm_params(&self.bn)
    }

    /// `[N, C, H, W]` to `[N, C_out, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.ops.conv2d(x, &self.weight, self.padding)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        }
        normalise(self.ops, &[&self.bn], &y, train)
    }

    /// The spikes of `lif` on `x [T, B, C, H, W]` through this layer, all time steps at once:
    /// `[T * B, C_out, H, W]`, the same as `forward` of the flattened spikes. The LIF is fused
    /// into the convolution (see [`crate::kernels::lif_linear`]), which keeps the spikes as bits.
    pub fn forward_lif(&self, lif: &MultiStepLif, x: &Tensor, train: bool) -> Result<Tensor> {
        normalise(self.ops, &[&self.bn], &self.lif_conv(lif, x)?, train)
    }

    fn lif_conv(&self, lif: &MultiStepLif, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        self.ops
            .lif_conv2d(lif, x, &self.weight, bias, self.padding)
    }

    /// [`Self::forward_lif`] followed by [`max_pool_3x3_s2`]. In training mode the normalised
    /// map, four times the size of the pooled one, is recomputed in backward instead of kept.
    pub fn forward_lif_pooled(
        &self,
        lif: &MultiStepLif,
        x: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        if !train {
            return max_pool_3x3_s2(self.ops, &self.forward_lif(lif, x, false)?);
        }
        let y = self.lif_conv(lif, x)?;
        let (k, s, p) = POOL;
        let shape = y.dims().to_vec();
        self.ops
            .batch_norm_then(&y, &[&self.bn], &shape, Then::MaxPool(k, s, p))
    }

    /// For [`ConvBn::forward_spikes`], in eval mode.
    pub fn folded(&self) -> Result<SpikeLayer> {
        fold_batch_norm(&self.bn, &self.weight, self.bias.as_ref())
    }

    /// Eval-mode forward of channels-last spikes `[N, H, W, C]` through this layer's
    /// [`ConvBn::folded`] twin, channels-last too: `[N, H, W, C_out]`.
    pub fn forward_spikes(&self, folded: &SpikeLayer, spikes: &SpikeBits) -> Result<Tensor> {
        folded.conv2d_channels_last(spikes, self.padding, 1, self.weight.device())
    }

    /// [`Self::forward_spikes`] of spikes `[T * N, H, W, C]` over `steps` = T, then `lif`: its
    /// spikes `[T, N, H, W, C_out]` as bits, the conv's output never written whole.
    pub fn forward_spikes_fired(
        &self,
        folded: &SpikeLayer,
        spikes: &SpikeBits,
        steps: usize,
        lif: &MultiStepLif,
    ) -> Result<SpikeBits> {
        folded.conv2d_channels_last_fired(spikes, (self.padding, 1), steps, lif)
    }
}

/// A 1x1 convolution over tokens, written as a linear layer on `[M, C]` rows, followed by
/// BatchNorm over the channels.
#[derive(Debug, Clone)]
pub struct LinearBn {
    linear: Linear,
    bn: BatchNorm,
    ops: Ops,
}

impl LinearBn {
    pub fn new(
        vb: &VarBuilder,
        (c_in, c_out): (usize, usize),
        with_bias: bool,
        (lin, bn): (&str, &str),
        ops: Ops,
    ) -> Result<Self> {
        let linear = if with_bias {
            candle_nn::linear(c_in, c_out, vb.pp(lin))?
        } else {
            candle_nn::linear_no_bias(c_in, c_out, vb.pp(lin))?
        };
        Ok(Self {
            linear,
            bn: batch_norm(c_out, vb.pp(bn))?,
            ops,
        })
    }

    /// Trainable parameters: the linear layer's and BatchNorm's affine pair.
    pub fn params(&self) -> usize {
        linear_params(&self.linear) + batch_norm_params(&self.bn)
    }

    /// `[..., C]` to `[..., C_out]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = x.flatten_to(dims.len() - 2)?;
        let y = normalise(self.ops, &[&self.bn], &self.linear.forward(&rows)?, train)?;
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = y.dim(1)?;
        y.reshape(out)
    }

    /// `layers` applied to the spikes of `lif` on `x [..., C]`, all fed by the same spikes,
    /// their outputs side by side on the last axis: one fused LIF + matmul over the layers'
    /// stacked weights (see [`crate::kernels::lif_linear`]), which keeps the spikes as bits for
    /// backward instead of the f32 tensor a separate LIF would hand to each layer, then one
    /// BatchNorm pass over the stacked channels, which keeps no per-layer copies. The same as
    /// `layer.forward` of `lif.forward(x)` for each layer, concatenated.
    pub fn forward_lif(
        layers: &[&LinearBn],
        lif: &MultiStepLif,
        x: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (y, ops) = Self::stacked_lif(layers, lif, x)?;
        let dims = y.dims().to_vec();
        let bns: Vec<&BatchNorm> = layers.iter().map(|l| &l.bn).collect();
        normalise(ops, &bns, &y.flatten_to(dims.len() - 2)?, train)?.reshape(dims)
    }

    /// [`Self::forward_lif`] in training mode followed by `then`, which sees the normalised
    /// output shaped as `x` with the layers' outputs on the last axis; the fused ops recompute
    /// that output in backward instead of keeping it (see [`Ops::batch_norm_then`]).
    pub fn forward_lif_then(
        layers: &[&LinearBn],
        lif: &MultiStepLif,
        x: &Tensor,
        then: Then,
    ) -> Result<Tensor> {
        let (y, ops) = Self::stacked_lif(layers, lif, x)?;
        let dims = y.dims().to_vec();
        let bns: Vec<&BatchNorm> = layers.iter().map(|l| &l.bn).collect();
        let rows = y.flatten_to(dims.len() - 2)?;
        ops.batch_norm_then(&rows, &bns, &dims, then)
    }

    /// The weight and bias (zeros if none) packed as `[O, K + 1]`, as [`Then::LifLinear`]
    /// takes them; gradients flow back to both.
    pub fn packed(&self) -> Result<Tensor> {
        Tensor::cat(
            &[self.linear.weight(), &self.bias_or_zeros()?.unsqueeze(1)?],
            1,
        )
    }

    /// The bias, or zeros for a layer without one.
    fn bias_or_zeros(&self) -> Result<Tensor> {
        let w = self.linear.weight();
        match self.linear.bias() {
            Some(b) => Ok(b.clone()),
            None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device()),
        }
    }

    /// `residual + BN(y)` in training mode for this layer's linear output `y [..., C_out]`: the
    /// normalised output is recomputed in backward instead of kept for the sum.
    pub fn add_to(&self, residual: &Tensor, y: &Tensor) -> Result<Tensor> {
        let dims = y.dims().to_vec();
        let rows = y.flatten_to(dims.len() - 2)?;
        self.ops
            .batch_norm_then(&rows, &[&self.bn], &dims, Then::Add(residual))
    }

    /// `residual + self.forward_lif(lif, x)` in training mode, as [`Self::add_to`].
    pub fn add_lif_to(&self, residual: &Tensor, lif: &MultiStepLif, x: &Tensor) -> Result<Tensor> {
        self.add_to(residual, &Self::stacked_lif(&[self], lif, x)?.0)
    }

    /// The layers' outputs side by side, before BatchNorm: one LIF + matmul over their stacked
    /// weights (fused into one op by the fused ops), and the ops the layers run.
    fn stacked_lif(layers: &[&LinearBn], lif: &MultiStepLif, x: &Tensor) -> Result<(Tensor, Ops)> {
        let Some(ops) = layers.first().map(|l| l.ops) else {
            candle_core::bail!("LinearBn: no layers to stack")
        };
        let weights: Vec<Tensor> = layers.iter().map(|l| l.linear.weight().clone()).collect();
        // Layers without a bias contribute zeros, unless none has one.
        let bias = if layers.iter().any(|l| l.linear.bias().is_some()) {
            let parts = layers
                .iter()
                .map(|l| l.bias_or_zeros())
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        let y = ops.lif_linear(lif, x, &Tensor::cat(&weights, 0)?, bias.as_ref())?;
        Ok((y, ops))
    }

    /// The layer with its eval-mode BatchNorm folded in, for spikes `[..., C]`.
    pub fn folded(&self) -> Result<SpikeLayer> {
        fold_batch_norm(&self.bn, self.linear.weight(), self.linear.bias())
    }
}

/// The tokenizer's max-pooling: window, stride, padding.
const POOL: (usize, usize, usize) = (3, 2, 1);

/// Max-pooling with a 3x3 window, stride 2 and padding 1 on `[N, C, H, W]`, the tokenizer's.
pub fn max_pool_3x3_s2(ops: Ops, x: &Tensor) -> Result<Tensor> {
    ops.max_pool2d(x, POOL)
}

/// [`max_pool_3x3_s2`] of channels-last `[N, H, W, C]`, for inference.
pub fn max_pool_3x3_s2_channels_last(x: &Tensor) -> Result<Tensor> {
    crate::kernels::maxpool::max_pool2d_channels_last(x, 3, 2, 1)
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
    use candle_core::Device;

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
