//! Adam with PyTorch's semantics (L2 weight decay folded into the gradient, optional AMSGrad),
//! written here because candle-nn's AdamW has neither AMSGrad nor an exportable state, and a
//! bit-identical `--resume` needs the moments saved by parameter name.

mod tensor_ops;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;

use super::checkpoint::write_atomic_with;
use super::grads::{Grad, Gradients};
use crate::kernels::grad_slot::{OuterGrad, RowGrad};
use crate::kernels::simd::{self, Level};
use crate::kernels::{with_f32, with_f32_mut};
use tensor_ops::DeviceMoments;

/// Hyper-parameters as in `torch.optim.Adam`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient (PyTorch's `Adam`, not the decoupled `AdamW`).
    pub weight_decay: f64,
    pub amsgrad: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        }
    }
}

/// Per-parameter moments; `step` is per parameter as in PyTorch, so a parameter that missed a
/// gradient is not bias-corrected as if it had been updated.
/// Kept on the host as flat `f32`: the update is one fused loop per parameter instead of a
/// dozen whole-tensor ops, each allocating (measured: `spikeclip bench --case adam_step`).
#[derive(Debug, Clone)]
struct Moments {
    step: u64,
    m: Vec<f32>,
    v: Vec<f32>,
    vmax: Option<Vec<f32>>,
}

/// Where a parameter's moments live, which decides how it is updated: on the host, updated in
/// place with the parameter by the fused loop (a CPU parameter), or as tensors on the
/// parameter's device, updated by tensor ops ([`tensor_ops`]); those are made at the first
/// update or load, so that building an optimiser cannot fail.
#[derive(Debug, Clone)]
enum State {
    Host(Moments),
    Device(Option<DeviceMoments>),
}

impl State {
    fn step(&self) -> u64 {
        match self {
            State::Host(st) => st.step,
            State::Device(st) => st.as_ref().map_or(0, |st| st.step),
        }
    }

    /// The moments `m`, `v` and (AMSGrad) `vmax` as host tensors shaped as `var`.
    fn host_tensors(&self, var: &Var, amsgrad: bool) -> Result<[Option<Tensor>; 3]> {
        let host = |values: &Vec<f32>| Tensor::from_vec(values.clone(), var.shape(), &Device::Cpu);
        Ok(match self {
            State::Host(st) => [
                Some(host(&st.m)?),
                Some(host(&st.v)?),
                st.vmax.as_ref().map(host).transpose()?,
            ],
            State::Device(Some(st)) => [
                Some(st.m.to_device(&Device::Cpu)?),
                Some(st.v.to_device(&Device::Cpu)?),
                st.vmax
                    .as_ref()
                    .map(|t| t.to_device(&Device::Cpu))
                    .transpose()?,
            ],
            State::Device(None) => {
                let zeros = || Tensor::zeros(var.shape(), DType::F32, &Device::Cpu);
                [
                    Some(zeros()?),
                    Some(zeros()?),
                    amsgrad.then(zeros).transpose()?,
                ]
            }
        })
    }
}

fn host_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
}

/// Elements per parallel task of an update.
const UPDATE_CHUNK: usize = 1 << 15;

/// One step's update of a parameter's elements, each computed in f64.
struct Update<'a> {
    cfg: &'a AdamConfig,
    step_size: f64,
    bias2_sqrt: f64,
    /// The instruction set of the element loop.
    level: Level,
}

impl<'a> Update<'a> {
    /// The update of a parameter's `step`-th step.
    fn new(cfg: &'a AdamConfig, step: u64) -> Self {
        Self {
            cfg,
            step_size: cfg.lr / (1.0 - cfg.beta1.powi(step as i32)),
            bias2_sqrt: (1.0 - cfg.beta2.powi(step as i32)).sqrt(),
            level: simd::ADAM.level(),
        }
    }

