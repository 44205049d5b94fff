//! A LIF followed by the layer its spikes feed, a linear layer (or 1x1 convolution,
//! channels-last) or a convolution, as one differentiable op that keeps its spikes for backward
//! as bits and lets their sparsity save time.
//!
//! Composed from candle ops, the layer's autograd node would hold the LIF's f32 spikes until
//! backward, 4 bytes per neuron-step, for the weight gradient alone. This op holds them
//! bit-packed (1 bit) and gets the input gradient from the LIF's own recomputing backward, which
//! needs only the input that autograd keeps anyway. Below [`SPARSE_BELOW`] firing the forward
//! product runs accumulate-only over the bits (each output sums the weights its active inputs
//! select); above it, and for both gradients, as dense products. A linear layer's spikes come
//! from the LIF as bits: f32 spikes exist only if a dense product needs them.
//!
//! `linear_forward` and `linear_backward` run a linear layer without autograd, its input per
//! step or held over the steps, for ops that chain layers ([`super::text_mlp`]).

use std::sync::Arc;

use candle_core::{Device, Result, Tensor};

use super::conv::{conv2d, conv2d_grads, conv2d_input_grad};
use super::grad_slot::SlotParam;
use super::linear_blocks::{
    bias_gradient, block_width, input_gradient, sparse_linear, weight_gradient_into, BLOCK_FLOATS,
};
use super::spike_grad::{spike_conv2d_weight_grad, spike_linear_weight_grad};
use super::spikes::{SpikeBits, SpikeLayer};
use super::{layout, with_backward3, Grads3};
use crate::neuron::MultiStepLif;

/// Firing rate below which the accumulate-only kernels beat the dense products (they do up to
/// about 35 %, `spikeclip bench --case spike_linear_*`), with a margin.
const SPARSE_BELOW: f64 = 0.25;

/// `lif(x) . weight^T + bias` for `x [T, ..., K]`, `weight [O, K]` and `bias [O]`:
/// `[T, ..., O]`, with the same values and gradients (input, weight, bias) as
/// `lif.forward(x)?.broadcast_matmul(&weight.t()?)?.broadcast_add(bias)`.
pub fn lif_linear(
    lif: &MultiStepLif,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (o, k) = weight.dims2()?;
    if x.dims().last() != Some(&k) || x.rank() < 2 {
        candle_core::bail!(
            "lif_linear: input {:?} does not end in the weight's {k} inputs",
            x.shape()
        )
    }
    let y = apply(lif, (x, Drive::PerStep), (weight, bias), LINEAR)?;
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank checked") = o;
    y.reshape(shape)
}

/// The stride-1 convolution `conv2d(lif(x), weight, padding)` plus `bias` over all time steps
/// at once, for `x [T, B, C, H, W]`, `weight [O, C, kh, kw]` and `bias [O]`:
/// `[T * B, O, Ho, Wo]`, with the same values and gradients as the composition of the LIF op,
/// [`conv2d`] and a broadcast add.
pub fn lif_conv2d(
    lif: &MultiStepLif,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    let (_, c, _, _) = weight.dims4()?;
    if x.rank() != 5 || x.dim(2)? != c {
        candle_core::bail!("lif_conv2d: input {:?} is not [T, B, {c}, H, W]", x.shape())
    }
    let layer = Layer::Conv2d { padding };
    apply(lif, (x, Drive::PerStep), (weight, bias), layer)
}

/// How the LIF reads a layer's input `x`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Drive {
    /// `[T, ...]`: an input per step.
    PerStep,
    /// `[...]`, the input of every one of this many steps.
    Held(usize),
}

impl Drive {
    /// The spikes `[T, ...]` of `lif` on `x`.
    fn spikes(self, lif: &MultiStepLif, x: &Tensor) -> Result<Tensor> {
        match self {
            Drive::PerStep => lif.forward(x),
            Drive::Held(steps) => lif.forward_held(x, steps),
        }
    }

