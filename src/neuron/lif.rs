//! The multi-step leaky integrate-and-fire (LIF) neuron as one fused op with a hand-written
//! backward.
//!
//! Composed from tensor ops, T steps of charge, fire and reset leave about ten intermediate
//! tensors per step for autograd to keep, and backprop through time is where SNN training runs
//! out of memory (SpikingJelly issue 422). The fused op keeps nothing but its input: backward
//! recomputes each neuron's membrane trajectory, T values held in a cache-sized buffer, and runs
//! backprop through time in the same pass. The loops themselves live in `lif_kernel`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use serde::{Deserialize, Serialize};

use super::lif_kernel;
use super::monitor::SpikeMonitor;
use super::surrogate::Surrogate;
use crate::kernels::spikes::SpikeBits;
use crate::kernels::with_f32;

/// Neuron parameters, with SpikingJelly's `MultiStepLIFNode` meaning and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LifConfig {
    /// Membrane time constant; the leak per step is `1 / tau`.
    pub tau: f32,
    pub v_threshold: f32,
    /// `Some(v)`: hard reset to `v` after a spike. `None`: soft reset (subtract the threshold).
    pub v_reset: Option<f32>,
    /// Stop the gradient through the spike inside the reset, as SpikeCLIP trains.
    pub detach_reset: bool,
    /// Scale the input by `1 / tau` as well as the leak.
    pub decay_input: bool,
    pub surrogate: Surrogate,
}

impl Default for LifConfig {
    fn default() -> Self {
        Self {
            tau: 2.0,
            v_threshold: 1.0,
            v_reset: Some(0.0),
            detach_reset: true,
            decay_input: true,
            surrogate: Surrogate::default(),
        }
    }
}

impl LifConfig {
    /// The neuron after `q . k^T . v` in spiking self-attention: threshold 0.5.
    pub fn attention() -> Self {
        Self {
            v_threshold: 0.5,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.tau.is_finite() && self.tau >= 1.0) {
            candle_core::bail!("LIF: tau must be finite and >= 1, got {}", self.tau)
        }
        if !self.v_threshold.is_finite() {
            candle_core::bail!("LIF: v_threshold must be finite, got {}", self.v_threshold)
        }
        if let Some(v) = self.v_reset {
            if !v.is_finite() {
                candle_core::bail!("LIF: v_reset must be finite, got {v}")
            }
        }
        Ok(())
    }
}

/// A layer of multi-step LIF neurons: input `[T, ...]` (f32), output spikes of the same shape.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use spikeclip::neuron::{LifConfig, MultiStepLif};
///
/// let lif = MultiStepLif::new(LifConfig::default());
/// // T = 3 steps of a constant input 0.8: the membrane reaches 0.4, 0.6, 0.7 and never fires.
/// let x = Tensor::full(0.8f32, (3, 2), &Device::Cpu)?;
/// assert_eq!(lif.forward(&x)?.sum_all()?.to_scalar::<f32>()?, 0.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct MultiStepLif {
    cfg: LifConfig,
    monitor: SpikeMonitor,
}

impl MultiStepLif {
    pub fn new(cfg: LifConfig) -> Self {
        Self {
            cfg,
            monitor: SpikeMonitor::new(),
        }
    }

    pub fn config(&self) -> &LifConfig {
        &self.cfg
    }

    /// The layer's spike counter, off until enabled.
    pub fn monitor(&self) -> &SpikeMonitor {
        &self.monitor
    }

