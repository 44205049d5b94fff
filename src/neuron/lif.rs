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

use super::lif_kernel::{self, Steps};
use super::monitor::SpikeMonitor;
use super::surrogate::Surrogate;
use crate::kernels::spikes::SpikeBits;
use crate::kernels::with_f32;
use crate::kernels::{layout, simd};

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
        self.run(x, Steps::PerStep)
    }

    /// The spikes `[steps, ...]` of `x [...]` held as the input of every step (direct
    /// encoding): `forward` of `x` repeated over a new leading axis, without the repeat in
    /// memory. Its gradient is the repeat's, summed over the steps.
    pub fn forward_held(&self, x: &Tensor, steps: usize) -> Result<Tensor> {
        self.check_held(x, steps)?;
        self.run(x, Steps::Held(steps))
    }

    fn run(&self, x: &Tensor, steps: Steps) -> Result<Tensor> {
        let op = LifForward {
            cfg: self.cfg,
            monitor: self.monitor.is_enabled().then(|| self.monitor.clone()),
            steps,
        };
        if x.device().is_cpu() {
            layout::contiguous(x)?.apply_op1(op)
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
        check_f32(x)
    }

    fn check_held(&self, x: &Tensor, steps: usize) -> Result<()> {
        self.cfg.validate()?;
        if steps == 0 || x.rank() == 0 {
            candle_core::bail!(
                "LIF: a held input needs at least one axis and one step, got {:?} for {steps}",
                x.shape()
            )
        }
        check_f32(x)
    }

    /// The spikes of [`Self::forward`] packed along the last axis, for the spike-driven
    /// kernels: the f32 spike tensor between them would be 32 times the bits, written once and
    /// read once. Counted by the monitor like `forward`; no gradient flows.
    pub fn forward_bits(&self, x: &Tensor) -> Result<SpikeBits> {
        self.check_input(x)?;
        self.bits(x, Steps::PerStep)
    }

    /// [`Self::forward_held`]'s spikes as bits, as [`Self::forward_bits`] gives them.
    pub fn forward_bits_held(&self, x: &Tensor, steps: usize) -> Result<SpikeBits> {
        self.check_held(x, steps)?;
        self.bits(x, Steps::Held(steps))
    }

    fn bits(&self, x: &Tensor, steps: Steps) -> Result<SpikeBits> {
        let x = x.to_device(&candle_core::Device::Cpu)?;
        let (n, cols) = (neurons(x.shape(), steps), x.dims()[x.rank() - 1]);
        let words = with_f32(&x, "LIF", |x| {
            Ok(lif_kernel::forward_bits(
                simd::LIF.level(),
                &self.cfg,
                x,
                (n, cols),
                (steps, false),
            ))
        })?;
        let bits = SpikeBits::from_words(words, spikes_shape(x.shape(), steps).dims().to_vec())?;
        self.observe(&bits)?;
        Ok(bits)
    }

    /// That the settings are valid, before [`Self::fire_rows`].
    pub(crate) fn check_config(&self) -> Result<()> {
        self.cfg.validate()
    }

    /// Spikes `[T, rows, cols.div_ceil(64)]` words of the input `x [T, rows * cols]` over
    /// `steps` steps, as [`Self::forward_bits`] packs them, computed on the calling thread and
    /// not counted: for kernels that make a LIF's input a piece at a time in their own parallel
    /// tasks, never writing it whole. Their result goes to [`Self::observe`].
    pub(crate) fn fire_rows(&self, x: &[f32], steps: usize, cols: usize) -> Vec<u64> {
        let n = x.len().checked_div(steps).unwrap_or(0);
        lif_kernel::forward_bits(
            simd::LIF.level(),
            &self.cfg,
            x,
            (n, cols),
            (Steps::PerStep, true),
        )
    }

    /// The monitor's record of spikes `[T, ...]` this LIF fired.
    pub(crate) fn observe(&self, bits: &SpikeBits) -> Result<()> {
        if self.monitor.is_enabled() {
            let n: usize = bits.shape()[1..].iter().product();
            self.monitor.record(&bits.counts_per_leading(), n as u64);
            if self.monitor.is_tapped() {
                let spikes = bits.unpack(&candle_core::Device::Cpu)?.flatten_all()?;
                self.monitor
                    .record_samples(&spikes.to_vec1::<f32>()?, bits.shape()[0]);
            }
        }
        Ok(())
    }

    /// Gradient of the input `x [T, ...]` given the gradient of the spikes it produces, without
    /// autograd: for fused ops that keep their spikes in a compact form of their own instead of
    /// the f32 tensor autograd would hold.
    pub fn input_gradient(&self, x: &Tensor, grad_spikes: &Tensor) -> Result<Tensor> {
        self.gradient(x, grad_spikes, Steps::PerStep)
    }

    /// [`Self::input_gradient`] for an input `x [...]` held over the steps of `grad_spikes
    /// [steps, ...]` ([`Self::forward_held`]): `[...]`, summed over the steps.
    pub fn input_gradient_held(&self, x: &Tensor, grad_spikes: &Tensor) -> Result<Tensor> {
        self.gradient(x, grad_spikes, Steps::Held(grad_spikes.dim(0)?))
    }

    fn gradient(&self, x: &Tensor, grad_spikes: &Tensor, steps: Steps) -> Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        let x = layout::contiguous(&x.to_device(&cpu)?)?;
        let grad = layout::contiguous(&grad_spikes.to_device(&cpu)?)?;
        let op = LifBackward {
            cfg: self.cfg,
            steps,
        };
        x.apply_op2_no_bwd(&grad, &op)?
            .to_device(grad_spikes.device())
    }
}

