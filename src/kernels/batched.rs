//! Batched matrix products of many small matrices, one product per thread.
//!
//! Attention multiplies `T * B * heads` matrices of `[N, C / heads]` (1,024 of 64 x 48 in a
//! training step of the paper's model at batch 32). candle's CPU matmul runs them one after
//! another on the calling thread, each too small for gemm to share out, and wants a transposed
//! operand copied first. Here each product runs whole on one thread, and an operand is read
//! through its strides, so `k^T` is a view, not a copy.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// `a [B, M, K] x b [B, K, N] -> [B, M, N]`, contiguous, as `a.matmul(&b)`; either operand may
/// be any strided view (a transpose of the last two axes, a narrowed batch).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ((batch, m, k), (batch_b, k_b, n)) = (a.dims3()?, b.dims3()?);
    if (batch, k) != (batch_b, k_b) {
        candle_core::bail!(
            "batched matmul: {:?} x {:?} do not multiply",
            a.dims(),
            b.dims()
        )
    }
    let on_cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(on_cpu_f32(a) && on_cpu_f32(b)) || k == 0 {
        return a.contiguous()?.matmul(&b.contiguous()?);
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(da)), Storage::Cpu(CpuStorage::F32(db))) = (&*sa, &*sb)
    else {
        candle_core::bail!("batched matmul: expected f32 CPU tensors")
    };
    let (a, b) = (Operand::new(da, la), Operand::new(db, lb));
    let len = batch * m * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    let product = |i: usize, dst: *mut f32, parallelism| {
        // SAFETY: `dst` is the `[m, n]` block `i` of the output (row stride n); the operands'
        // views of item `i` lie inside their storage, which candle checked when it made
        // their layouts; gemm with `read_dst` false only writes the destination.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                n as isize,
                false,
                a.item(i),
                a.col_stride,
                a.row_stride,
                b.item(i),
                b.col_stride,
                b.row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    let threads = rayon::current_num_threads();
    match batch >= threads || threads == 1 {
        true => dst
            .par_chunks_mut((m * n).max(1))
            .enumerate()
            .for_each(|(i, d)| product(i, d.as_mut_ptr().cast(), gemm::Parallelism::None)),
        false => dst
            .chunks_mut((m * n).max(1))
            .enumerate()
            .for_each(|(i, d)| {
                product(i, d.as_mut_ptr().cast(), gemm::Parallelism::Rayon(threads))
            }),
    }
    // SAFETY: every item's product wrote its whole `[m, n]` block.
    unsafe { out.set_len(len) };
    drop((sa, sb));
    Tensor::from_vec(out, (batch, m, n), &candle_core::Device::Cpu)
}

/// A 3-D operand read through its layout.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    start: usize,
    batch_stride: usize,
    row_stride: isize,
    col_stride: isize,
}

impl<'a> Operand<'a> {
    fn new(data: &'a [f32], layout: &Layout) -> Self {
        let s = layout.stride();
        Self {
            data,
            start: layout.start_offset(),
            batch_stride: s[0],
            row_stride: s[1] as isize,
            col_stride: s[2] as isize,
        }
    }

    /// The first value of batch item `i`.
    fn item(&self, i: usize) -> *const f32 {
        self.data[self.start + i * self.batch_stride..].as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::max_rel_diff;
    use candle_core::Device;

    /// Plain, transposed and narrowed operands, batches above and below the thread count,
    /// against candle's matmul of the contiguous copies.
    #[test]
    fn equals_candle_on_every_view() {
        let dev = Device::Cpu;
        let r = |dims: (usize, usize, usize)| Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        let cases = [
            (r((37, 13, 9)), r((37, 9, 11))),
            (r((37, 13, 9)), r((37, 11, 9)).transpose(1, 2).unwrap()),
            (r((37, 9, 13)).transpose(1, 2).unwrap(), r((37, 9, 11))),
            (r((40, 13, 9)).narrow(0, 3, 1).unwrap(), r((1, 9, 70))),
            (r((1, 130, 90)), r((1, 70, 90)).t().unwrap()),
        ];
        for (a, b) in cases {
            let ours = matmul(&a, &b).unwrap();
            assert!(ours.is_contiguous());
            let theirs = a
                .contiguous()
                .unwrap()
                .matmul(&b.contiguous().unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_rel_diff(&ours, &theirs) < 1e-6, "{:?}", a.dims());
        }
    }

    #[test]
    fn refuses_shapes_that_do_not_multiply() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let err = matmul(&a, &Tensor::zeros((2, 5, 4), DType::F32, &dev).unwrap()).unwrap_err();
        assert!(err.to_string().contains("do not multiply"), "{err}");
    }
}