    /// The same spikes as bits.
    fn bits(self, lif: &MultiStepLif, x: &Tensor) -> Result<SpikeBits> {
        match self {
            Drive::PerStep => lif.forward_bits(x),
            Drive::Held(steps) => lif.forward_bits_held(x, steps),
        }
    }

    /// The gradient of `x` given that of the spikes, in any shape of as many elements.
    pub(crate) fn input_gradient(
        self,
        lif: &MultiStepLif,
        x: &Tensor,
        grad_spikes: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Drive::PerStep => lif.input_gradient(x, &grad_spikes.reshape(x.shape())?),
            Drive::Held(steps) => {
                let grad_spikes = grad_spikes.reshape([&[steps], x.dims()].concat())?;
                lif.input_gradient_held(x, &grad_spikes)
            }
        }
    }
}

/// A linear layer as the ops run it.
const LINEAR: Layer = Layer::Linear {
    block_floats: BLOCK_FLOATS,
};

/// The layer the spikes feed.
#[derive(Debug, Clone, Copy)]
enum Layer {
    /// `[M, K] x [O, K]^T`, computed in blocks of at most `block_floats` weights (see
    /// [`super::linear_blocks`]).
    Linear { block_floats: usize },
    /// Stride 1, over `[T * B, C, H, W]`.
    Conv2d { padding: usize },
}

impl Layer {
    /// The spikes of `lif` on `x` as the layer reads them, as bits (`[M, K]` for a linear
    /// layer, channels-last `[T * B, H, W, C]` for a convolution) and, for a convolution, as
    /// the f32 `[T * B, C, H, W]` they were packed from. A linear layer's come from the LIF as
    /// bits: f32 spikes exist only if the dense product needs them.
    fn spikes(
        self,
        (lif, drive): (&MultiStepLif, Drive),
        x: &Tensor,
        w: &Tensor,
    ) -> Result<(SpikeBits, Option<Tensor>)> {
        match self {
            Layer::Linear { .. } => {
                let bits = drive.bits(lif, x)?;
                let k = w.dim(1)?;
                let m = bits.shape().iter().product::<usize>() / k.max(1);
                Ok((bits.reshaped(vec![m, k])?, None))
            }
            Layer::Conv2d { .. } => {
                let spikes = drive.spikes(lif, x)?.flatten_to(1)?;
                Ok((SpikeBits::pack_channels_last(&spikes)?, Some(spikes)))
            }
        }
    }

    /// The f32 layer input back from its bits.
    fn unpack(self, bits: &SpikeBits) -> Result<Tensor> {
        let spikes = bits.unpack(&Device::Cpu)?;
        match self {
            Layer::Linear { .. } => Ok(spikes),
            Layer::Conv2d { .. } => layout::contiguous(&spikes.permute((0, 3, 1, 2))?),
        }
    }
}

/// Runs the op; a missing bias is zeros, and gets no gradient.
fn apply(
    lif: &MultiStepLif,
    (x, drive): (&Tensor, Drive),
    (weight, bias): (&Tensor, Option<&Tensor>),
    layer: Layer,
) -> Result<Tensor> {
    let o = weight.dim(0)?;
    let has_bias = bias.is_some();
    let bias = match bias {
        Some(b) if b.dims() == [o] => b.clone(),
        Some(b) => candle_core::bail!("lif_layer: bias {:?} for {o} outputs", b.shape()),
        None => Tensor::zeros(o, weight.dtype(), weight.device())?,
    };
    let (y, bits) = fire(
        lif,
        (x.detach(), drive),
        &weight.detach(),
        &bias.detach(),
        layer,
    )?;
    let lif = lif.clone();
    with_backward3(
        "lif-layer",
        [x, weight, &bias],
        y,
        move |[x, w, b], grad| {
            backward(
                (&lif, drive),
                layer,
                &bits,
                (x, w, has_bias.then_some(b)),
                grad,
            )
        },
    )
}

