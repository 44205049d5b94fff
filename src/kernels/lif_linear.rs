//! LIF followed by a linear layer (or 1x1 convolution, channels-last) as one differentiable op
//! that keeps its spikes for backward as bits and lets their sparsity save time.
//!
//! Composed from candle ops, the linear layer's autograd node would hold the LIF's f32 spikes
//! until backward, 4 bytes per neuron-step, for the weight gradient alone. This op holds them
//! bit-packed (1 bit) and gets the input gradient from the LIF's own recomputing backward, which
//! needs only the input that autograd keeps anyway. Two of the layer's three products are fed by
//! the spikes: the output, a sum of the weight columns each row's active inputs select, and the
//! weight gradient, a sum of the upstream gradient rows each input is active in. Below
//! [`SPARSE_BELOW`] firing both run accumulate-only over the bits; above it, as dense matmuls.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};

use super::contiguous_f32;
use super::spikes::{SpikeBits, SpikeLayer};
use crate::neuron::MultiStepLif;

/// Firing rate below which the accumulate-only kernels beat candle's matmul (they do up to
/// about 35 %, `spikeclip bench --case spike_linear_*`), with a margin for the weight gradient,
/// whose gathered rows are longer.
const SPARSE_BELOW: f64 = 0.25;

/// `lif(x) . weight^T` for `x [T, ..., K]` and `weight [O, K]`: `[T, ..., O]`, with the same
/// values and gradients (input and weight) as `lif.forward(x)?.broadcast_matmul(&weight.t()?)`.
pub fn lif_linear(lif: &MultiStepLif, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (o, k) = weight.dims2()?;
    if x.dims().last() != Some(&k) || x.rank() < 2 {
        candle_core::bail!(
            "lif_linear: input {:?} does not end in the weight's {k} inputs",
            x.shape()
        )
    }
    let op = LifLinear {
        lif: lif.clone(),
        saved: Mutex::new(None),
    };
    let y = x.contiguous()?.apply_op2(&weight.contiguous()?, op)?;
    let mut shape = x.dims().to_vec();
    *shape.last_mut().expect("rank checked") = o;
    y.reshape(shape)
}

struct LifLinear {
    lif: MultiStepLif,
    /// The forward pass's spikes `[M, K]`, for the weight gradient.
    saved: Mutex<Option<SpikeBits>>,
}

impl CustomOp2 for LifLinear {
    fn name(&self) -> &'static str {
        "lif-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dev = Device::Cpu;
        let x = Tensor::from_slice(contiguous_f32(xs, xl, "lif_linear")?, xl.shape(), &dev)?;
        let w = Tensor::from_slice(contiguous_f32(ws, wl, "lif_linear")?, wl.shape(), &dev)?;
        let k = w.dim(1)?;
        let spikes = self.lif.forward(&x)?.reshape(((), k))?;
        let bits = SpikeBits::pack(&spikes)?;
        let rate = bits.count() as f64 / spikes.elem_count().max(1) as f64;
        let y = if rate < SPARSE_BELOW {
            SpikeLayer::new(&w, None)?.linear(&bits, &dev)?
        } else {
            spikes.matmul(&w.t()?)?
        };
        *self.saved.lock().map_err(poisoned)? = Some(bits);
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().map_err(poisoned)?;
        let Some(bits) = guard.as_ref() else {
            candle_core::bail!("lif_linear: backward before forward")
        };
        let grad = grad.contiguous()?;
        let grad_spikes = grad.matmul(w)?.reshape(x.shape())?;
        let grad_x = self.lif.input_gradient(x, &grad_spikes)?;
        let grad_w = grad.t()?.matmul(&bits.unpack(&Device::Cpu)?)?;
        Ok((Some(grad_x), Some(grad_w.to_device(w.device())?)))
    }
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("lif_linear: saved spikes poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::*;
    use crate::neuron::LifConfig;
    use candle_core::Var;

    /// Values and both gradients equal the composition of the LIF op and a matmul, with the
    /// input shifted by `offset` so that the spikes fire at a rate on the `sparse` side of
    /// [`SPARSE_BELOW`].
    fn matches_composed(offset: f64, sparse: bool) {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 1.0, (4, 3, 5, 70), &dev).unwrap() + offset).unwrap(),
        )
        .unwrap();
        let w = Var::randn(0f32, 1.0, (9, 70), &dev).unwrap();
        let lif = MultiStepLif::new(LifConfig::default());
        let ours = lif_linear(&lif, x.as_tensor(), w.as_tensor()).unwrap();
        let spikes = lif.forward(x.as_tensor()).unwrap();
        let rate = spikes.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert_eq!(rate < SPARSE_BELOW, sparse, "firing rate {rate}");
        let composed = spikes
            .broadcast_matmul(&w.as_tensor().t().unwrap())
            .unwrap();
        assert_eq!(ours.dims(), &[4, 3, 5, 9]);
        assert!(max_rel_diff(&ours, &composed) < 1e-5);
        assert_same_gradients(ours, composed, &[&x, &w], 1e-5);
    }

    #[test]
    fn matches_composed_lif_and_matmul_when_sparse() {
        matches_composed(0.5, true)
    }

    #[test]
    fn matches_composed_lif_and_matmul_when_dense() {
        matches_composed(2.0, false)
    }

    #[test]
    fn rejects_mismatched_features() {
        let x = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let lif = MultiStepLif::new(LifConfig::default());
        let err = lif_linear(&lif, &x, &w).unwrap_err().to_string();
        assert!(err.contains("7 inputs"), "{err}");
    }
}