    /// Updates the parameter `name`'s values `p` and its moments `st` from its gradient, in
    /// whichever form that came. A row gradient updates every row as the dense gradient would,
    /// its missing rows as zeros: their moments decay and they keep moving with their momentum.
    fn apply(&self, name: &str, (p, st): (&mut [f32], &mut Moments), grad: Grad) -> Result<()> {
        match grad {
            Grad::Tensor(g) => with_f32(g, "Adam", |g| self.dense(name, (p, st), g)),
            Grad::Values(g) => self.dense(name, (p, st), g),
            Grad::Rows(rows) => self.rows(name, (p, st), rows),
            Grad::Product(product) => self.product(name, (p, st), product),
        }
    }

    fn dense(&self, name: &str, (p, st): (&mut [f32], &mut Moments), g: &[f32]) -> Result<()> {
        if g.len() != p.len() {
            candle_core::bail!(
                "Adam: {name} has {} values, its gradient {}",
                p.len(),
                g.len()
            )
        }
        self.chunks(p, st, UPDATE_CHUNK, |lo, hi, f| f(0..hi - lo, &g[lo..hi]));
        Ok(())
    }

    fn rows(&self, name: &str, (p, st): (&mut [f32], &mut Moments), rows: &RowGrad) -> Result<()> {
        let width = rows.width().max(1);
        let beyond = |&r: &u32| (r as usize + 1) * width > p.len();
        if p.len() % width != 0 || rows.rows().iter().any(beyond) {
            candle_core::bail!(
                "Adam: {name} has {} values, not the rows of its gradient",
                p.len()
            )
        }
        let zeros = vec![0f32; width];
        let chunk = UPDATE_CHUNK.div_ceil(width) * width;
        self.chunks(p, st, chunk, |lo, hi, f| {
            for (i, row) in (lo / width..hi / width).enumerate() {
                f(i * width..(i + 1) * width, rows.row(row).unwrap_or(&zeros));
            }
        });
        Ok(())
    }

    /// A block of the product's columns at a time: each row's run of them, a row per task.
    fn product(
        &self,
        name: &str,
        (p, st): (&mut [f32], &mut Moments),
        product: &OuterGrad,
    ) -> Result<()> {
        let (rows, cols) = product.dims();
        if rows * cols != p.len() {
            candle_core::bail!(
                "Adam: {name} has {} values, its gradient {rows} x {cols}",
                p.len()
            )
        }
        product.for_each_block(|block, g| {
            let n = block.len();
            self.chunks(p, st, cols, |lo, _, f| {
                f(block.clone(), &g[lo / cols * n..(lo / cols + 1) * n])
            });
            Ok(())
        })
    }

    /// Updates all of `p` and the moments `st` in parallel chunks of `chunk` elements.
    /// `segments(lo, hi, f)` calls `f(range, g)` for consecutive runs of the chunk `lo..hi`
    /// (`range` relative to the chunk) with their gradient `g`. Elements are independent, so
    /// the chunking changes nothing but speed.
    fn chunks(
        &self,
        p: &mut [f32],
        st: &mut Moments,
        chunk: usize,
        segments: impl Fn(usize, usize, &mut dyn FnMut(Range<usize>, &[f32])) + Sync,
    ) {
        let vmax: Vec<Option<&mut [f32]>> = match &mut st.vmax {
            Some(vmax) => vmax.chunks_mut(chunk).map(Some).collect(),
            None => p.chunks(chunk).map(|_| None).collect(),
        };
        p.par_chunks_mut(chunk)
            .zip(st.m.par_chunks_mut(chunk))
            .zip(st.v.par_chunks_mut(chunk))
            .zip(vmax)
            .enumerate()
            .for_each(|(i, (((p, m), v), mut vmax))| {
                let lo = i * chunk;
                segments(lo, lo + p.len(), &mut |r, g| {
                    let vmax = vmax.as_deref_mut().map(|vmax| &mut vmax[r.clone()]);
                    self.run(&mut p[r.clone()], g, (&mut m[r.clone()], &mut v[r]), vmax)
                });
            });
    }

