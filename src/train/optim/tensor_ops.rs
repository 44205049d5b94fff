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
    use candle_core::Device;

    use super::super::{Adam, AdamConfig};
    use crate::train::grads::Gradients;

    /// Three steps of the tensor-op update, forced on CPU parameters, equal the fused in-place
    /// update's parameters and moments within 1e-6, with and without AMSGrad and weight decay.
    #[test]
    fn tensor_ops_update_as_the_in_place_loop_does() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (amsgrad, weight_decay) in [(false, 0.0), (true, 0.01)] {
            let cfg = AdamConfig {
                lr: 0.01,
                amsgrad,
                weight_decay,
                ..AdamConfig::default()
            };
            let start = candle_core::Tensor::randn(0f32, 1.0, (37, 29), &dev)?;
            let (a, b) = (
                candle_core::Var::from_tensor(&start.copy()?)?,
                candle_core::Var::from_tensor(&start.copy()?)?,
            );
            let mut in_place = Adam::new(vec![("p".into(), a.clone())], cfg.clone());
            let mut tensor_ops =
                Adam::with_placement(vec![("p".into(), b.clone())], cfg, |_| false);
            for _ in 0..3 {
                let g = candle_core::Tensor::randn(0f32, 1.0, (37, 29), &dev)?;
                for (adam, var) in [(&mut in_place, &a), (&mut tensor_ops, &b)] {
                    let loss = (var.as_tensor() * &g)?.sum_all()?;
                    adam.step(&Gradients::backward(&loss, &[])?)?;
                }
                let (sa, sb) = (in_place.state_tensors()?, tensor_ops.state_tensors()?);
                let mut keys: Vec<_> = sa.keys().collect();
                keys.sort();
                assert_eq!(keys.len(), if amsgrad { 4 } else { 3 });
                for key in keys {
                    let diff = (sa[key].to_dtype(candle_core::DType::F64)?
                        - sb[key].to_dtype(candle_core::DType::F64)?)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f64>()?;
                    assert!(diff <= 1e-6, "{key}: {diff}");
                }
                let diff = (a.as_tensor() - b.as_tensor())?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(diff <= 1e-6, "parameter: {diff}");
            }
            assert_ne!(b.as_tensor().to_vec2::<f32>()?, start.to_vec2::<f32>()?);
        }
        Ok(())
    }
}
