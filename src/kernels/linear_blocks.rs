//! A linear layer fed by spikes, computed in blocks when its weight is large: the sparse forward
//! a slice of outputs at a time, the gradients a block of input columns at a time.
//!
//! Only the text encoder's first layer (2048 x 10240) is that large. Run whole, each of its
//! steps would hold layer-sized temporaries, 40 to 80 MiB apiece: the weights laid out for the
//! sparse kernel, the f32 spikes for the weight gradient, the input gradient before the LIF.
//! In blocks they are a few MiB, and every value is computed as the whole layer computes it.
//! The weight gradient itself can stay a product of two factors until it is read, a block at a
//! time ([`super::grad_slot::OuterGrad`]).

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use super::columns::by_column_blocks;
use super::lif_linear::Drive;
use super::spikes::{sparse_linear_sliced, SpikeBits, SpikeLayer, BLOCK, WORD_BITS};
use super::with_f32;
use crate::neuron::MultiStepLif;

/// Weights that a linear layer's computations handle at a time (4 MiB).
pub(crate) const BLOCK_FLOATS: usize = 1 << 20;

/// Input columns per gradient block of a layer with `outputs` outputs: a block of its weight
/// holds at most `block_floats` values (unless one word of spikes is more), in whole words of
/// spikes, so that a block's spikes unpack from their own words.
pub(crate) fn block_width(outputs: usize, block_floats: usize) -> usize {
    (block_floats / outputs.max(1) / WORD_BITS).max(1) * WORD_BITS
}

/// A linear layer's output `[M, O]` on its spikes `[M, K]` by the accumulate-only kernel, the
/// weights laid out for it a slice of whole 64-output blocks of at most `block_floats` weights
/// at a time. Each output sums the same rows in the same order whatever the slicing.
pub(crate) fn sparse_linear(
    bits: &SpikeBits,
    (w, b): (&Tensor, &Tensor),
    block_floats: usize,
) -> Result<Tensor> {
    let (o, k) = w.dims2()?;
    let outputs = (block_floats / k.max(1)).max(1);
    let outputs = match outputs >= BLOCK {
        true => outputs / BLOCK * BLOCK,
        false => outputs,
    };
    let out = sparse_linear_sliced(bits, o, outputs, |outs| {
        let slice = |t: &Tensor| t.narrow(0, outs.start, outs.len());
        SpikeLayer::new(&slice(w)?, Some(&slice(b)?))
    })?;
    Tensor::from_vec(out, (bits.rows(), o), &Device::Cpu)
}

/// The gradient of the input columns `cols` of a linear layer whose LIF reads its input as
/// `drive` says: `x_block` is those columns of the input (`[..., cols.len()]`), `grad` the
/// layer's output gradient `[M, O]`, `w` its weight. The LIF's backward of the block of
/// `grad . w`.
pub(crate) fn input_gradient_block(
    lif: &MultiStepLif,
    (x_block, drive): (&Tensor, Drive),
    (w, cols): (&Tensor, Range<usize>),
    grad: &Tensor,
) -> Result<Tensor> {
    let grad_input = grad.matmul(&w.narrow(1, cols.start, cols.len())?)?;
    drive.input_gradient(lif, x_block, &grad_input)
}

/// The gradient of a linear layer's whole input `x [..., K]` (see [`input_gradient_block`]),
/// `width` columns at a time.
pub(crate) fn input_gradient(
    lif: &MultiStepLif,
    (x, drive): (&Tensor, Drive),
    w: &Tensor,
    grad: &Tensor,
    width: usize,
) -> Result<Tensor> {
    let k = w.dim(1)?;
    let rows = x.elem_count() / k.max(1);
    let x_rows = x.reshape((rows, k))?;
    let grad_x = by_column_blocks((rows, k), width, |cols| {
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("a linear layer's input has an axis") = cols.len();
        let x_block = x_rows.narrow(1, cols.start, cols.len())?.contiguous()?;
        input_gradient_block(lif, (&x_block.reshape(dims)?, drive), (w, cols), grad)
    })?;
    grad_x.reshape(x.shape())
}

/// `grad^T . spikes` into `out`, for the output gradient `grad [M, O]` of a linear layer and
/// its input spikes `[M, K]`: the weight gradient `[O, K]`, a block of `width` spike columns
/// unpacked at a time and multiplied straight into its columns of `out` (one block: the same
/// matmul as `grad.t()?.matmul(&spikes)`).
pub(crate) fn weight_gradient_into(
    out: &mut [f32],
    grad: &Tensor,
    bits: &SpikeBits,
    width: usize,
) -> Result<()> {
    let (o, k) = (grad.dim(1)?, bits.cols());
    if out.len() != o * k {
        candle_core::bail!(
            "lif_linear: a [{o}, {k}] weight gradient into {} values",
            out.len()
        )
    }
    with_f32(&grad.contiguous()?, "lif_linear", |g| {
        for cols in column_blocks(k, width) {
            let start = cols.start;
            product_block((&mut out[start..], k), (g, o), bits, cols)?;
        }
        Ok(())
    })
}

/// The column ranges of `k` columns in blocks of at most `width`.
pub(crate) fn column_blocks(k: usize, width: usize) -> impl Iterator<Item = Range<usize>> {
    let width = width.max(1);
    (0..k)
        .step_by(width)
        .map(move |start| start..(start + width).min(k))
}

/// `grad^T . spikes[:, cols]`, `[O, cols.len()]`, into `dst` with row stride `stride`, for
/// `g`, the output gradient `[M, O]`, and spikes `[M, K]`: the spikes' columns unpacked, then
/// the matmul candle itself runs, writing in place.
pub(crate) fn product_block(
    (dst, stride): (&mut [f32], usize),
    (g, o): (&[f32], usize),
    bits: &SpikeBits,
    cols: Range<usize>,
) -> Result<()> {
    let (m, n) = (bits.rows(), cols.len());
    if g.len() != m * o || n > stride || (o > 0 && dst.len() < (o - 1) * stride + n) {
        candle_core::bail!(
            "lif_linear: a [{o}, {n}] block of a weight gradient from {} output gradients \
             for {m} rows of spikes, into {} values of stride {stride}",
            g.len(),
            dst.len()
        )
    }
    let spikes = bits.unpack_columns(cols, &Device::Cpu)?;
    let parallelism = match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    };
    with_f32(&spikes, "lif_linear", |s| {
        // SAFETY: dst holds the [o, n] block at row stride `stride` (checked above), lhs is `g`
        // [m, o] read transposed as [o, m] (column stride o) and rhs is `s` [m, n]; all three
        // are live for the call.
        unsafe {
            gemm::gemm(
                o,
                n,
                m,
                dst.as_mut_ptr(),
                1,
                stride as isize,
                false,
                g.as_ptr(),
                o as isize,
                1,
                s.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        Ok(())
    })
}

/// The bias gradient `[O]` from the output gradient as rows `[M, O]`: a matmul with ones, far
/// faster than candle's reduction over the leading axis.
pub(crate) fn bias_gradient(rows: &Tensor) -> Result<Tensor> {
    let ones = Tensor::ones((1, rows.dim(0)?), rows.dtype(), rows.device())?;
    ones.matmul(rows)?.squeeze(0)
}
