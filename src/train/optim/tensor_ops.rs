//! Adam's update from candle's tensor ops, for parameters off the CPU (a GPU's storage cannot
//! be updated in place from the host). The arithmetic is the in-place loop's, op for op: each
//! term formed in f64 in the same order, the moments and the parameter rounded to f32 where the
//! loop stores them, so both paths agree to rounding (checked on the CPU in the tests below).

use candle_core::{DType, Result, Tensor, Var};

use super::Update;
use crate::train::grads::Grad;

/// A parameter's moments as tensors on its device, f32 like the host's.
#[derive(Debug, Clone)]
pub(super) struct DeviceMoments {
    pub step: u64,
    pub m: Tensor,
    pub v: Tensor,
    pub vmax: Option<Tensor>,
}

impl DeviceMoments {
    pub fn zeros(var: &Var, amsgrad: bool) -> Result<Self> {
        let zeros = || var.zeros_like()?.to_dtype(DType::F32);
        Ok(Self {
            step: 0,
            m: zeros()?,
            v: zeros()?,
            vmax: if amsgrad { Some(zeros()?) } else { None },
        })
    }
}

impl Update<'_> {
    /// Updates `var` and its moments `st` from its gradient with tensor ops on `var`'s device.
    pub(super) fn tensors(
        &self,
        name: &str,
        (var, st): (&Var, &mut DeviceMoments),
        grad: Grad,
    ) -> Result<()> {
        let c = self.cfg;
        let f64 = |t: &Tensor| t.to_dtype(DType::F64);
        let g = match grad {
            Grad::Tensor(g) => f64(g)?,
            Grad::Values(g) => {
                Tensor::from_slice(g, var.shape(), var.device())?.to_dtype(DType::F64)?
            }
            Grad::Rows(_) | Grad::Product(_) => candle_core::bail!(
                "Adam: {name}'s gradient came from a fused CPU op, but the parameter lives on \
                 a device the fused ops do not run on"
            ),
        };
        if g.dims() != var.dims() {
            candle_core::bail!(
                "Adam: {name} has shape {:?}, its gradient {:?}",
                var.dims(),
                g.dims()
            )
        }
        let p = f64(var.as_tensor())?;
        let gi = if c.weight_decay != 0.0 {
            (g + (&p * c.weight_decay)?)?
        } else {
            g
        };
        st.m = ((f64(&st.m)? * c.beta1)? + (&gi * (1.0 - c.beta1))?)?.to_dtype(DType::F32)?;
        st.v =
            ((f64(&st.v)? * c.beta2)? + ((&gi * (1.0 - c.beta2))? * &gi)?)?.to_dtype(DType::F32)?;
        let second = match &mut st.vmax {
            Some(vmax) => {
                *vmax = vmax.maximum(&st.v)?;
                vmax.clone()
            }
            None => st.v.clone(),
        };
        let denom = ((f64(&second)?.sqrt()? / self.bias2_sqrt)? + c.eps)?;
        let p = (p - ((f64(&st.m)? * self.step_size)? / denom)?)?;
        var.set(&p.to_dtype(var.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, Tensor, Var};

    use super::super::{Adam, AdamConfig};
    use crate::train::grads::Gradients;

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(candle_core::DType::F32).unwrap()
            - b.to_dtype(candle_core::DType::F32).unwrap())
        .unwrap();
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// On PyTorch's Adam run (scripts/optim_fixtures.py), the tensor-op update forced on CPU
    /// parameters gives, after every step, the in-place loop's parameters and moments within
    /// 1e-6 and PyTorch's parameters within the in-place loop's own tolerance, with and
    /// without AMSGrad.
    #[test]
    fn tensor_ops_update_as_the_in_place_loop_and_torch_do() {
        let t = candle_core::safetensors::load(fixture("optim_torch.safetensors"), &Device::Cpu)
            .unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("cosine_torch.json")).unwrap())
                .unwrap();
        let a = &json["adam"];
        let f = |k: &str| a[k].as_f64().unwrap();
        let names = ["a", "b"];
        let params = || -> Vec<(String, Var)> {
            names
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        Var::from_tensor(&t[&format!("init.{n}")]).unwrap(),
                    )
                })
                .collect()
        };
        let grads = |ps: &[(String, Var)], step: usize| {
            let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
            for (name, var) in ps {
                let g = &t[&format!("grad.{step}.{name}")];
                loss = (loss + (var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
            }
            Gradients::backward(&loss, &[]).unwrap()
        };
        for amsgrad in [false, true] {
            let cfg = AdamConfig {
                lr: f("lr"),
                beta1: f("beta1"),
                beta2: f("beta2"),
                eps: f("eps"),
                weight_decay: f("weight_decay"),
                amsgrad,
            };
            let (host_ps, device_ps) = (params(), params());
            let mut in_place = Adam::new(host_ps.clone(), cfg.clone());
            let mut tensor_ops = Adam::with_placement(device_ps.clone(), cfg, |_| false);
            for step in 0..a["steps"].as_u64().unwrap() as usize {
                in_place.step(&grads(&host_ps, step)).unwrap();
                tensor_ops.step(&grads(&device_ps, step)).unwrap();
                let (sa, sb): (HashMap<_, _>, HashMap<_, _>) = (
                    in_place.state_tensors().unwrap(),
                    tensor_ops.state_tensors().unwrap(),
                );
                assert_eq!(sa.len(), names.len() * if amsgrad { 4 } else { 3 });
                for (key, want) in &sa {
                    let d = max_abs_diff(&sb[key], want);
                    assert!(d <= 1e-6, "amsgrad={amsgrad} step {step} {key}: {d}");
                }
                for ((name, host), (_, device)) in host_ps.iter().zip(&device_ps) {
                    let d = max_abs_diff(device.as_tensor(), host.as_tensor());
                    assert!(d <= 1e-6, "amsgrad={amsgrad} step {step} {name}: {d}");
                    let torch = &t[&format!("amsgrad{}.{step}.{name}", amsgrad as u8)];
                    let d = max_abs_diff(device.as_tensor(), torch);
                    assert!(
                        d < 2e-6,
                        "amsgrad={amsgrad} step {step} {name} vs torch: {d}"
                    );
                }
            }
        }
    }
}
