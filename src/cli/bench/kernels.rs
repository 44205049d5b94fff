//! Bench cases for [`crate::kernels`]: each of our kernels against the dense candle path it
//! replaces, on the paper's shapes. Compare the two cases of a pair from the same run: the
//! machine is shared, so absolute times drift between runs but ratios hold.

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{BatchNormConfig, VarBuilder, VarMap};

use super::{Case, Run};
use crate::bench::{measure, BenchResult, Budget};
use crate::kernels::spikes::{self, SpikeBits};
use crate::kernels::{batch_norm, conv, lif_linear, maxpool, spike_grad};
use crate::neuron::{LifConfig, MultiStepLif};

pub const CASES: &[Case] = &[
    ("conv_tokenizer", Run::Cpu(conv_tokenizer)),
    ("conv_tokenizer_candle", Run::Cpu(conv_tokenizer_candle)),
    ("conv_pointwise", Run::Cpu(conv_pointwise)),
    ("conv_pointwise_candle", Run::Cpu(conv_pointwise_candle)),
    ("dense_linear", Run::Cpu(dense_linear)),
    ("spike_linear_r05", Run::Cpu(spike_linear_r05)),
    ("spike_linear_r10", Run::Cpu(spike_linear_r10)),
    ("spike_linear_r20", Run::Cpu(spike_linear_r20)),
    ("spike_linear_r40", Run::Cpu(spike_linear_r40)),
    ("dense_conv3x3", Run::Cpu(dense_conv3x3)),
    ("spike_conv3x3_r05", Run::Cpu(spike_conv3x3_r05)),
    ("spike_conv3x3_r10", Run::Cpu(spike_conv3x3_r10)),
    ("spike_conv3x3_r20", Run::Cpu(spike_conv3x3_r20)),
    ("spike_conv3x3_r40", Run::Cpu(spike_conv3x3_r40)),
    ("dense_weight_grad", Run::Cpu(dense_weight_grad)),
    ("spike_weight_grad_r05", Run::Cpu(spike_weight_grad_r05)),
    ("spike_weight_grad_r10", Run::Cpu(spike_weight_grad_r10)),
    ("spike_weight_grad_r20", Run::Cpu(spike_weight_grad_r20)),
    ("spike_weight_grad_r40", Run::Cpu(spike_weight_grad_r40)),
    ("dense_conv3x3_grads", Run::Cpu(dense_conv3x3_grads)),
    ("spike_conv3x3_grads_r05", Run::Cpu(spike_conv3x3_grads_r05)),
    ("spike_conv3x3_grads_r10", Run::Cpu(spike_conv3x3_grads_r10)),
    ("spike_conv3x3_grads_r20", Run::Cpu(spike_conv3x3_grads_r20)),
    ("spike_conv3x3_grads_r40", Run::Cpu(spike_conv3x3_grads_r40)),
    ("dense_attention", Run::Cpu(dense_attention)),
    ("spike_attention_r05", Run::Cpu(spike_attention_r05)),
    ("spike_attention_r10", Run::Cpu(spike_attention_r10)),
    ("spike_attention_r20", Run::Cpu(spike_attention_r20)),
    ("spike_attention_r40", Run::Cpu(spike_attention_r40)),
    ("spike_pack", Run::Cpu(spike_pack)),
    ("batch_norm", Run::Cpu(batch_norm)),
    ("max_pool", Run::Cpu(max_pool)),
    ("lif_linear_fwd_bwd", Run::Cpu(lif_linear_fwd_bwd)),
    (
        "lif_linear_fwd_bwd_composed",
        Run::Cpu(lif_linear_fwd_bwd_composed),
    ),
];

/// Images (B*T) per convolution bench step: T = 4 time steps of 8 images.
const CONV_BATCH: usize = 32;

/// One convolution layer: input channels, output channels, spatial size, kernel size.
type ConvLayer = (usize, usize, usize, usize);

/// The Spikingformer tokenizer's 3x3 convolutions (padding 1).
const TOKENIZER: &[ConvLayer] = &[
    (3, 48, 32, 3),
    (48, 96, 32, 3),
    (96, 192, 32, 3),
    (192, 384, 16, 3),
    (384, 384, 8, 3),
];

/// The encoder blocks' 1x1 convolutions on 8x8 tokens: projections and the MLP.
const POINTWISE: &[ConvLayer] = &[(384, 384, 8, 1), (384, 1536, 8, 1), (1536, 384, 8, 1)];

