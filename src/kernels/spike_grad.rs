//! Weight gradients of layers fed by spikes, accumulate-only.
//!
//! A linear layer or convolution whose input is 0/1 spikes `S` has the weight gradient
//! `G^T . im2col(S)`: for every input (window position and channel), the sum of the
//! output-gradient rows of the pixels where that input fired. That is the spike-driven forward
//! kernel with the roles swapped: the transposed patch matrix of the spikes selects rows of the
//! output gradient. At the rates a training network fires (mostly 5-20 %) it does a fraction of
//! the dense product's work, and it reads the spikes from the bits the layer saved for backward,
//! so they are never unpacked. The input gradient `G . W` has no spikes in it and stays dense.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::conv::Window;
use super::spikes::{BlockedWeights, Gather, Schedule, SpikeBits, Windows, WORD_BITS};
use super::{layout, with_f32};

/// Gradient rows per tile: 64 KB, in L2. The forward's L1-sized tiles are for windows of a few
/// thousand inputs; here a window spans every pixel, and larger tiles cut the per-tile
/// bookkeeping (`spikeclip bench --case spike_weight_grad_r05`: 18 ms against 27 ms with the
/// forward's 96 rows, single thread).
const GRAD_TILE: usize = 256;

/// The patch matrix of the spikes under `windows`, transposed: `[kh*kw*C, B*Ho*Wo]`, row
/// `(ky, kx, c)` (the order of [`super::conv::weight_matrix`]'s columns) set at the output
/// pixels whose window has that input firing.
fn window_columns(windows: &Windows) -> Result<SpikeBits> {
    let (rows, pixels) = (windows.window_len(), windows.pixels());
    let words_per_row = pixels.div_ceil(WORD_BITS);
    // One task per 64 pixels: it owns one word of every row, built as a column and then
    // scattered into the row-major words.
    let columns: Vec<Vec<u64>> = (0..words_per_row)
        .into_par_iter()
        .map(|word| {
            let mut column = vec![0u64; rows];
            for p in word * WORD_BITS..((word + 1) * WORD_BITS).min(pixels) {
                let bit = 1u64 << (p % WORD_BITS);
                windows.for_each_tap(p, |base, row| {
                    super::spikes::for_each_active(row, |c| column[base + c] |= bit)
                });
            }
            column
        })
        .collect();
    let mut words = vec![0u64; rows * words_per_row];
    if words_per_row > 0 {
        words
            .par_chunks_mut(words_per_row)
            .enumerate()
            .for_each(|(r, row)| {
                for (w, column) in row.iter_mut().zip(&columns) {
                    *w = column[r];
                }
            });
    }
    SpikeBits::from_words(words, vec![rows, pixels])
}

/// The transposed weight gradient `[kh*kw*C, O]` of the layer reading `windows`, from its
/// output gradient as rows `[B*Ho*Wo, O]`.
fn weight_grad_rows(windows: &Windows, grad_rows: &[f32], outputs: usize) -> Result<Vec<f32>> {
    if grad_rows.len() != windows.pixels() * outputs {
        candle_core::bail!(
            "spike weight gradient: {} gradient values for {} pixels of {outputs} outputs",
            grad_rows.len(),
            windows.pixels()
        )
    }
    let columns = window_columns(windows)?;
    let pixels = columns.cols();
    let over_half = columns.row_counts().any(|n| 2 * n > pixels);
    let grads = BlockedWeights::from_rows(grad_rows, outputs, None, over_half);
    Ok(Gather {
        windows: Windows::rows(&columns),
        weights: &grads,
        // The gradient is the weight here, thousands of rows long and read once per task: as
        // few tasks as threads, so that it streams from memory as few times as possible.
        schedule: Schedule {
            tile: GRAD_TILE,
            rows_per_task: columns.rows().div_ceil(rayon::current_num_threads()),
        },
    }
    .run())
}

/// Weight gradient `[O, K]` of a linear layer from its input spikes `[..., K]` and its output
/// gradient `[..., O]`: equal to `grad^T . spikes` over the flattened leading axes.
pub fn spike_linear_weight_grad(spikes: &SpikeBits, grad: &Tensor) -> Result<Tensor> {
    let k = spikes.cols();
    let o = grad.dims().last().copied().unwrap_or(0);
    let windows = Windows::rows(spikes);
    let rows = with_f32(grad, "spike_linear_weight_grad", |g| {
        weight_grad_rows(&windows, g, o)
    })?;
    layout::contiguous(&Tensor::from_vec(rows, (k, o), &Device::Cpu)?.t()?)
}