/// A LIF and the linear layer its spikes feed without autograd, for ops that run several
/// layers as one: the output `[M, O]` on `x` read as `drive` says, and the spikes as bits for
/// [`linear_backward`]. `x` is dropped once it has fired, before the layer's product.
pub(crate) fn linear_forward(
    lif: &MultiStepLif,
    (x, drive): (Tensor, Drive),
    (weight, bias): (&SlotParam, &SlotParam),
) -> Result<(Tensor, SpikeBits)> {
    let (w, b) = (weight.value().detach(), bias.value().detach());
    fire(lif, (x, drive), &w, &b, LINEAR)
}

/// Writes the weight and bias gradients of a [`linear_forward`] to their slots, given its
/// output's gradient `[M, O]` and its spikes: the weight's as their product, kept as the two
/// factors (see [`OuterGrad`](super::grad_slot::OuterGrad)).
pub(crate) fn linear_param_grads(
    bits: &Arc<SpikeBits>,
    (weight, bias): (&SlotParam, &SlotParam),
    grad: &Tensor,
) -> Result<()> {
    let grad = layout::contiguous(grad)?;
    weight.grad().add_product(&grad, bits.clone())?;
    bias.grad().add_tensor(&bias_gradient(&grad)?)
}

/// The backward of [`linear_forward`] given its output's gradient `[M, O]`: the gradient of
/// `x`, with the weight's and bias's written to their slots.
pub(crate) fn linear_backward(
    lif: &MultiStepLif,
    (x, drive): (&Tensor, Drive),
    bits: &Arc<SpikeBits>,
    (weight, bias): (&SlotParam, &SlotParam),
    grad: &Tensor,
) -> Result<Tensor> {
    linear_param_grads(bits, (weight, bias), grad)?;
    let w = weight.value();
    let width = block_width(w.dim(0)?, BLOCK_FLOATS);
    input_gradient(lif, (x, drive), w, &layout::contiguous(grad)?, width)
}

/// The layer's output on the spikes of `lif` on `x`, and the spikes as bits, without autograd.
/// Reads `x` and the weights in place and drops `x` (freed, if this held its last reference)
/// and any f32 spikes before the sparse kernel lays the weights out: at most one input-sized
/// temporary.
fn fire(
    lif: &MultiStepLif,
    (x, drive): (Tensor, Drive),
    w: &Tensor,
    b: &Tensor,
    layer: Layer,
) -> Result<(Tensor, SpikeBits)> {
    let (bits, input) = layer.spikes((lif, drive), &x, w)?;
    drop(x);
    let dev = Device::Cpu;
    let neuron_steps = bits.shape().iter().product::<usize>();
    let y = if (bits.count() as f64) < SPARSE_BELOW * neuron_steps as f64 {
        drop(input);
        match layer {
            Layer::Linear { block_floats } => sparse_linear(&bits, (w, b), block_floats)?,
            Layer::Conv2d { padding } => {
                SpikeLayer::new(w, Some(b))?.conv2d(&bits, padding, 1, &dev)?
            }
        }
    } else {
        let input = match input {
            Some(input) => input,
            None => layer.unpack(&bits)?,
        };
        match layer {
            Layer::Linear { .. } => input.matmul(&w.t()?)?.broadcast_add(b)?,
            Layer::Conv2d { padding } => {
                conv2d(&input, w, padding, 1)?.broadcast_add(&b.reshape((1, (), 1, 1))?)?
            }
        }
    };
    Ok((y, bits))
}

