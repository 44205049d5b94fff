//! The fused LIF op against a straightforward composition of tensor ops (the straight-through
//! trick), which autograd differentiates step by step: same spikes, same gradients.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, Var};
use spikeclip::neuron::{LifConfig, MultiStepLif, Surrogate};

/// Heaviside forward, surrogate derivative backward, differentiated by tensor ops.
struct Fire(Surrogate);

impl CustomOp1 for Fire {
    fn name(&self) -> &'static str {
        "fire"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(d) = s else {
            unreachable!()
        };
        let (a, b) = l.contiguous_offsets().unwrap();
        let out = d[a..b]
            .iter()
            .map(|&x| if x >= 0.0 { 1.0 } else { 0.0 })
            .collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let slope = match self.0 {
            Surrogate::Sigmoid { alpha } => {
                let sg = candle_nn::ops::sigmoid(&(x * alpha as f64)?)?;
                ((sg.clone() * (1.0 - sg)?)? * alpha as f64)?
            }
            Surrogate::ATan { alpha } => {
                let z = (x * (std::f64::consts::FRAC_PI_2 * alpha as f64))?;
                ((z.sqr()? + 1.0)?.recip()? * (alpha as f64 / 2.0))?
            }
        };
        Ok(Some((g * slope)?))
    }
}

fn composed_lif(x: &Tensor, c: &LifConfig) -> Result<Tensor> {
    let vr = c.v_reset.unwrap_or(0.0) as f64;
    let tau = c.tau as f64;
    let mut v = (x.get(0)?.zeros_like()? + vr)?;
    let mut out = Vec::new();
    for t in 0..x.dim(0)? {
        let xt = x.get(t)?;
        let h = if c.decay_input {
            (&v + ((xt - (&v - vr)?)? / tau)?)?
        } else {
            ((&v - ((&v - vr)? / tau)?)? + xt)?
        };
        let s = (&h - c.v_threshold as f64)?
            .contiguous()?
            .apply_op1(Fire(c.surrogate))?;
        let sr = if c.detach_reset {
            s.detach()
        } else {
            s.clone()
        };
        v = if c.v_reset.is_some() {
            ((&h * (1.0 - &sr)?)? + (&sr * vr)?)?
        } else {
            (&h - (&sr * c.v_threshold as f64)?)?
        };
        out.push(s);
    }
    Tensor::stack(&out, 0)
}

fn configs() -> Vec<LifConfig> {
    let mut all = Vec::new();
    for tau in [2.0, 1.5] {
        for v_reset in [Some(0.0), None, Some(-0.3)] {
            for detach_reset in [true, false] {
                for decay_input in [true, false] {
                    for surrogate in [Surrogate::sigmoid(), Surrogate::atan()] {
                        all.push(LifConfig {
                            tau,
                            v_threshold: 0.7,
                            v_reset,
                            detach_reset,
                            decay_input,
                            surrogate,
                        });
                    }
                }
            }
        }
    }
    all
}

#[test]
fn fused_matches_composed_spikes_and_gradients() -> Result<()> {
    let dev = Device::Cpu;
    // Three chunks' worth of neurons, the last one partial.
    let x0 = ((Tensor::randn(0f32, 1.0, (6, 3, 1100), &dev)? * 0.9)? + 0.6)?;
    let g = Tensor::randn(0f32, 1.0, (6, 3, 1100), &dev)?;
    for cfg in configs() {
        let x = Var::from_tensor(&x0)?;
        let fused = MultiStepLif::new(cfg).forward(x.as_tensor())?;
        let gf = (&fused * &g)?.sum_all()?.backward()?;
        let gx_fused = gf.get(x.as_tensor()).expect("fused grad");

        let y = Var::from_tensor(&x0)?;
        let reference = composed_lif(y.as_tensor(), &cfg)?;
        let gr = (&reference * &g)?.sum_all()?.backward()?;
        let gx_ref = gr.get(y.as_tensor()).expect("reference grad");

        let mismatched = (&fused - &reference)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert_eq!(mismatched, 0.0, "spikes differ for {cfg:?}");
        let rate = fused.mean_all()?.to_scalar::<f32>()?;
        assert!(
            rate > 0.05 && rate < 0.95,
            "degenerate rate {rate} for {cfg:?}"
        );
        let err = (gx_fused - gx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "gradient error {err} for {cfg:?}");
    }
    Ok(())
}

#[test]
fn hand_computed_trajectory() -> Result<()> {
    // tau 2, V_th 1, hard reset to 0: H = V + (X - V) / 2.
    // X = 1.5 each step: H = 0.75 (no spike), 1.125 (spike, V = 0), 0.75, 1.125.
    let x = Tensor::new(&[[1.5f32], [1.5], [1.5], [1.5]], &Device::Cpu)?;
    let s = MultiStepLif::new(LifConfig::default()).forward(&x)?;
    assert_eq!(s.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 1.0, 0.0, 1.0]);
    // Soft reset keeps the excess: 0.75, 1.125 -> 0.125, 0.8125, 1.15625 -> 0.15625.
    let soft = LifConfig {
        v_reset: None,
        ..LifConfig::default()
    };
    let s = MultiStepLif::new(soft).forward(&x)?;
    assert_eq!(s.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 1.0, 0.0, 1.0]);
    Ok(())
}

#[test]
fn non_contiguous_input_is_handled() -> Result<()> {
    let dev = Device::Cpu;
    let x = (Tensor::randn(0f32, 1.0, (5, 4, 6), &dev)? + 0.8)?;
    let lif = MultiStepLif::new(LifConfig::default());
    let a = lif.forward(&x.transpose(1, 2)?)?;
    let b = lif.forward(&x.transpose(1, 2)?.contiguous()?)?;
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

#[test]
fn monitor_counts_spikes_only_when_enabled() -> Result<()> {
    let dev = Device::Cpu;
    let x = (Tensor::randn(0f32, 1.0, (4, 3000), &dev)? + 1.0)?;
    let lif = MultiStepLif::new(LifConfig::default());
    lif.forward(&x)?;
    assert_eq!(lif.monitor().counts().neuron_steps, 0);
    lif.monitor().enable();
    let s = lif.forward(&x)?;
    lif.forward(&x)?;
    let counts = lif.monitor().counts();
    let expected = 2.0 * s.sum_all()?.to_scalar::<f32>()? as f64;
    assert_eq!(counts.spikes as f64, expected);
    assert_eq!(counts.neuron_steps, 2 * 4 * 3000);
    let per_step = s.sum(1)?.to_vec1::<f32>()?;
    for (t, &c) in counts.per_step_spikes.iter().enumerate() {
        assert_eq!(c as f32, 2.0 * per_step[t]);
    }
    assert!((counts.firing_rate() - expected / 24000.0).abs() < 1e-12);
    lif.monitor().reset();
    assert_eq!(lif.monitor().counts().spikes, 0);
    Ok(())
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let lif = MultiStepLif::new(LifConfig::default());
    let scalar = Tensor::new(1f32, &dev).unwrap();
    assert!(lif.forward(&scalar).is_err());
    let f64s = Tensor::zeros((2, 3), candle_core::DType::F64, &dev).unwrap();
    let err = lif.forward(&f64s).unwrap_err().to_string();
    assert!(err.contains("f32"), "{err}");
    let bad = MultiStepLif::new(LifConfig {
        tau: 0.5,
        ..LifConfig::default()
    });
    let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
    assert!(bad.forward(&x).unwrap_err().to_string().contains("tau"));
}