/// Weight gradient `[O, C, kh, kw]` of the convolution `conv2d(spikes, weight, padding,
/// stride)` from its channels-last input spikes `[B, H, W, C]` and its output gradient
/// `[B, O, Ho, Wo]`.
pub fn spike_conv2d_weight_grad(
    spikes: &SpikeBits,
    grad: &Tensor,
    (kh, kw): (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, h, w, c) = spikes.dims4("spike_conv2d_weight_grad")?;
    let (gb, o, ho, wo) = grad.dims4()?;
    let win = Window {
        kh,
        kw,
        padding,
        stride,
    };
    if gb != b || win.out_size(h, w)? != (ho, wo) {
        candle_core::bail!(
            "spike_conv2d_weight_grad: gradient {:?} does not match spikes {:?} under a {kh}x{kw} window",
            grad.dims(),
            spikes.shape()
        )
    }
    let windows = Windows {
        spikes,
        dims: (b, h, w, c),
        win,
        out_hw: (ho, wo),
    };
    let grad_rows = grad.permute((0, 2, 3, 1))?;
    let rows = with_f32(&grad_rows, "spike_conv2d_weight_grad", |g| {
        weight_grad_rows(&windows, g, o)
    })?;
    layout::contiguous(
        &Tensor::from_vec(rows, (kh, kw, c, o), &Device::Cpu)?.permute((3, 2, 0, 1))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::conv2d_grads;
    use crate::kernels::test_util::max_rel_diff;

    /// Random 0/1 spikes firing at about `rate`.
    fn spikes(shape: &[usize], rate: f64) -> Tensor {
        let u = Tensor::rand(0f32, 1.0, shape, &Device::Cpu).unwrap();
        u.lt(rate)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
    }

    #[test]
    fn linear_matches_the_dense_product_at_every_rate() {
        for rate in [0.0, 0.05, 0.3, 0.7, 1.0] {
            let s = spikes(&[3, 5, 130], rate);
            let g = Tensor::randn(0f32, 1.0, (3, 5, 70), &Device::Cpu).unwrap();
            let ours = spike_linear_weight_grad(&SpikeBits::pack(&s).unwrap(), &g).unwrap();
            let dense = g
                .reshape((15, 70))
                .unwrap()
                .t()
                .unwrap()
                .matmul(&s.reshape((15, 130)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), &[70, 130]);
            assert!(max_rel_diff(&ours, &dense) < 1e-5, "rate {rate}");
        }
    }

    #[test]
    fn conv_matches_the_dense_gradient() {
        // (kernel, padding, stride): padded, strided and pointwise windows.
        for ((k, pad, stride), rate) in [((3, 1, 1), 0.1), ((3, 0, 2), 0.6), ((1, 0, 1), 0.2)] {
            let s = spikes(&[2, 6, 9, 9], rate);
            let w = Tensor::randn(0f32, 1.0, (5, 6, k, k), &Device::Cpu).unwrap();
            let y = crate::kernels::conv::conv2d(&s, &w, pad, stride).unwrap();
            let g = Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu).unwrap();
            let bits = SpikeBits::pack_channels_last(&s).unwrap();
            let ours = spike_conv2d_weight_grad(&bits, &g, (k, k), pad, stride).unwrap();
            let (_, dense) = conv2d_grads(&s, &w, &g, pad, stride).unwrap();
            assert_eq!(ours.dims(), w.dims());
            assert!(
                max_rel_diff(&ours, &dense) < 1e-5,
                "kernel {k} stride {stride}"
            );
        }
    }

    #[test]
    fn conv_rejects_a_gradient_of_another_shape() {
        let bits = SpikeBits::pack_channels_last(&spikes(&[2, 3, 8, 8], 0.2)).unwrap();
        let g = Tensor::zeros((2, 4, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = spike_conv2d_weight_grad(&bits, &g, (3, 3), 1, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match"), "{err}");
    }
}
