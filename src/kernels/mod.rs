//! Hand-written CPU kernels for the hot paths candle leaves slow: convolution as im2col +
//! matmul (candle's own conv2d backward goes through conv_transpose2d at a few GFLOP/s) and
//! accumulate-only kernels over bit-packed spikes, which turn spike sparsity into wall-clock time.

pub mod batch_norm;
pub mod conv;
pub mod lif_linear;
pub mod maxpool;
pub mod spikes;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The f32 data of a contiguous CPU tensor; our kernels index it directly.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected an f32 tensor, got {:?}", storage.dtype())
    };
    match layout.contiguous_offsets() {
        Some((lo, hi)) => Ok(&data[lo..hi]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// `f` on the f32 data of `t`, a CPU tensor, in place (made contiguous first if it is not).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(contiguous_f32(s, layout, op)?),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// Comparisons shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Tensor, Var};

    /// Largest absolute difference relative to the largest magnitude of `b`.
    pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// `ours` and `theirs` give the same gradients, within `tol` relative, to every var in
    /// `vars` under the same random upstream gradient.
    pub fn assert_same_gradients(ours: Tensor, theirs: Tensor, vars: &[&Var], tol: f32) {
        let g = Tensor::randn(0f32, 1.0, theirs.dims(), theirs.device()).unwrap();
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in vars {
            let (a, b) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_rel_diff(a, b) < tol,
                "gradient differs for {:?}",
                v.dims()
            );
        }
    }
}