fn check_f32(x: &Tensor) -> Result<()> {
    if x.dtype() != DType::F32 {
        candle_core::bail!("LIF: input must be f32, got {:?}", x.dtype())
    }
    Ok(())
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

/// Neurons per time step of an input of `shape` read as `steps` says.
fn neurons(shape: &Shape, steps: Steps) -> usize {
    match steps {
        Steps::PerStep => shape.elem_count() / shape.dims()[0],
        Steps::Held(_) => shape.elem_count(),
    }
}

/// The spikes' shape for an input of `shape` read as `steps` says: `[T, ...]`.
fn spikes_shape(shape: &Shape, steps: Steps) -> Shape {
    match steps {
        Steps::PerStep => shape.clone(),
        Steps::Held(steps) => [&[steps], shape.dims()].concat().into(),
    }
}

struct LifForward {
    cfg: LifConfig,
    monitor: Option<SpikeMonitor>,
    steps: Steps,
}

impl CustomOp1 for LifForward {
    fn name(&self) -> &'static str {
        "multi-step-lif"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        let n = neurons(layout.shape(), self.steps);
        let (spikes, per_step) = lif_kernel::forward(
            simd::LIF.level(),
            &self.cfg,
            x,
            n,
            self.steps,
            self.monitor.is_some(),
        );
        let shape = spikes_shape(layout.shape(), self.steps);
        if let Some(m) = &self.monitor {
            m.record(&per_step, n as u64);
            m.record_samples(&spikes, shape.dims()[0]);
        }
        Ok((CpuStorage::F32(spikes), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        let x = arg.contiguous()?;
        let op = LifBackward {
            cfg: self.cfg,
            steps: self.steps,
        };
        Ok(Some(x.apply_op2_no_bwd(&grad, &op)?))
    }
}

/// Gradient of the input from the input and the gradient of the spikes.
struct LifBackward {
    cfg: LifConfig,
    steps: Steps,
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
        if spikes_shape(xl.shape(), self.steps) != *gl.shape() {
            candle_core::bail!(
                "LIF backward: gradient {:?} for the spikes of input {:?}",
                gl.shape(),
                xl.shape()
            )
        }
        let (x, g) = (f32_slice(xs, xl)?, f32_slice(gs, gl)?);
        let n = neurons(xl.shape(), self.steps);
        let gx = lif_kernel::backward(simd::LIF.level(), &self.cfg, x, g, n, self.steps);
        Ok((CpuStorage::F32(gx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A held input fires, is counted and gets its gradient as its repeat over the steps does,
    /// exactly: the same loops, and the steps' gradients summed in candle's order.
    #[test]
    fn a_held_input_is_its_repeat_over_the_steps() -> Result<()> {
        let dev = Device::Cpu;
        let x =
            candle_core::Var::from_tensor(&(Tensor::randn(0.6f32, 1.0, (3, 1100), &dev)? * 1.5)?)?;
        let lif = MultiStepLif::new(LifConfig::default());
        lif.monitor().enable();
        let held = lif.forward_held(x.as_tensor(), 4)?;
        let held_counts = lif.monitor().counts();
        lif.monitor().reset();
        let repeated = x.as_tensor().unsqueeze(0)?.broadcast_as((4, 3, 1100))?;
        let spikes = lif.forward(&repeated)?;
        assert_eq!(held.dims(), &[4, 3, 1100]);
        assert_eq!(held.to_vec3::<f32>()?, spikes.to_vec3::<f32>()?);
        assert_eq!(lif.monitor().counts(), held_counts);
        lif.monitor().reset();
        assert_eq!(
            lif.forward_bits_held(x.as_tensor(), 4)?,
            SpikeBits::pack(&held)?
        );
        assert_eq!(lif.monitor().counts(), held_counts);
        let g = Tensor::randn(0f32, 1.0, (4, 3, 1100), &dev)?;
        let gradient = |s: Tensor| -> Result<Vec<Vec<f32>>> {
            (s * &g)?
                .sum_all()?
                .backward()?
                .get(x.as_tensor())
                .unwrap()
                .to_vec2()
        };
        let want = gradient(spikes)?;
        assert_eq!(gradient(held)?, want);
        assert_eq!(
            lif.input_gradient_held(x.as_tensor(), &g)?
                .to_vec2::<f32>()?,
            want
        );
        assert!(lif.forward_held(x.as_tensor(), 0).is_err());
        assert!(lif
            .input_gradient_held(x.as_tensor(), &g.narrow(2, 0, 5)?)
            .is_err());
        Ok(())
    }

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
