use super::channel_loops::*;
use super::*;
use crate::kernels::simd::Level;
use crate::kernels::test_util::*;
use candle_core::{DType, Device};
use candle_nn::{BatchNormConfig, VarBuilder, VarMap};

/// The scale and shift of each BatchNorm, in order.
fn affine_params(bns: &[&BatchNorm]) -> Vec<Tensor> {
    bns.iter()
        .flat_map(|bn| {
            let (g, b) = bn.weight_and_bias().unwrap();
            [g.clone(), b.clone()]
        })
        .collect()
}

/// A BatchNorm over `c` channels with a random affine pair (the same for every seed).
fn batch_norm(c: usize, affine: &[Tensor; 2]) -> (VarMap, BatchNorm) {
    let vm = VarMap::new();
    let cfg = BatchNormConfig {
        eps: 1e-5,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    };
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let bn = candle_nn::batch_norm(c, cfg, vb).unwrap();
    let (g, b) = bn.weight_and_bias().unwrap();
    Var::from_tensor(g).unwrap().set(&affine[0]).unwrap();
    Var::from_tensor(b).unwrap().set(&affine[1]).unwrap();
    (vm, bn)
}

/// Output, gradients of input and affine pairs, and running statistics against candle_nn's
/// composed `forward_train`, on inputs off-centre so that a naive variance would cancel;
/// `layers` splits the channels among stacked BatchNorms.
fn check(shape: &[usize], layers: &[usize]) {
    let dev = Device::Cpu;
    let make = || {
        layers
            .iter()
            .map(|&c| {
                let affine = [
                    Tensor::randn(1f32, 0.5, c, &dev).unwrap(),
                    Tensor::randn(0f32, 0.5, c, &dev).unwrap(),
                ];
                (batch_norm(c, &affine), batch_norm(c, &affine))
            })
            .unzip::<_, _, Vec<_>, Vec<_>>()
    };
    let (ours_bns, ref_bns) = make();
    fn refs(bns: &[(VarMap, BatchNorm)]) -> Vec<&BatchNorm> {
        bns.iter().map(|(_, bn)| bn).collect()
    }
    let (ours_bns, ref_bns) = (refs(&ours_bns), refs(&ref_bns));
    let x =
        Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 3.0).unwrap()).unwrap();
    let ours = batch_norm_train(x.as_tensor(), &ours_bns).unwrap();
    let theirs = per_layer(x.as_tensor(), &ref_bns, BatchNorm::forward_train).unwrap();
    assert!(max_rel_diff(&ours, &theirs) < 1e-5, "forward differs");
    let mut pairs = vec![(x.as_tensor().clone(), x.as_tensor().clone())];
    pairs.extend(
        affine_params(&ours_bns)
            .into_iter()
            .zip(affine_params(&ref_bns)),
    );
    assert_paired_gradients(ours, theirs, &pairs, 1e-4);
    for (ours, theirs) in ours_bns.iter().zip(&ref_bns) {
        assert!(max_rel_diff(ours.running_mean(), theirs.running_mean()) < 1e-5);
        assert!(max_rel_diff(ours.running_var(), theirs.running_var()) < 1e-5);
    }
}

/// Channels-first images, runs of a channel not a multiple of the lane width.
#[test]
fn matches_candle_on_images() {
    check(&[6, 5, 7, 9], &[5]);
}

/// Rows of channels (a 1x1 convolution over tokens), as `LinearBn` normalises them.
#[test]
fn matches_candle_on_rows() {
    check(&[300, 13], &[13]);
}

/// Three layers' outputs side by side, as spiking self-attention's q, k and v.
#[test]
fn stacked_layers_match_each_layer_alone() {
    check(&[300, 12], &[3, 4, 5]);
}

/// [`batch_norm_train_then`] against `then` composed after [`batch_norm_train`] (values,
/// gradients of the input, the affine pair and `param`, running statistics), on `[8, 6, ...]`.
fn check_then<F, G>(
    shape: &[usize],
    param: Option<&Var>,
    then: F,
    composed: impl Fn(&Tensor) -> Tensor,
) where
    F: FnOnce(&Tensor) -> Result<(Tensor, G)>,
    G: ThenBackward,
{
    let dev = Device::Cpu;
    let c = shape[1];
    let affine = [
        Tensor::randn(1f32, 0.5, c, &dev).unwrap(),
        Tensor::randn(0f32, 0.5, c, &dev).unwrap(),
    ];
    let ((_m1, ours_bn), (_m2, ref_bn)) = (batch_norm(c, &affine), batch_norm(c, &affine));
    let x =
        Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 3.0).unwrap()).unwrap();
    let ours =
        batch_norm_train_then(x.as_tensor(), &[&ours_bn], param.map(Var::as_tensor), then).unwrap();
    let theirs = composed(&batch_norm_train(x.as_tensor(), &[&ref_bn]).unwrap());
    assert!(max_rel_diff(&ours, &theirs) < 1e-5, "forward differs");
    let mut pairs = vec![(x.as_tensor().clone(), x.as_tensor().clone())];
    pairs.extend(
        affine_params(&[&ours_bn])
            .into_iter()
            .zip(affine_params(&[&ref_bn])),
    );
    pairs.extend(param.map(|p| (p.as_tensor().clone(), p.as_tensor().clone())));
    assert_paired_gradients(ours, theirs, &pairs, 1e-4);
    assert!(max_rel_diff(ours_bn.running_mean(), ref_bn.running_mean()) < 1e-5);
    assert!(max_rel_diff(ours_bn.running_var(), ref_bn.running_var()) < 1e-5);
}