/// The backward of [`lif_linear_packed`]: the gradients of its `x` and packed weight given its
/// output's.
pub type PackedGrad =
    Box<dyn Fn(&Tensor, &Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync>;

/// [`lif_linear`] without autograd, for fused ops that run the layer inside their own: the
/// weight and bias packed as one `[O, K + 1]` tensor (bias last), the value, and its backward.
pub fn lif_linear_packed(
    lif: &MultiStepLif,
    x: &Tensor,
    packed: &Tensor,
) -> Result<(Tensor, PackedGrad)> {
    let k = packed.dim(1)? - 1;
    let w = packed.narrow(1, 0, k)?.detach().contiguous()?;
    let b = packed.narrow(1, k, 1)?.detach().squeeze(1)?.contiguous()?;
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = w.dim(0)?;
    let (y, bits) = fire(lif, (x.detach(), Drive::PerStep), &w, &b, LINEAR)?;
    let lif = lif.clone();
    let bwd = move |x: &Tensor, grad: &Tensor| {
        let grad = grad.reshape(((), w.dim(0)?))?;
        let (grad_x, grad_w, grad_b) = backward(
            (&lif, Drive::PerStep),
            LINEAR,
            &bits,
            (x, &w, Some(&b)),
            &grad,
        )?;
        let grad_packed = match (grad_w, grad_b) {
            (Some(gw), Some(gb)) => Some(Tensor::cat(&[gw, gb.unsqueeze(1)?], 1)?),
            _ => None,
        };
        let grad_x =
            grad_x.ok_or_else(|| candle_core::Error::Msg("lif_linear: no gradient".into()))?;
        Ok((grad_x, grad_packed))
    };
    Ok((y.reshape(shape)?, Box::new(bwd)))
}

/// Gradients of `x`, the weight and (if any) the bias, from the spikes' `bits`.
fn backward(
    (lif, drive): (&MultiStepLif, Drive),
    layer: Layer,
    bits: &SpikeBits,
    (x, w, b): (&Tensor, &Tensor, Option<&Tensor>),
    grad: &Tensor,
) -> Result<Grads3> {
    let grad = layout::contiguous(grad)?;
    // Below the forward's threshold the weight gradient sums output-gradient rows selected by
    // the saved bits (`kernels::spike_grad`), like the forward; above it, dense products. A
    // linear layer too wide for one block (the text encoder's first) keeps its blocked dense
    // product, which never holds a layer-sized temporary.
    let sparse = (bits.count() as f64) < SPARSE_BELOW * (bits.rows() * bits.cols()) as f64;
    let (grad_x, grad_w) = match layer {
        Layer::Linear { block_floats } => {
            let (o, k) = w.dims2()?;
            let width = block_width(o, block_floats);
            let grad_x = input_gradient(lif, (x, drive), w, &grad, width)?;
            let grad_w = if sparse && width >= k {
                spike_linear_weight_grad(bits, &grad)?
            } else {
                let mut grad_w = vec![0f32; o * k];
                weight_gradient_into(&mut grad_w, &grad, bits, width)?;
                Tensor::from_vec(grad_w, (o, k), &Device::Cpu)?
            };
            (grad_x, grad_w)
        }
        Layer::Conv2d { padding } => {
            let (grad_input, grad_w) = if sparse {
                let (kh, kw) = (w.dim(2)?, w.dim(3)?);
                let (b, h, ww, c) = bits.dims4("lif_conv2d")?;
                (
                    conv2d_input_grad(&[b, c, h, ww], w, &grad, padding, 1)?,
                    spike_conv2d_weight_grad(bits, &grad, (kh, kw), padding, 1)?,
                )
            } else {
                conv2d_grads(&layer.unpack(bits)?, w, &grad, padding, 1)?
            };
            (drive.input_gradient(lif, x, &grad_input)?, grad_w)
        }
    };
    // The bias gradient sums the output gradient over all but the channel axis: as rows
    // `[M, O]`, a conv's pixels summed first, along contiguous runs.
    let grad_b = match b {
        Some(b) => {
            let rows = match layer {
                Layer::Linear { .. } => grad.clone(),
                Layer::Conv2d { .. } => grad.flatten_from(2)?.sum(2)?,
            };
            Some(bias_gradient(&rows)?.to_device(b.device())?)
        }
        None => None,
    };
    Ok((Some(grad_x), Some(grad_w.to_device(w.device())?), grad_b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::*;
    use crate::neuron::LifConfig;
    use candle_core::Var;

    /// Values and both gradients equal the composition of the LIF op and a matmul, with the
    /// input shifted by `offset` so that the spikes fire at a rate on the `sparse` side of
    /// [`SPARSE_BELOW`], the layer run in blocks of at most `block_floats` weights.
    fn matches_composed(offset: f64, sparse: bool, block_floats: usize) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (4, 3, 5, 70), &dev).unwrap() + offset).unwrap(),
        )
        .unwrap();
        let w = Var::randn(0f32, 1.0, (9, 70), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, 9, &dev).unwrap();
        let lif = MultiStepLif::new(LifConfig::default());
        let layer = Layer::Linear { block_floats };
        let (input, params) = (
            (x.as_tensor(), Drive::PerStep),
            (w.as_tensor(), Some(b.as_tensor())),
        );
        let ours = apply(&lif, input, params, layer)
            .unwrap()
            .reshape((4, 3, 5, 9))
            .unwrap();
        let spikes = lif.forward(x.as_tensor()).unwrap();
        let rate = spikes.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert_eq!(rate < SPARSE_BELOW, sparse, "firing rate {rate}");
        let composed = spikes
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert_eq!(ours.dims(), &[4, 3, 5, 9]);
        assert!(max_rel_diff(&ours, &composed) < 1e-5);
        assert_same_gradients(ours, composed, &[&x, &w, &b], 1e-5);
    }

    #[test]
    fn matches_composed_lif_and_matmul_when_sparse() {
        matches_composed(0.5, true, BLOCK_FLOATS)
    }

    #[test]
    fn matches_composed_lif_and_matmul_when_dense() {
        matches_composed(2.0, false, BLOCK_FLOATS)
    }

    /// In blocks: sparse products over slices of 4 outputs, gradients over blocks of 64 input
    /// columns (the weight is 9 x 70).
    #[test]
    fn matches_composed_lif_and_matmul_in_blocks() {
        matches_composed(0.5, true, 280);
        matches_composed(2.0, false, 280);
    }

    /// The same for a 3x3 convolution over `[T, B, C, H, W]`, against candle's conv2d.
    fn conv_matches_composed(offset: f64, sparse: bool) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (4, 2, 5, 6, 7), &dev).unwrap() + offset).unwrap(),
        )
        .unwrap();
        let w = Var::randn(0f32, 1.0, (3, 5, 3, 3), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, 3, &dev).unwrap();
        let lif = MultiStepLif::new(LifConfig::default());
        let ours = lif_conv2d(&lif, x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 1).unwrap();
        let spikes = lif.forward(x.as_tensor()).unwrap();
        let rate = spikes.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert_eq!(rate < SPARSE_BELOW, sparse, "firing rate {rate}");
        let composed = spikes
            .flatten_to(1)
            .unwrap()
            .conv2d(w.as_tensor(), 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, 3, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), &[8, 3, 6, 7]);
        assert!(max_rel_diff(&ours, &composed) < 1e-5);
        assert_same_gradients(ours, composed, &[&x, &w, &b], 1e-4);
    }

    #[test]
    fn conv_matches_composed_lif_and_conv_when_sparse() {
        conv_matches_composed(0.5, true)
    }

    #[test]
    fn conv_matches_composed_lif_and_conv_when_dense() {
        conv_matches_composed(2.0, false)
    }

    #[test]
    fn rejects_mismatched_features() {
        let x = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let lif = MultiStepLif::new(LifConfig::default());
        let err = lif_linear(&lif, &x, &w, None).unwrap_err().to_string();
        assert!(err.contains("7 inputs"), "{err}");
    }
}