    /// Updates `p` and its moments in place from the gradient `g`, on the update's instruction
    /// set.
    fn run(
        &self,
        p: &mut [f32],
        g: &[f32],
        (m, v): (&mut [f32], &mut [f32]),
        vmax: Option<&mut [f32]>,
    ) {
        simd::on_level!(self.level, self.run_elements(p, g, (m, v), vmax))
    }

    /// [`Self::run`]'s loop. The AMSGrad branch is taken once per run of elements, not per
    /// element, so the loop stays branch-free.
    #[inline(always)]
    fn run_elements(
        &self,
        p: &mut [f32],
        g: &[f32],
        (m, v): (&mut [f32], &mut [f32]),
        vmax: Option<&mut [f32]>,
    ) {
        let c = self.cfg;
        let mut moments = |i: usize, p: f32| {
            let gi = g[i] as f64 + c.weight_decay * p as f64;
            m[i] = (c.beta1 * m[i] as f64 + (1.0 - c.beta1) * gi) as f32;
            v[i] = (c.beta2 * v[i] as f64 + (1.0 - c.beta2) * gi * gi) as f32;
            (m[i], v[i])
        };
        let step = |p: f32, m: f32, second: f32| {
            let denom = (second as f64).sqrt() / self.bias2_sqrt + c.eps;
            (p as f64 - self.step_size * m as f64 / denom) as f32
        };
        match vmax {
            None => {
                for (i, p) in p.iter_mut().enumerate() {
                    let (m, v) = moments(i, *p);
                    *p = step(*p, m, v);
                }
            }
            Some(vmax) => {
                for ((i, p), vmax) in p.iter_mut().enumerate().zip(vmax) {
                    let (m, v) = moments(i, *p);
                    *vmax = vmax.max(v);
                    *p = step(*p, m, *vmax);
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    params: Vec<(String, Var)>,
    moments: Vec<State>,
}

impl Adam {
    /// CPU parameters are updated in place by the fused loop, the others by tensor ops.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamConfig) -> Self {
        Self::with_placement(params, cfg, |var| var.device().is_cpu())
    }

    /// [`Self::new`] with the moments of the parameters for which `on_host` holds kept on the
    /// host (those must be CPU parameters); the tests force the tensor-op path with it.
    fn with_placement(
        params: Vec<(String, Var)>,
        cfg: AdamConfig,
        on_host: impl Fn(&Var) -> bool,
    ) -> Self {
        let moments = params
            .iter()
            .map(|(_, var)| {
                if !on_host(var) {
                    return State::Device(None);
                }
                // Each moment zeroed on its own: fresh zeroed memory is not touched until the
                // first update writes it, where copies of one zero buffer would be at once.
                let zeros = || vec![0f32; var.elem_count()];
                State::Host(Moments {
                    step: 0,
                    m: zeros(),
                    v: zeros(),
                    vmax: cfg.amsgrad.then(zeros),
                })
            })
            .collect();
        Self {
            cfg,
            params,
            moments,
        }
    }

    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Set by the schedule before each epoch.
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update; parameters without a gradient are left untouched, as PyTorch does. Each
    /// parameter is updated in its own storage, the gradient read where it lies: no copies of
    /// either, which for the text encoder's token table would be hundreds of megabytes. A row
    /// gradient updates every row as the dense gradient would, its missing rows as zeros: their
    /// moments decay and they keep moving with their momentum.
    pub fn step(&mut self, grads: &Gradients) -> Result<()> {
        for ((name, var), st) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let step = st.step() + 1;
            let update = Update::new(&self.cfg, step);
            match st {
                State::Host(st) => {
                    with_f32_mut(var.as_tensor(), "Adam", |p| {
                        update.apply(name, (p, st), grad)
                    })?;
                    st.step = step;
                }
                State::Device(st) => {
                    let st = match st {
                        Some(st) => st,
                        None => st.insert(DeviceMoments::zeros(var, self.cfg.amsgrad)?),
                    };
                    update.tensors(name, (var, st), grad)?;
                    st.step = step;
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors: `NAME.m`, `NAME.v`, `NAME.vmax` (AMSGrad) and `NAME.step`.
    pub fn state_tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((name, var), st) in self.params.iter().zip(&self.moments) {
            let [m, v, vmax] = st.host_tensors(var, self.cfg.amsgrad)?;
            for (suffix, t) in [("m", m), ("v", v), ("vmax", vmax)] {
                if let Some(t) = t {
                    out.insert(format!("{name}.{suffix}"), t);
                }
            }
            let step = Tensor::new(&[st.step() as i64], &Device::Cpu)?;
            out.insert(format!("{name}.step"), step);
        }
        Ok(out)
    }

    /// Restores [`Self::state_tensors`]; `source` names the file in errors. Every parameter
    /// must be present with its shape and nothing else may be, so a checkpoint of another
    /// model or optimiser setting is refused rather than half-loaded.
    pub fn load_state_tensors(
        &mut self,
        mut state: HashMap<String, Tensor>,
        source: &str,
    ) -> anyhow::Result<()> {
        let mut loaded = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let mut take = |suffix: &str| -> anyhow::Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = state.remove(&key).with_context(|| {
                    format!("optimiser state {source}: no entry `{key}` (saved for another model or without AMSGrad?)")
                })?;
                if suffix != "step" && t.dims() != var.dims() {
                    bail!(
                        "optimiser state {source}: `{key}` has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                Ok(t)
            };
            let step_t = take("step")?;
            let step = step_t
                .to_dtype(DType::I64)
                .and_then(|t| t.flatten_all()?.to_vec1::<i64>())
                .with_context(|| format!("optimiser state {source}: `{name}.step` unreadable"))?;
            let [step] = step[..] else {
                bail!("optimiser state {source}: `{name}.step` must hold one value");
            };
            let mut moment =
                |suffix: &str| -> anyhow::Result<Vec<f32>> { Ok(host_values(&take(suffix)?)?) };
            let host = Moments {
                step: u64::try_from(step)
                    .with_context(|| format!("optimiser state {source}: negative step"))?,
                m: moment("m")?,
                v: moment("v")?,
                vmax: match self.cfg.amsgrad {
                    true => Some(moment("vmax")?),
                    false => None,
                },
            };
            loaded.push(match &self.moments[loaded.len()] {
                State::Host(_) => State::Host(host),
                State::Device(_) => {
                    let on_device = |values: Vec<f32>| {
                        Tensor::from_vec(values, var.shape(), &Device::Cpu)?.to_device(var.device())
                    };
                    State::Device(Some(DeviceMoments {
                        step: host.step,
                        m: on_device(host.m)?,
                        v: on_device(host.v)?,
                        vmax: host.vmax.map(on_device).transpose()?,
                    }))
                }
            });
        }
        if let Some(extra) = state.keys().min() {
            bail!("optimiser state {source}: unexpected entry `{extra}` (saved for another model or with AMSGrad?)");
        }
        self.moments = loaded;
        Ok(())
    }

    /// Writes the state atomically to a safetensors file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let state = self.state_tensors()?;
        write_atomic_with(path, |tmp| Ok(candle_core::safetensors::save(&state, tmp)?))
    }

    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let state = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading optimiser state {}", path.display()))?;
        self.load_state_tensors(state, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's Adam for one element, as the update computes it: in f64, stored as f32.
    struct Reference {
        p: f32,
        m: f32,
        v: f32,
        vmax: f32,
    }

    impl Reference {
        fn step(&mut self, c: &AdamConfig, step: i32, g: f32) {
            let gi = g as f64 + c.weight_decay * self.p as f64;
            self.m = (c.beta1 * self.m as f64 + (1.0 - c.beta1) * gi) as f32;
            self.v = (c.beta2 * self.v as f64 + (1.0 - c.beta2) * gi * gi) as f32;
            self.vmax = self.vmax.max(self.v);
            let second = if c.amsgrad { self.vmax } else { self.v };
            let denom = (second as f64).sqrt() / (1.0 - c.beta2.powi(step)).sqrt() + c.eps;
            let step_size = c.lr / (1.0 - c.beta1.powi(step));
            self.p = (self.p as f64 - step_size * self.m as f64 / denom) as f32;
        }
    }

    /// The in-place update gives every element, over chunks and steps, exactly the values of
    /// the element-wise reference, with and without AMSGrad and weight decay.
    #[test]
    fn updates_in_place_as_the_reference_does() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let n = UPDATE_CHUNK + 300;
        for (amsgrad, weight_decay) in [(false, 0.0), (true, 0.01)] {
            let cfg = AdamConfig {
                lr: 0.01,
                amsgrad,
                weight_decay,
                ..AdamConfig::default()
            };
            let p = Var::randn(0f32, 1.0, n, &dev)?;
            let mut reference: Vec<Reference> = p
                .as_tensor()
                .to_vec1::<f32>()?
                .into_iter()
                .map(|p| Reference {
                    p,
                    m: 0.0,
                    v: 0.0,
                    vmax: 0.0,
                })
                .collect();
            let mut adam = Adam::new(vec![("p".into(), p.clone())], cfg.clone());
            for step in 1..=3 {
                let g = Tensor::randn(0f32, 1.0, n, &dev)?;
                let loss = (p.as_tensor() * &g)?.sum_all()?;
                adam.step(&Gradients::backward(&loss, &[])?)?;
                for (r, g) in reference.iter_mut().zip(g.to_vec1::<f32>()?) {
                    r.step(&cfg, step, g);
                }
                let field = |f: fn(&Reference) -> f32| reference.iter().map(f).collect::<Vec<_>>();
                let state = adam.state_tensors()?;
                assert_eq!(p.as_tensor().to_vec1::<f32>()?, field(|r| r.p));
                assert_eq!(state["p.m"].to_vec1::<f32>()?, field(|r| r.m));
                assert_eq!(state["p.v"].to_vec1::<f32>()?, field(|r| r.v));
                if amsgrad {
                    assert_eq!(state["p.vmax"].to_vec1::<f32>()?, field(|r| r.vmax));
                }
            }
        }
        Ok(())
    }

    /// The element loop gives bit-identical parameters and moments on every instruction set
    /// this CPU has (the AVX-512 path is skipped, with a note, where it lacks it).
    #[test]
    fn every_simd_level_updates_alike() {
        if !Level::Avx512.supported() {
            println!("skipped the avx512 path: this CPU lacks AVX-512");
        }
        let values =
            |k: f32| -> Vec<f32> { (0..1031).map(|i| (i as f32 * k).fract() - 0.45).collect() };
        let (p0, g, m0) = (values(0.618), values(0.377), values(0.21));
        let v0: Vec<f32> = values(0.73).iter().map(|v| v * v).collect();
        for amsgrad in [false, true] {
            let cfg = AdamConfig {
                lr: 0.01,
                amsgrad,
                weight_decay: 0.01,
                ..AdamConfig::default()
            };
            let run = |level| {
                let update = Update {
                    level,
                    ..Update::new(&cfg, 3)
                };
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                let mut vmax = amsgrad.then(|| v0.iter().map(|v| v * 1.5).collect::<Vec<_>>());
                update.run(&mut p, &g, (&mut m, &mut v), vmax.as_deref_mut());
                (p, m, v, vmax)
            };
            let portable = run(Level::Portable);
            assert_ne!(portable.0, p0);
            for level in Level::supported_levels() {
                assert_eq!(run(level), portable, "{level}, amsgrad {amsgrad}");
            }
        }
    }
}
