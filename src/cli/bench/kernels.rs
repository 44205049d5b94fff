//! Bench cases for [`crate::kernels`]: each of our kernels against the dense candle path it
//! replaces, on the paper's shapes. Compare the two cases of a pair from the same run: the
//! machine is shared, so absolute times drift between runs but ratios hold.

use anyhow::Context;
use candle_core::{Device, Tensor, Var};

use crate::bench::{measure, BenchResult, Budget};
use crate::kernels::conv;

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

pub fn conv_tokenizer(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, TOKENIZER, ours)
}

pub fn conv_tokenizer_candle(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, TOKENIZER, candles)
}

pub fn conv_pointwise(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, POINTWISE, ours)
}

pub fn conv_pointwise_candle(budget: Budget) -> anyhow::Result<BenchResult> {
    conv_fwd_bwd(budget, POINTWISE, candles)
}