/// Forward FLOPs of one pass over `layers` at [`CONV_BATCH`]; forward + backward is three times.
fn conv_flops(layers: &[ConvLayer]) -> f64 {
    layers
        .iter()
        .map(|&(cin, cout, size, k)| 2.0 * (CONV_BATCH * size * size * cout * cin * k * k) as f64)
        .sum()
}

type ConvFn = fn(&Tensor, &Tensor, usize) -> candle_core::Result<Tensor>;

fn ours(x: &Tensor, w: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
    conv::conv2d(x, w, padding, 1)
}

fn candles(x: &Tensor, w: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
    x.conv2d(w, padding, 1, 1, 1)
}

/// Forward and backward (input and weight gradients) of every layer, each layer on its own input.
fn conv_fwd_bwd(budget: Budget, layers: &[ConvLayer], f: ConvFn) -> anyhow::Result<BenchResult> {
    let dev = Device::Cpu;
    let vars = layers
        .iter()
        .map(|&(cin, cout, size, k)| {
            let x = Var::randn(0f32, 1.0, (CONV_BATCH, cin, size, size), &dev)?;
            let w = Var::randn(0f32, 0.05, (cout, cin, k, k), &dev)?;
            Ok((x, w, k / 2))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (flops, n) = (3.0 * conv_flops(layers), layers.len());
    let result = measure(budget, || {
        for (x, w, padding) in &vars {
            let y = f(x.as_tensor(), w.as_tensor(), *padding)?;
            let grads = y.sum_all()?.backward()?;
            grads.get(x.as_tensor()).context("no input gradient")?;
            grads.get(w.as_tensor()).context("no weight gradient")?;
        }
        Ok(())
    })?;
    println!(
        "  {n} layers, {:.1} GFLOP per step: {:.1} GFLOP/s",
        flops / 1e9,
        flops / 1e9 / result.median_s
    );
    Ok(result)
}

fn conv_tokenizer(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, TOKENIZER, ours)
}

fn conv_tokenizer_candle(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, TOKENIZER, candles)
}

fn conv_pointwise(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, POINTWISE, ours)
}

fn conv_pointwise_candle(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, POINTWISE, candles)
}

/// BatchNorm in training mode, forward and backward, on the tokenizer's second layer's output
/// (T = 4 steps of the 32-image training batch, 96 channels at 32x32): the batch statistics, the
/// normalisation and the input and affine gradients.
fn batch_norm(budget: Budget) -> anyhow::Result<BenchResult> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let bn = candle_nn::batch_norm(96, BatchNormConfig::default(), vb)?;
    let x =
        Var::from_tensor(&(Tensor::randn(0f32, 1.0, (CONV_BATCH * 4, 96, 32, 32), &dev)? + 0.5)?)?;
    let g = Tensor::randn(0f32, 1.0, x.shape(), &dev)?;
    measure(budget, || {
        let y = batch_norm::batch_norm_train(x.as_tensor(), &[&bn])?;
        let grads = (y * &g)?.sum_all()?.backward()?;
        grads.get(x.as_tensor()).context("no gradient")?;
        Ok(())
    })
}

/// The tokenizer's first training-mode max-pooling, 3x3 with stride 2 and padding 1, forward
/// and backward (T = 4 steps of the 32-image training batch, 192 channels at 32x32).
fn max_pool(budget: Budget) -> anyhow::Result<BenchResult> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(
        0f32,
        1.0,
        (CONV_BATCH * 4, 192, 32, 32),
        &dev,
    )?)?;
    let g = Tensor::randn(0f32, 1.0, (CONV_BATCH * 4, 192, 16, 16), &dev)?;
    measure(budget, || {
        let y = maxpool::max_pool2d(x.as_tensor(), 3, 2, 1)?;
        let grads = (y * &g)?.sum_all()?.backward()?;
        grads.get(x.as_tensor()).context("no gradient")?;
        Ok(())
    })
}

/// The paper's inference shapes: T = 4 time steps of B = 64 images, 384 channels on 8x8 tokens,
/// 8 heads of 48 channels.
const T_B: usize = 4 * 64;
const CHANNELS: usize = 384;
const TOKENS: usize = 8;
const HEADS: usize = 8;

/// Random 0/1 spikes firing at `rate`.
fn random_spikes(shape: &[usize], rate: f64) -> anyhow::Result<Tensor> {
    let u = Tensor::rand(0f32, 1.0, shape, &Device::Cpu)?;
    Ok(u.lt(rate)?.to_dtype(candle_core::DType::F32)?)
}

