//! Hand-written CPU kernels for the hot paths candle leaves slow: convolution as im2col +
//! matmul (candle's own conv2d backward goes through conv_transpose2d at a few GFLOP/s) and
//! accumulate-only kernels over bit-packed spikes, which turn spike sparsity into wall-clock time.

pub mod conv;
pub mod lif_linear;
pub mod maxpool;
pub mod spikes;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

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
