//! Each portable op (candle's tensor ops, any device) against its fused CPU kernel: the same
//! spikes bit for bit, values and gradients within 1e-5 of the largest magnitude.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{BatchNorm, VarMap};
use spikeclip::kernels::attention::Attention;
use spikeclip::kernels::grad_slot::{GradSlot, SlotParam};
use spikeclip::kernels::text_mlp::SlotLinear;
use spikeclip::model::layers::batch_norm;
use spikeclip::neuron::{LifConfig, MultiStepLif, Surrogate};
use spikeclip::ops::{Ops, Then};
use spikeclip::train::grads::{Grad, Gradients};
use spikeclip::train::rng::Rng;

const TOL: f32 = 1e-5;

fn dev() -> Device {
    Device::Cpu
}

thread_local! {
    /// Each test runs on a thread of its own: seeded here, its inputs are the same every run
    /// (candle's CPU `randn` cannot be seeded, and an unlucky draw left a LIF layer silent, so
    /// that its weight had no gradient to compare).
    static RNG: std::cell::RefCell<Rng> = std::cell::RefCell::new(Rng::new(0));
}

fn randn(scale: f64, shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    let values: Vec<f32> = RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n).map(|_| (scale * r.normal()) as f32).collect()
    });
    Tensor::from_vec(values, shape, &dev())
}

fn var(scale: f64, shape: &[usize]) -> Result<Var> {
    Var::from_tensor(&randn(scale, shape)?)
}

/// A gradient as dense values in its parameter's layout.
fn dense(grad: Option<Grad>, param: &Tensor) -> Vec<f32> {
    let n = param.elem_count();
    match grad.expect("a gradient") {
        Grad::Tensor(t) => t.flatten_all().unwrap().to_vec1().unwrap(),
        Grad::Values(v) => v.to_vec(),
        Grad::Rows(rows) => {
            let w = rows.width();
            let mut out = vec![0f32; n];
            for &r in rows.rows() {
                let r = r as usize;
                out[r * w..(r + 1) * w].copy_from_slice(rows.row(r).unwrap());
            }
            out
        }
        Grad::Product(p) => {
            let mut out = vec![0f32; n];
            p.write_into(&mut out).unwrap();
            out
        }
    }
}

/// Largest absolute difference relative to the largest magnitude of `b`.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    diff / scale.max(1e-12)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// How the two outputs must agree.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    /// Spikes (or selections of inputs): bit for bit.
    Exact,
    /// Sums in another order: within [`TOL`].
    Close,
}

/// `op` run fused and portable gives the same output and, under the same random upstream
/// gradient, the same gradient for every tensor of `params` (read through `slots` too).
fn parity(
    op: impl Fn(Ops) -> Result<Tensor>,
    params: &[&Tensor],
    slots: &[GradSlot],
    output: Output,
) -> Result<()> {
    let fused = op(Ops::Fused)?;
    let portable = op(Ops::Portable)?;
    assert_eq!(fused.dims(), portable.dims());
    let (f, p) = (values(&fused), values(&portable));
    match output {
        Output::Exact => assert!(f == p, "outputs differ"),
        Output::Close => assert!(rel(&p, &f) < TOL, "outputs differ by {}", rel(&p, &f)),
    }
    let g = randn(1.0, fused.dims())?;
    let fused_grads = Gradients::backward(&(fused * &g)?.sum_all()?, slots)?;
    let fused_dense: Vec<Vec<f32>> = params
        .iter()
        .map(|t| dense(fused_grads.get(t), t))
        .collect();
    drop(fused_grads);
    let portable_grads = Gradients::backward(&(portable * &g)?.sum_all()?, slots)?;
    for (t, f) in params.iter().zip(&fused_dense) {
        let p = dense(portable_grads.get(t), t);
        assert!(
            f.iter().any(|&x| x != 0.0),
            "no gradient for {:?}",
            t.dims()
        );
        let d = rel(&p, f);
        assert!(d < TOL, "gradient of {:?} differs by {d}", t.dims());
    }
    Ok(())
}

fn lif_configs() -> Vec<LifConfig> {
    let d = LifConfig::default();
    vec![
        d,
        LifConfig::attention(),
        LifConfig { v_reset: None, ..d },
        LifConfig {
            detach_reset: false,
            ..d
        },
        LifConfig {
            decay_input: false,
            v_reset: Some(-0.2),
            tau: 3.0,
            ..d
        },
        LifConfig {
            decay_input: false,
            detach_reset: false,
            v_reset: None,
            ..d
        },
        LifConfig {
            v_reset: Some(0.3),
            surrogate: Surrogate::atan(),
            ..d
        },
    ]
}

