//! Strided tensors made contiguous on every thread.
//!
//! candle's CPU copy of a strided tensor runs on the calling thread, and a transposing one
//! element by element: a training step of the paper's model makes about a gigabyte of such
//! copies (attention's heads split and merged, the convolutions' channels-last and
//! channels-first layouts), in which the other cores wait. This copy runs in parallel and
//! moves a transposed axis in square tiles, so that reads and writes both stay within cache
//! lines.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Below this many values candle's own copy is as fast.
const PARALLEL_FROM: usize = 1 << 16;

/// Side of a transposed tile: 16 floats, one cache line.
const TILE: usize = 16;

/// `t` contiguous, with the same values and gradient as `t.contiguous()`.
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous()
        || !t.device().is_cpu()
        || t.dtype() != DType::F32
        || t.elem_count() < PARALLEL_FROM
    {
        return t.contiguous();
    }
    t.apply_op1(ParallelCopy)
}

/// The copy as an op: its gradient is the output's, as the values only move.
struct ParallelCopy;

impl CustomOp1 for ParallelCopy {
    fn name(&self) -> &'static str {
        "parallel-contiguous"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = storage else {
            candle_core::bail!("parallel-contiguous: expected an f32 tensor")
        };
        let (dims, strides) = merged_axes(layout.dims(), layout.stride());
        let out = copy(src, layout.start_offset(), &dims, &strides);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// The axes with those of length 1 dropped and each run that is contiguous in the source
/// merged into one: a transpose of two axes of a 5-D tensor is then three axes or fewer.
fn merged_axes(dims: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut d, mut s): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (&len, &stride) in dims.iter().zip(strides).filter(|(&len, _)| len != 1) {
        match (d.last_mut(), s.last_mut()) {
            (Some(last), Some(last_stride)) if *last_stride == stride * len => {
                *last *= len;
                *last_stride = stride;
            }
            _ => {
                d.push(len);
                s.push(stride);
            }
        }
    }
    if d.is_empty() {
        (d, s) = (vec![1], vec![1]);
    }
    (d, s)
}

/// The values at `start + sum(index * strides)` for every index of `dims`, in row-major order.
fn copy(src: &[f32], start: usize, dims: &[usize], strides: &[usize]) -> Vec<f32> {
    let n = dims.len();
    let total: usize = dims.iter().product();
    // Not zeroed first, which would run on one thread: both copies write every value.
    let mut out = Vec::with_capacity(total);
    let to = &mut out.spare_capacity_mut()[..total];
    // An axis read with stride 1 that is not the last is transposed against the last one.
    match strides[..n - 1].iter().position(|&s| s == 1) {
        Some(j) if strides[n - 1] != 1 && dims[j] >= TILE && dims[n - 1] >= TILE => {
            transposing_copy(src, start, (dims, strides), j, to)
        }
        _ => row_copy(src, start, (dims, strides), to),
    }
    // SAFETY: the copy wrote all `total` values.
    unsafe { out.set_len(total) };
    out
}

/// The source offset of the row-major index `flat` over `dims`, through `strides`.
fn offset_of(mut flat: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut offset = 0;
    for (&len, &stride) in dims.iter().zip(strides).rev() {
        offset += flat % len * stride;
        flat /= len;
    }
    offset
}

/// The output a row of the last axis at a time, rows shared out among the threads.
fn row_copy(
    src: &[f32],
    start: usize,
    (dims, strides): (&[usize], &[usize]),
    out: &mut [MaybeUninit<f32>],
) {
    let n = dims.len();
    let (len, stride) = (dims[n - 1], strides[n - 1]);
    let rows_per_task = (PARALLEL_FROM / 4 / len).max(1);
    out.par_chunks_mut(len * rows_per_task)
        .enumerate()
        .for_each(|(task, rows)| {
            for (i, row) in rows.chunks_exact_mut(len).enumerate() {
                let at =
                    start + offset_of(task * rows_per_task + i, &dims[..n - 1], &strides[..n - 1]);
                if stride == 1 {
                    // A narrowed tensor's rows: one memcpy each.
                    row.write_copy_of_slice(&src[at..at + len]);
                    continue;
                }
                for (k, v) in row.iter_mut().enumerate() {
                    v.write(src[at + k * stride]);
                }
            }
        });
}

/// The output where axis `j` (stride 1 in the source) and the last axis swap roles: for each
/// index of the axes before `j` (one contiguous block of the output, one task), and each of
/// the axes between, the `[dims[j], dims[last]]` plane in `TILE` x `TILE` tiles.
fn transposing_copy(
    src: &[f32],
    start: usize,
    (dims, strides): (&[usize], &[usize]),
    j: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let n = dims.len();
    let (rows, cols, col_stride) = (dims[j], dims[n - 1], strides[n - 1]);
    let (outer, middle) = (
        (&dims[..j], &strides[..j]),
        (&dims[j + 1..n - 1], &strides[j + 1..n - 1]),
    );
    let mids: usize = middle.0.iter().product();
    // Output strides: axis j steps over the middle axes and the last one.
    let row_step = mids * cols;
    out.par_chunks_mut(rows * row_step)
        .enumerate()
        .for_each(|(o, block)| {
            let base = start + offset_of(o, outer.0, outer.1);
            for m in 0..mids {
                let at = base + offset_of(m, middle.0, middle.1);
                for r0 in (0..rows).step_by(TILE) {
                    for c0 in (0..cols).step_by(TILE) {
                        for r in r0..(r0 + TILE).min(rows) {
                            let to = r * row_step + m * cols;
                            for c in c0..(c0 + TILE).min(cols) {
                                block[to + c].write(src[at + r + c * col_stride]);
                            }
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A tensor whose every value is distinct.
    fn counting(dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    /// Every layout the kernels copy equals candle's copy exactly: heads split and merged,
    /// channels-last to channels-first and back, a narrowed axis, a broadcast, and sizes that
    /// leave partial tiles.
    #[test]
    fn copies_every_layout_as_candle_does() {
        let cases: Vec<Tensor> = vec![
            counting(&[8, 8, 17, 6, 48]).transpose(2, 3).unwrap(),
            counting(&[8, 8, 6, 17, 48]).transpose(2, 3).unwrap(),
            counting(&[3, 33, 35, 40]).permute((0, 3, 1, 2)).unwrap(),
            counting(&[3, 40, 33, 35]).permute((0, 2, 3, 1)).unwrap(),
            counting(&[140, 30, 40]).narrow(2, 5, 20).unwrap(),
            counting(&[300, 1, 256])
                .broadcast_as((300, 4, 256))
                .unwrap(),
            counting(&[300, 257]).t().unwrap(),
            counting(&[5, 1, 300, 1, 257]).transpose(2, 4).unwrap(),
        ];
        for t in cases {
            assert!(
                !t.is_contiguous() && t.elem_count() >= PARALLEL_FROM,
                "{:?}",
                t.dims()
            );
            let ours = contiguous(&t).unwrap();
            assert!(ours.is_contiguous());
            assert_eq!(ours.dims(), t.dims());
            let theirs = t.contiguous().unwrap();
            assert_eq!(
                ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{:?}",
                t.dims()
            );
        }
    }

    /// The gradient reaches the strided tensor's source unchanged.
    #[test]
    fn passes_the_gradient_through() {
        let x = Var::from_tensor(&counting(&[2, 300, 130])).unwrap();
        let y = contiguous(&x.as_tensor().transpose(1, 2).unwrap()).unwrap();
        let w = counting(&[2, 130, 300]);
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        let expected = w.transpose(1, 2).unwrap().contiguous().unwrap();
        assert_eq!(
            g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
