//! Adam with PyTorch's semantics (L2 weight decay folded into the gradient, optional AMSGrad),
//! written here because candle-nn's AdamW has neither AMSGrad nor an exportable state, and a
//! bit-identical `--resume` needs the moments saved by parameter name.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use super::checkpoint::write_atomic_with;

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
}

impl Update<'_> {
    /// Updates `p` and its moments in place from the gradient `g`. The AMSGrad branch is
    /// taken once per chunk, not per element, so the loop stays branch-free.
    fn run(
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
    moments: Vec<Moments>,
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamConfig) -> Self {
        let moments = params
            .iter()
            .map(|(_, var)| {
                let zeros = vec![0f32; var.elem_count()];
                Moments {
                    step: 0,
                    m: zeros.clone(),
                    v: zeros.clone(),
                    vmax: cfg.amsgrad.then_some(zeros),
                }
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

    /// One update; parameters without a gradient are left untouched, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let c = &self.cfg;
        for ((_, var), st) in self.params.iter().zip(self.moments.iter_mut()) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let mut p = host_values(var.as_tensor())?;
            let g = host_values(grad)?;
            st.step += 1;
            let update = Update {
                cfg: c,
                step_size: c.lr / (1.0 - c.beta1.powi(st.step as i32)),
                bias2_sqrt: (1.0 - c.beta2.powi(st.step as i32)).sqrt(),
            };
            // Elements are independent: chunks run in parallel, each element computed as before.
            let chunks = p
                .par_chunks_mut(UPDATE_CHUNK)
                .zip(g.par_chunks(UPDATE_CHUNK))
                .zip(st.m.par_chunks_mut(UPDATE_CHUNK))
                .zip(st.v.par_chunks_mut(UPDATE_CHUNK));
            match &mut st.vmax {
                None => chunks.for_each(|(((p, g), m), v)| update.run(p, g, (m, v), None)),
                Some(vmax) => chunks
                    .zip(vmax.par_chunks_mut(UPDATE_CHUNK))
                    .for_each(|((((p, g), m), v), vmax)| update.run(p, g, (m, v), Some(vmax))),
            }
            let updated = Tensor::from_vec(p, var.shape(), var.device())?;
            var.set(&updated.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The state as named tensors: `NAME.m`, `NAME.v`, `NAME.vmax` (AMSGrad) and `NAME.step`.
    pub fn state_tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((name, var), st) in self.params.iter().zip(&self.moments) {
            let tensor =
                |values: &Vec<f32>| Tensor::from_vec(values.clone(), var.shape(), &Device::Cpu);
            out.insert(format!("{name}.m"), tensor(&st.m)?);
            out.insert(format!("{name}.v"), tensor(&st.v)?);
            if let Some(vmax) = &st.vmax {
                out.insert(format!("{name}.vmax"), tensor(vmax)?);
            }
            let step = Tensor::new(&[st.step as i64], &Device::Cpu)?;
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
            loaded.push(Moments {
                step: u64::try_from(step)
                    .with_context(|| format!("optimiser state {source}: negative step"))?,
                m: moment("m")?,
                v: moment("v")?,
                vmax: match self.cfg.amsgrad {
                    true => Some(moment("vmax")?),
                    false => None,
                },
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