#[test]
fn lif_spikes_gradients_and_counts_match() -> Result<()> {
    for cfg in lif_configs() {
        let x = Var::from_tensor(&(randn(1.5, &[4, 3, 40])? + 0.6)?)?;
        let (fused, portable) = (MultiStepLif::new(cfg), MultiStepLif::new(cfg));
        fused.monitor().enable();
        portable.monitor().enable();
        let lif = |ops: Ops| match ops {
            Ops::Fused => &fused,
            Ops::Portable => &portable,
        };
        parity(
            |ops| ops.lif(lif(ops), x.as_tensor()),
            &[x.as_tensor()],
            &[],
            Output::Exact,
        )?;
        let (a, b) = (fused.monitor().counts(), portable.monitor().counts());
        assert!(a.firing_rate() > 0.0);
        assert_eq!(a.per_step_rates(), b.per_step_rates(), "{cfg:?}");
    }
    Ok(())
}

#[test]
fn lif_fed_linear_and_conv_layers_match() -> Result<()> {
    let lif = MultiStepLif::new(LifConfig::default());
    let (x, w, b) = (
        var(1.5, &[4, 2, 5, 16])?,
        var(0.3, &[8, 16])?,
        var(0.1, &[8])?,
    );
    let params = [x.as_tensor(), w.as_tensor(), b.as_tensor()];
    parity(
        |ops| ops.lif_linear(&lif, &x, &w, Some(&b)),
        &params,
        &[],
        Output::Close,
    )?;
    let (x, w, b) = (
        var(1.5, &[4, 2, 3, 6, 6])?,
        var(0.3, &[5, 3, 3, 3])?,
        var(0.1, &[5])?,
    );
    let params = [x.as_tensor(), w.as_tensor(), b.as_tensor()];
    parity(
        |ops| ops.lif_conv2d(&lif, &x, &w, Some(&b), 1),
        &params,
        &[],
        Output::Close,
    )?;
    let (x, w) = (var(1.0, &[2, 3, 8, 8])?, var(0.3, &[4, 3, 3, 3])?);
    parity(
        |ops| ops.conv2d(&x, &w, 1),
        &[x.as_tensor(), w.as_tensor()],
        &[],
        Output::Close,
    )
}

/// Two BatchNorms over `channels` with a random affine pair, the same for every call.
fn batch_norms(channels: [usize; 2]) -> Result<(VarMap, Vec<BatchNorm>)> {
    let vm = VarMap::new();
    let vb = spikeclip::train::init::seeded_var_builder(&vm, 9, DType::F32, &dev());
    let bns = channels
        .iter()
        .enumerate()
        .map(|(i, &c)| batch_norm(c, vb.pp(format!("bn{i}"))))
        .collect::<Result<Vec<_>>>()?;
    for (name, v) in vm.data().lock().unwrap().iter() {
        let seed = name.len() as f32;
        let n = v.as_tensor().elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|i| 1.0 + ((i as f32 + seed) * 0.37).sin())
            .collect();
        v.set(&Tensor::from_vec(vals, n, &dev())?)?;
    }
    Ok((vm, bns))
}

fn running(bns: &[BatchNorm]) -> Vec<f32> {
    bns.iter()
        .flat_map(|bn| [values(bn.running_mean()), values(bn.running_var())].concat())
        .collect()
}

#[test]
fn training_batch_norm_matches_with_running_statistics() -> Result<()> {
    let (_vm, bns) = batch_norms([3, 5])?;
    let bns: Vec<&BatchNorm> = bns.iter().collect();
    let x = Var::from_tensor(&(randn(2.0, &[6, 8, 4, 4])? + 1.0)?)?;
    let mut params = vec![x.as_tensor().clone()];
    for bn in &bns {
        let (g, b) = bn.weight_and_bias().unwrap();
        params.extend([g.clone(), b.clone()]);
    }
    let refs: Vec<&Tensor> = params.iter().collect();
    parity(
        |ops| ops.batch_norm_train(&x, &bns),
        &refs,
        &[],
        Output::Close,
    )?;
    // Running statistics: one update each from the same start.
    let (_fm, fused_once) = batch_norms([3, 5])?;
    let (_pm, portable_once) = batch_norms([3, 5])?;
    Ops::Fused.batch_norm_train(&x, &fused_once.iter().collect::<Vec<_>>())?;
    Ops::Portable.batch_norm_train(&x, &portable_once.iter().collect::<Vec<_>>())?;
    let (a, b) = (running(&fused_once), running(&portable_once));
    assert!(
        rel(&b, &a) < TOL,
        "running statistics differ by {}",
        rel(&b, &a)
    );
    Ok(())
}

#[test]
fn max_pooling_routes_ties_to_the_first_maximum() -> Result<()> {
    // Rounded values: most windows hold tied maxima.
    let x = Var::from_tensor(&(randn(1.5, &[2, 3, 8, 8])?.round()?))?;
    for window in [(3, 2, 1), (2, 2, 0), (3, 1, 1)] {
        parity(
            |ops| ops.max_pool2d(&x, window),
            &[x.as_tensor()],
            &[],
            Output::Exact,
        )?;
    }
    Ok(())
}