/// The dense cases' firing rate: dense time does not depend on it.
const DENSE_RATE: f64 = 0.2;

fn linear_spikes(rate: f64) -> anyhow::Result<(Tensor, Tensor)> {
    let s = random_spikes(&[T_B * TOKENS * TOKENS, CHANNELS], rate)?;
    let w = Tensor::randn(0f32, 0.05, (CHANNELS, CHANNELS), &Device::Cpu)?;
    Ok((s, w))
}

/// A 384 -> 384 projection (1x1 conv) of every token as one dense f32 matmul.
fn dense_linear(budget: Budget) -> anyhow::Result<BenchResult> {
    let (s, w) = linear_spikes(DENSE_RATE)?;
    let wt = w.t()?.contiguous()?;
    measure(budget, || {
        s.matmul(&wt)?;
        Ok(())
    })
}

/// The same projection from bit-packed spikes, adds only.
fn spike_linear(budget: Budget, rate: f64) -> anyhow::Result<BenchResult> {
    let (s, w) = linear_spikes(rate)?;
    let bits = SpikeBits::pack(&s)?;
    measure(budget, || {
        spikes::spike_linear(&bits, &w)?;
        Ok(())
    })
}

fn conv_spikes(rate: f64) -> anyhow::Result<(Tensor, Tensor)> {
    let s = random_spikes(&[T_B, CHANNELS, TOKENS, TOKENS], rate)?;
    let w = Tensor::randn(0f32, 0.05, (CHANNELS, CHANNELS, 3, 3), &Device::Cpu)?;
    Ok((s, w))
}

/// A 384 -> 384 3x3 convolution on 8x8 (the tokenizer's last, the relative position
/// embedding's) through our dense im2col + matmul, the fastest dense path we have.
fn dense_conv3x3(budget: Budget) -> anyhow::Result<BenchResult> {
    let (s, w) = conv_spikes(DENSE_RATE)?;
    measure(budget, || {
        conv::conv2d(&s, &w, 1, 1)?;
        Ok(())
    })
}

/// The same convolution gathering weight rows for the active inputs of each window.
fn spike_conv3x3(budget: Budget, rate: f64) -> anyhow::Result<BenchResult> {
    let (s, w) = conv_spikes(rate)?;
    let bits = SpikeBits::pack_channels_last(&s)?;
    measure(budget, || {
        spikes::spike_conv2d(&bits, &w, 1, 1)?;
        Ok(())
    })
}

/// An output gradient for `y`'s shape.
fn output_grad(y: &[usize]) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, y, &Device::Cpu)?)
}

/// The projection's weight gradient `grad^T . spikes` as one dense matmul, as training computes
/// it above the sparse threshold.
fn dense_weight_grad(budget: Budget) -> anyhow::Result<BenchResult> {
    let (s, _) = linear_spikes(DENSE_RATE)?;
    let gt = output_grad(s.dims())?.t()?.contiguous()?;
    measure(budget, || {
        gt.matmul(&s)?;
        Ok(())
    })
}

/// The same gradient summing, for every input, the gradient rows of the tokens where it fired.
fn spike_weight_grad(budget: Budget, rate: f64) -> anyhow::Result<BenchResult> {
    let (s, _) = linear_spikes(rate)?;
    let g = output_grad(s.dims())?;
    let bits = SpikeBits::pack(&s)?;
    measure(budget, || {
        spike_grad::spike_linear_weight_grad(&bits, &g)?;
        Ok(())
    })
}

/// Both gradients of the 3x3 convolution above, dense (input re-read as f32 patches).
fn dense_conv3x3_grads(budget: Budget) -> anyhow::Result<BenchResult> {
    let (s, w) = conv_spikes(DENSE_RATE)?;
    let g = output_grad(s.dims())?;
    measure(budget, || {
        conv::conv2d_grads(&s, &w, &g, 1, 1)?;
        Ok(())
    })
}

/// The same with the weight gradient from the spikes' bits, as a LIF-fed convolution's backward
/// runs below the sparse threshold.
fn spike_conv3x3_grads(budget: Budget, rate: f64) -> anyhow::Result<BenchResult> {
    let (s, w) = conv_spikes(rate)?;
    let g = output_grad(s.dims())?;
    let bits = SpikeBits::pack_channels_last(&s)?;
    measure(budget, || {
        conv::conv2d_input_grad(s.dims(), &w, &g, 1, 1)?;
        spike_grad::spike_conv2d_weight_grad(&bits, &g, (3, 3), 1, 1)?;
        Ok(())
    })
}