    /// Runs the neurons over the leading time axis, from a membrane at rest.
    ///
    /// CPU tensors run the fused kernel in place; tensors on another device take a round trip
    /// through the CPU (the op has no GPU kernel yet), gradients included.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let op = LifForward {
            cfg: self.cfg,
            monitor: self.monitor.is_enabled().then(|| self.monitor.clone()),
        };
        if x.device().is_cpu() {
            x.contiguous()?.apply_op1(op)
        } else {
            let cpu = x.to_device(&candle_core::Device::Cpu)?.contiguous()?;
            cpu.apply_op1(op)?.to_device(x.device())
        }
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        self.cfg.validate()?;
        if x.rank() == 0 || x.dim(0)? == 0 {
            candle_core::bail!(
                "LIF: input must be [T, ...] with T >= 1, got {:?}",
                x.shape()
            )
        }
        if x.dtype() != DType::F32 {
            candle_core::bail!("LIF: input must be f32, got {:?}", x.dtype())
        }
        Ok(())
    }

    /// The spikes of [`Self::forward`] packed along the last axis, for the spike-driven
    /// inference kernels: the f32 spike tensor between them would be 32 times the bits, written
    /// once and read once. Counted by the monitor like `forward`; no gradient flows.
    pub fn forward_bits(&self, x: &Tensor) -> Result<SpikeBits> {
        self.check_input(x)?;
        let x = x.to_device(&candle_core::Device::Cpu)?;
        let (n, cols) = (neurons(x.shape()), x.dims()[x.rank() - 1]);
        let words = with_f32(&x, "LIF", |x| {
            Ok(lif_kernel::forward_bits(&self.cfg, x, n, cols))
        })?;
        let bits = SpikeBits::from_words(words, x.dims().to_vec())?;
        if self.monitor.is_enabled() {
            self.monitor.record(&bits.counts_per_leading(), n as u64);
        }
        Ok(bits)
    }

    /// Gradient of the input `x [T, ...]` given the gradient of the spikes it produces, without
    /// autograd: for fused ops that keep their spikes in a compact form of their own instead of
    /// the f32 tensor autograd would hold.
    pub fn input_gradient(&self, x: &Tensor, grad_spikes: &Tensor) -> Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let x = x.to_device(&cpu)?.contiguous()?;
        let grad = grad_spikes.to_device(&cpu)?.contiguous()?;
        x.apply_op2_no_bwd(&grad, &LifBackward { cfg: self.cfg })?
            .to_device(grad_spikes.device())
    }
}

impl Module for MultiStepLif {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        MultiStepLif::forward(self, xs)
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        other => candle_core::bail!("LIF: expected f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("LIF: input must be contiguous"),
    }
}

/// Neurons per time step of a `[T, ...]` shape.
fn neurons(shape: &Shape) -> usize {
    shape.elem_count() / shape.dims()[0]
}

struct LifForward {
    cfg: LifConfig,
    monitor: Option<SpikeMonitor>,
}

impl CustomOp1 for LifForward {
    fn name(&self) -> &'static str {
        "multi-step-lif"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let n = neurons(layout.shape());
        let (spikes, per_step) = lif_kernel::forward(&self.cfg, x, n, self.monitor.is_some());
        if let Some(m) = &self.monitor {
            m.record(&per_step, n as u64);
        }
        Ok((CpuStorage::F32(spikes), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        let x = arg.contiguous()?;
        Ok(Some(
            x.apply_op2_no_bwd(&grad, &LifBackward { cfg: self.cfg })?,
        ))
    }
}

/// Gradient of the input from the input and the gradient of the spikes.
struct LifBackward {
    cfg: LifConfig,
}

impl CustomOp2 for LifBackward {
    fn name(&self) -> &'static str {
        "multi-step-lif-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if xl.shape() != gl.shape() {
            candle_core::bail!(
                "LIF backward: shape mismatch {:?} vs {:?}",
                xl.shape(),
                gl.shape()
            )
        }
        let (x, g) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let gx = lif_kernel::backward(&self.cfg, x, g, neurons(xl.shape()));
        Ok((CpuStorage::F32(gx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Rows longer and shorter than a word, more neurons than one work item, and both charge
    /// rules the models use.
    #[test]
    fn packed_spikes_are_the_forward_spikes_and_are_counted() -> Result<()> {
        for (cols, cfg) in [
            (48, LifConfig::attention()),
            (130, LifConfig::default()),
            (7, LifConfig::default()),
        ] {
            let x = (Tensor::randn(0.6f32, 1.0, (4, 3, 29, cols), &Device::Cpu)? * 1.5)?;
            let lif = MultiStepLif::new(cfg);
            lif.monitor().enable();
            let dense = lif.forward(&x)?;
            let dense_counts = lif.monitor().counts();
            lif.monitor().reset();
            let bits = lif.forward_bits(&x)?;
            assert_eq!(bits, SpikeBits::pack(&dense)?, "cols {cols}");
            assert_eq!(lif.monitor().counts(), dense_counts, "cols {cols}");
            assert!(bits.count() > 0);
        }
        Ok(())
    }
}