/// Followed by max-pooling, as the tokenizer's pooled convolutions.
#[test]
fn then_max_pool_matches_composed() {
    use crate::kernels::maxpool::{max_pool2d, max_pool2d_grad};
    let then = |y: &Tensor| {
        let grad = |y: &Tensor, g: &Tensor| Ok((max_pool2d_grad(y, g, 3, 2, 1)?, None));
        Ok((max_pool2d(y, 3, 2, 1)?, grad))
    };
    check_then(&[8, 6, 7, 9], None, then, |y| {
        max_pool2d(y, 3, 2, 1).unwrap()
    });
}

/// Followed by a LIF-fed linear layer whose packed weights get their gradient through
/// `param`, as the spiking MLP's hidden layer.
#[test]
fn then_lif_linear_matches_composed() {
    use crate::kernels::lif_linear::{lif_linear, lif_linear_packed};
    use crate::neuron::{LifConfig, MultiStepLif};
    let packed = Var::randn(0f32, 1.0, (5, 7), &Device::Cpu).unwrap();
    let lif = MultiStepLif::new(LifConfig::default());
    // Rows of 6 channels, seen by the LIF as [T = 4, 2, 6].
    let then = |y: &Tensor| {
        let (value, grad) = lif_linear_packed(&lif, &y.reshape((4, 2, 6))?, packed.as_tensor())?;
        let grad = move |y: &Tensor, g: &Tensor| {
            let (grad_y, grad_packed) = grad(&y.reshape((4, 2, 6))?, g)?;
            Ok((grad_y.reshape(y.shape())?, grad_packed))
        };
        Ok((value, grad))
    };
    let composed = |y: &Tensor| {
        let p = packed.as_tensor();
        let (w, b) = (
            p.narrow(1, 0, 6).unwrap(),
            p.narrow(1, 6, 1).unwrap().squeeze(1).unwrap(),
        );
        lif_linear(&lif, &y.reshape((4, 2, 6)).unwrap(), &w, Some(&b)).unwrap()
    };
    check_then(&[8, 6], Some(&packed), then, composed);
}

/// Followed by a residual sum whose other term gets its gradient through `param`, as the
/// blocks' projections.
#[test]
fn then_residual_sum_matches_composed() {
    let residual = Var::randn(0f32, 1.0, (8, 6), &Device::Cpu).unwrap();
    let kept = residual.as_tensor().detach();
    let then = |y: &Tensor| {
        let grad = |_: &Tensor, g: &Tensor| Ok((g.clone(), Some(g.clone())));
        Ok(((y + &kept)?, grad))
    };
    check_then(&[8, 6], Some(&residual), then, |y| {
        (y + residual.as_tensor()).unwrap()
    });
}

#[test]
fn rejects_a_vector() {
    let (_vm, bn) = batch_norm(
        3,
        &[
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        ],
    );
    let x = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    assert!(batch_norm_train(&x, &[&bn]).is_err());
}

/// The channel sums and the per-channel map, bit for bit the same on every instruction set
/// this CPU has (the AVX-512 path is skipped, with a note, where it lacks it).
#[test]
fn every_simd_level_gives_the_same_sums_and_maps() {
    if !Level::Avx512.supported() {
        println!("skipped the avx512 path: this CPU lacks AVX-512");
    }
    let values = |n: usize, k: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * k).fract() - 0.4) * 3.0)
            .collect()
    };
    // Images (runs of 37 per channel) and rows (one value per channel).
    for (outer, c, inner) in [(5, 6, 37), (300, 70, 1)] {
        let d = Dims { outer, c, inner };
        let (x, g) = (
            values(outer * c * inner, 0.618),
            values(outer * c * inner, 0.377),
        );
        let centre: Vec<f64> = (0..c).map(|ch| ch as f64 * 0.1).collect();
        let affine = Affine {
            x: values(c, 0.21),
            g: values(c, 0.73),
            shift: values(c, 0.51),
        };
        let run = |level| {
            let sums = channel_sums(level, &g, &x, d, (None, Some(&centre)));
            (sums, per_channel_affine(level, &x, &g, d, &affine))
        };
        let portable = run(Level::Portable);
        for level in Level::supported_levels() {
            assert_eq!(run(level), portable, "{level}, inner {inner}");
        }
    }
}