fn attention_spikes(rate: f64) -> anyhow::Result<[Tensor; 3]> {
    let shape = [T_B, HEADS, TOKENS * TOKENS, CHANNELS / HEADS];
    Ok([
        random_spikes(&shape, rate)?,
        random_spikes(&shape, rate)?,
        random_spikes(&shape, rate)?,
    ])
}

/// Spiking self-attention's (q . k^T) . v as dense f32 matmuls.
fn dense_attention(budget: Budget) -> anyhow::Result<BenchResult> {
    let [q, k, v] = attention_spikes(DENSE_RATE)?;
    let kt = k.t()?.contiguous()?;
    measure(budget, || {
        q.matmul(&kt)?.matmul(&v)?;
        Ok(())
    })
}

/// The same as popcounts of ANDed words, then integer scores added into the active values'
/// channels.
fn spike_attention(budget: Budget, rate: f64) -> anyhow::Result<BenchResult> {
    let [q, k, v] = attention_spikes(rate)?;
    let [q, k, v] = [
        SpikeBits::pack(&q)?,
        SpikeBits::pack(&k)?,
        SpikeBits::pack(&v)?,
    ];
    measure(budget, || {
        spikes::spike_attention(&q, &k, &v)?;
        Ok(())
    })
}

/// Packing one block's activations, the price of entering the sparse path from f32 spikes.
fn spike_pack(budget: Budget) -> anyhow::Result<BenchResult> {
    let (s, _) = linear_spikes(DENSE_RATE)?;
    measure(budget, || {
        SpikeBits::pack(&s)?;
        Ok(())
    })
}

/// LIF then a 384 -> 384 projection of every token, forward and backward, training shapes
/// (T = 4, B = 32): `fused` keeps the spikes for backward as bits, otherwise as f32.
fn lif_projection(budget: Budget, fused: bool) -> anyhow::Result<BenchResult> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(
        &(Tensor::randn(0f32, 1.0, (4, 32 * TOKENS * TOKENS, CHANNELS), &dev)? + 0.5)?,
    )?;
    let w = Var::randn(0f32, 0.05, (CHANNELS, CHANNELS), &dev)?;
    let lif = MultiStepLif::new(LifConfig::default());
    measure(budget, || {
        let y = if fused {
            lif_linear::lif_linear(&lif, x.as_tensor(), w.as_tensor(), None)?
        } else {
            lif.forward(x.as_tensor())?
                .broadcast_matmul(&w.as_tensor().t()?)?
        };
        let grads = y.sum_all()?.backward()?;
        grads.get(x.as_tensor()).context("no input gradient")?;
        grads.get(w.as_tensor()).context("no weight gradient")?;
        Ok(())
    })
}

fn lif_linear_fwd_bwd(budget: Budget) -> anyhow::Result<BenchResult> {
    lif_projection(budget, true)
}

fn lif_linear_fwd_bwd_composed(budget: Budget) -> anyhow::Result<BenchResult> {
    lif_projection(budget, false)
}

/// Named cases at the firing rates trained models show (5-40 %).
macro_rules! at_rates {
    ($kernel:ident: $($case:ident = $rate:expr),*) => {
        $(fn $case(budget: Budget) -> anyhow::Result<BenchResult> { $kernel(budget, $rate) })*
    };
}

at_rates!(spike_linear: spike_linear_r05 = 0.05, spike_linear_r10 = 0.1, spike_linear_r20 = 0.2, spike_linear_r40 = 0.4);
at_rates!(spike_conv3x3: spike_conv3x3_r05 = 0.05, spike_conv3x3_r10 = 0.1, spike_conv3x3_r20 = 0.2, spike_conv3x3_r40 = 0.4);
at_rates!(spike_weight_grad: spike_weight_grad_r05 = 0.05, spike_weight_grad_r10 = 0.1, spike_weight_grad_r20 = 0.2, spike_weight_grad_r40 = 0.4);
at_rates!(spike_conv3x3_grads: spike_conv3x3_grads_r05 = 0.05, spike_conv3x3_grads_r10 = 0.1, spike_conv3x3_grads_r20 = 0.2, spike_conv3x3_grads_r40 = 0.4);
at_rates!(spike_attention: spike_attention_r05 = 0.05, spike_attention_r10 = 0.1, spike_attention_r20 = 0.2, spike_attention_r40 = 0.4);
