//! The multi-step leaky integrate-and-fire (LIF) neuron as one fused op with a hand-written
//! backward.
//!
//! Composed from tensor ops, T steps of charge, fire and reset leave about ten intermediate
//! tensors per step for autograd to keep, and backprop through time is where SNN training runs
//! out of memory (SpikingJelly issue 422). The fused op keeps nothing but its input: backward
//! recomputes each neuron's membrane trajectory, T values held in a cache-sized buffer, and runs
//! backprop through time in the same pass. Both passes are vectorised over neurons and parallel
//! over chunks of them.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::monitor::SpikeMonitor;
use super::surrogate::Surrogate;

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
}

impl Module for MultiStepLif {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        MultiStepLif::forward(self, xs)
    }
}

/// Neurons per work item: T membrane values of this many neurons stay in L1/L2 during backward.
const CHUNK: usize = 1024;

/// The scalar constants of one configuration, computed the way SpikingJelly's Python computes
/// them (in double precision, then rounded), so spikes match it bit for bit.
#[derive(Clone, Copy)]
struct Dynamics {
    tau: f32,
    v_th: f32,
    v_reset: f32,
    hard_reset: bool,
    decay_input: bool,
    detach_reset: bool,
    /// `1 - 1 / tau`: how much of the membrane survives a step, and so dH[t] / dV[t-1].
    keep: f32,
    surrogate: Surrogate,
}

impl Dynamics {
    fn new(cfg: &LifConfig) -> Self {
        Self {
            tau: cfg.tau,
            v_th: cfg.v_threshold,
            v_reset: cfg.v_reset.unwrap_or(0.0),
            hard_reset: cfg.v_reset.is_some(),
            decay_input: cfg.decay_input,
            detach_reset: cfg.detach_reset,
            keep: (1.0 - 1.0 / cfg.tau as f64) as f32,
            surrogate: cfg.surrogate,
        }
    }

    /// Membrane potential after integrating `x` from `v`, in SpikingJelly's operation order.
    #[inline(always)]
    fn charge(&self, v: f32, x: f32) -> f32 {
        match (self.decay_input, self.v_reset == 0.0) {
            (true, true) => v + (x - v) / self.tau,
            (true, false) => v + (x - (v - self.v_reset)) / self.tau,
            (false, true) => v * self.keep + x,
            (false, false) => v - (v - self.v_reset) / self.tau + x,
        }
    }

    #[inline(always)]
    fn reset(&self, h: f32, spike: bool) -> f32 {
        match (spike, self.hard_reset) {
            (false, _) => h,
            (true, true) => self.v_reset,
            (true, false) => h - self.v_th,
        }
    }

    /// dV[t] / dH[t] through the reset, given the surrogate slope `sg` at H[t].
    #[inline(always)]
    fn reset_slope(&self, h: f32, spike: bool, sg: f32) -> f32 {
        let through_spike = if self.detach_reset { 0.0 } else { sg };
        if self.hard_reset {
            let s = if spike { 1.0 } else { 0.0 };
            (1.0 - s) + (self.v_reset - h) * through_spike
        } else {
            1.0 - self.v_th * through_spike
        }
    }

    /// dH[t] / dX[t].
    #[inline(always)]
    fn input_slope(&self) -> f32 {
        if self.decay_input {
            1.0 / self.tau
        } else {
            1.0
        }
    }
}

/// A raw output pointer shared by work items that write disjoint index sets.
#[derive(Clone, Copy)]
struct DisjointOut(*mut f32);
// SAFETY: every work item writes only the neurons of its own chunk, so no two threads touch the
// same element, and the buffer outlives the parallel loop that uses the pointer.
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

impl DisjointOut {
    /// # Safety
    /// `i` is in bounds and no other thread writes index `i` concurrently.
    #[inline(always)]
    unsafe fn write(self, i: usize, v: f32) {
        *self.0.add(i) = v;
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

/// Splits `[T, ...]` into (T, neurons).
fn steps_and_neurons(shape: &Shape) -> (usize, usize) {
    let t = shape.dims()[0];
    (t, shape.elem_count() / t)
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
        let (steps, n) = steps_and_neurons(layout.shape());
        let dyn_ = Dynamics::new(&self.cfg);
        let mut out = vec![0f32; x.len()];
        let ptr = DisjointOut(out.as_mut_ptr());
        let per_step = (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                let mut v = [dyn_.v_reset; CHUNK];
                // Spikes per step: a few adds per chunk, cheap enough to count unconditionally.
                let mut spikes = vec![0u64; steps];
                for (t, fired_at_t) in spikes.iter_mut().enumerate() {
                    let base = t * n;
                    let mut fired = 0u64;
                    for (i, v) in (lo..hi).zip(v.iter_mut()) {
                        let h = dyn_.charge(*v, x[base + i]);
                        let s = h >= dyn_.v_th;
                        *v = dyn_.reset(h, s);
                        fired += s as u64;
                        // SAFETY: index `base + i` belongs to this chunk alone and is < T * n.
                        unsafe { ptr.write(base + i, if s { 1.0 } else { 0.0 }) };
                    }
                    *fired_at_t = fired;
                }
                spikes
            })
            .reduce(
                || vec![0u64; steps],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        if let Some(m) = &self.monitor {
            m.record(&per_step, n as u64);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        let x = arg.contiguous()?;
        let backward = LifBackward { cfg: self.cfg };
        Ok(Some(x.apply_op2_no_bwd(&grad, &backward)?))
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
        let x = f32_slice(xs, xl)?;
        let g = f32_slice(gs, gl)?;
        if xl.shape() != gl.shape() {
            candle_core::bail!(
                "LIF backward: shape mismatch {:?} vs {:?}",
                xl.shape(),
                gl.shape()
            )
        }
        let (steps, n) = steps_and_neurons(xl.shape());
        let dyn_ = Dynamics::new(&self.cfg);
        let input_slope = dyn_.input_slope();
        let mut gx = vec![0f32; x.len()];
        let ptr = DisjointOut(gx.as_mut_ptr());
        (0..n.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let width = hi - lo;
            // Membrane trajectory H[t] of this chunk, recomputed rather than stored by forward.
            let mut h = vec![0f32; steps * width];
            let mut v = [dyn_.v_reset; CHUNK];
            for t in 0..steps {
                let xs = &x[t * n + lo..t * n + hi];
                for ((h, v), &xi) in h[t * width..(t + 1) * width].iter_mut().zip(&mut v).zip(xs) {
                    *h = dyn_.charge(*v, xi);
                    *v = dyn_.reset(*h, *h >= dyn_.v_th);
                }
            }
            // Backprop through time: gv carries dL/dV[t] back to step t - 1.
            let mut gv = [0f32; CHUNK];
            for t in (0..steps).rev() {
                let gs = &g[t * n + lo..t * n + hi];
                let hs = &h[t * width..(t + 1) * width];
                for (j, ((&hj, &gsj), gv)) in hs.iter().zip(gs).zip(&mut gv).enumerate() {
                    let spike = hj >= dyn_.v_th;
                    let sg = dyn_.surrogate.grad(hj - dyn_.v_th);
                    let gh = gsj * sg + *gv * dyn_.reset_slope(hj, spike, sg);
                    // SAFETY: index `t * n + lo + j` belongs to this chunk alone and is < T * n.
                    unsafe { ptr.write(t * n + lo + j, gh * input_slope) };
                    *gv = gh * dyn_.keep;
                }
            }
        });
        Ok((CpuStorage::F32(gx), xl.shape().clone()))
    }
}