#[test]
fn attention_core_matches_with_a_key_mask() -> Result<()> {
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 0., 0.], [1., 1., 1., 1., 1., 0.]],
        &dev(),
    )?;
    for key_mask in [None, Some(mask)] {
        let core = Attention {
            lifs: [(); 3].map(|_| MultiStepLif::new(LifConfig::default())),
            heads: 2,
            scale: 0.125,
            key_mask,
        };
        let qkv = Var::from_tensor(&(randn(1.5, &[4, 2, 6, 24])? + 0.8)?)?;
        parity(
            |ops| ops.attention(&core, &qkv),
            &[qkv.as_tensor()],
            &[],
            Output::Close,
        )?;
    }
    Ok(())
}

fn slot_param(scale: f64, shape: &[usize]) -> Result<SlotParam> {
    Ok(SlotParam::new(var(scale, shape)?.as_tensor().clone()))
}

#[test]
fn token_embedding_and_text_mlp_match_slots_against_candles_store() -> Result<()> {
    let (token, position) = (slot_param(1.0, &[30, 4])?, slot_param(0.5, &[6, 4])?);
    let ids = Tensor::new(&[[3u32, 7, 3, 0, 9], [0, 3, 29, 4, 4]], &dev())?;
    let slots = [token.grad().clone(), position.grad().clone()];
    let tables = [token.value(), position.value()];
    parity(
        |ops| ops.token_embedding(&ids, &token, &position),
        &tables,
        &slots,
        Output::Exact,
    )?;
    let err = Ops::Portable
        .token_embedding(&Tensor::new(&[[30u32]], &dev())?, &token, &position)
        .unwrap_err();
    assert!(err.to_string().contains("token id 30"), "{err}");

    let layer = |o: usize, k: usize| -> Result<SlotLinear> {
        Ok(SlotLinear::new(
            var(0.4, &[o, k])?.as_tensor().clone(),
            var(0.2, &[o])?.as_tensor().clone(),
        ))
    };
    let (fc1, fc2) = (layer(12, 20)?, layer(7, 12)?);
    let (lif1, lif2) = (
        MultiStepLif::new(LifConfig::default()),
        MultiStepLif::new(LifConfig::default()),
    );
    let token = SlotParam::new((token.value() * 3.0)?);
    let token = SlotParam::new(Var::from_tensor(token.value())?.as_tensor().clone());
    let mut slots = vec![token.grad().clone(), position.grad().clone()];
    slots.extend(fc1.grad_slots());
    slots.extend(fc2.grad_slots());
    let params = [
        token.value(),
        position.value(),
        fc1.weight.value(),
        fc1.bias.value(),
        fc2.weight.value(),
        fc2.bias.value(),
    ];
    parity(
        |ops| ops.text_mlp(&ids, (&token, &position), [(&lif1, &fc1), (&lif2, &fc2)], 4),
        &params,
        &slots,
        Output::Close,
    )
}

#[test]
fn each_op_after_a_fused_batch_norm_matches() -> Result<()> {
    let (_vm, bns) = batch_norms([4, 4])?;
    let bns: Vec<&BatchNorm> = bns.iter().collect();
    let lif = MultiStepLif::new(LifConfig::default());
    // Rows of tokens [T, B, N, C] = [4, 2, 6, 8].
    let x = Var::from_tensor(&(randn(2.0, &[48, 8])? + 0.5)?)?;
    let tokens = [4, 2, 6, 8];
    let packed = var(0.3, &[5, 9])?;
    let residual = var(1.0, &tokens)?;
    let core = Attention {
        lifs: [(); 3].map(|_| MultiStepLif::new(LifConfig::default())),
        heads: 2,
        scale: 0.5,
        key_mask: None,
    };
    let (_vm3, three) = batch_norms([12, 12])?;
    let three: Vec<&BatchNorm> = three.iter().collect();
    let qkv_in = Var::from_tensor(&(randn(2.0, &[48, 24])? + 0.5)?)?;
    let with_param = |then: Then, param: &Tensor, x: &Var, bns: &[&BatchNorm], shape: &[usize]| {
        parity(
            |ops| ops.batch_norm_then(x, bns, shape, then),
            &[x.as_tensor(), param],
            &[],
            Output::Close,
        )
    };
    with_param(Then::LifLinear(&lif, &packed), &packed, &x, &bns, &tokens)?;
    with_param(Then::Add(&residual), &residual, &x, &bns, &tokens)?;
    let (t, b, n) = (4, 2, 6);
    parity(
        |ops| ops.batch_norm_then(&qkv_in, &three, &[t, b, n, 24], Then::Attention(&core)),
        &[qkv_in.as_tensor()],
        &[],
        Output::Close,
    )?;
    let image = Var::from_tensor(&randn(1.0, &[3, 8, 6, 6])?.round()?)?;
    parity(
        |ops| ops.batch_norm_then(&image, &bns, &[3, 8, 6, 6], Then::MaxPool(3, 2, 1)),
        &[image.as_tensor()],
        &[],
        Output::Close,
    )
}

/// Models on the CPU run the fused kernels unless the run chose otherwise.
#[test]
fn the_cpu_defaults_to_the_fused_kernels() {
    assert_eq!(Ops::for_device(&Device::Cpu), Ops::Fused);
}
