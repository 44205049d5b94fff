use candle_core::{DType, Device, Tensor};

use super::attention::spike_attention_at;
use super::bits::pack_binary_row_at;
use super::gather::LAYER;
use super::*;
use crate::kernels::conv::Window;
use crate::kernels::simd::Level;
use crate::kernels::test_util::*;

/// Random 0/1 spikes firing at about `rate`.
fn spikes(shape: &[usize], rate: f64) -> Tensor {
    let u = Tensor::rand(0f32, 1.0, shape, &Device::Cpu).unwrap();
    u.lt(rate).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn pack_roundtrips_and_counts() {
    let s = spikes(&[3, 5, 130], 0.3);
    let bits = SpikeBits::pack(&s).unwrap();
    assert_eq!((bits.rows(), bits.cols()), (15, 130));
    let sum = s.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(bits.count(), sum as usize);
    let back = bits.unpack(&Device::Cpu).unwrap();
    assert_eq!(back.to_vec3::<f32>().unwrap(), s.to_vec3::<f32>().unwrap());
}

#[test]
fn heads_first_and_reshape_follow_the_unpacked_tensor() {
    let s = spikes(&[2, 3, 5, 4, 48], 0.3);
    let bits = SpikeBits::pack(&s).unwrap();
    let swapped = bits.heads_first().unwrap();
    assert_eq!(
        swapped,
        SpikeBits::pack(&s.transpose(2, 3).unwrap()).unwrap()
    );
    assert_eq!(
        bits.counts_per_leading().iter().sum::<u64>(),
        bits.count() as u64
    );
    let flat = bits.reshaped(vec![6, 20, 48]).unwrap();
    assert_eq!(
        flat,
        SpikeBits::pack(&s.reshape((6, 20, 48)).unwrap()).unwrap()
    );
    assert!(SpikeBits::pack(&s)
        .unwrap()
        .reshaped(vec![6, 5, 192])
        .is_err());
}

#[test]
fn pack_rejects_non_binary() {
    let t = Tensor::new(&[[0f32, 1.0, 0.5]], &Device::Cpu).unwrap();
    let err = SpikeBits::pack(&t).unwrap_err().to_string();
    assert!(err.contains("0 or 1") && err.contains("0.5"), "{err}");
}

#[test]
fn linear_matches_dense() {
    let s = spikes(&[2, 7, 100], 0.2);
    let w = Tensor::randn(0f32, 1.0, (130, 100), &Device::Cpu).unwrap();
    let ours = spike_linear(&SpikeBits::pack(&s).unwrap(), &w).unwrap();
    let dense = s.broadcast_matmul(&w.t().unwrap()).unwrap();
    assert_eq!(ours.dims(), &[2, 7, 130]);
    assert!(max_rel_diff(&ours, &dense) < 1e-5);
}

/// Sparse rows add their active inputs' weights, dense ones (above half firing, around
/// 0.5 a mix of both) subtract their silent inputs' from the all-on sum, bias included.
#[test]
fn layer_bias_starts_the_sums_at_every_firing_rate() {
    let w = Tensor::randn(0f32, 1.0, (66, 70), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, 66, &Device::Cpu).unwrap();
    let layer = SpikeLayer::new(&w, Some(&b)).unwrap();
    for rate in [0.3, 0.5, 0.9, 1.0] {
        let s = spikes(&[40, 70], rate);
        let ours = layer
            .linear(&SpikeBits::pack(&s).unwrap(), &Device::Cpu)
            .unwrap();
        let dense = s
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_rel_diff(&ours, &dense) < 1e-5, "rate {rate}");
    }
    let err = SpikeLayer::new(&w, Some(&b.narrow(0, 0, 3).unwrap()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bias"), "{err}");
}

/// A layer into a LIF fires what the LIF fires on the layer's output, in groups of columns
/// that cut across the 64-output blocks and words, with output counts that leave a block
/// partly padded and pixel counts that leave the last task short.
#[test]
fn layers_into_a_lif_fire_the_spikes_of_their_outputs() {
    use crate::neuron::{LifConfig, MultiStepLif};
    let lif = MultiStepLif::new(LifConfig::default());
    let dev = &Device::Cpu;
    for (o, groups) in [(96, 1), (96, 3), (96, 2), (70, 2)] {
        let w = Tensor::randn(0f32, 1.0, (o, 70), dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, o, dev).unwrap();
        let layer = SpikeLayer::new(&w, Some(&b)).unwrap();
        let bits = SpikeBits::pack(&spikes(&[4, 37, 70], 0.2)).unwrap();
        let out = layer.linear(&bits, dev).unwrap();
        let grouped = match groups {
            1 => out,
            _ => out.reshape((4, 37, groups, o / groups)).unwrap(),
        };
        let want = lif.forward_bits(&grouped).unwrap();
        assert!(want.count() > 0, "nothing fired");
        let ours = layer.linear_fired(&bits, &lif, groups).unwrap();
        assert_eq!(ours, want, "{o} outputs in {groups} groups");
    }
    let conv = Tensor::randn(0f32, 1.0, (9, 7, 3, 3), dev).unwrap();
    let layer = SpikeLayer::new(&conv, None).unwrap();
    let bits = SpikeBits::pack_channels_last(&spikes(&[4 * 2, 7, 6, 5], 0.3)).unwrap();
    let out = layer.conv2d_channels_last(&bits, 1, 1, dev).unwrap();
    let want = lif
        .forward_bits(&out.reshape((4, 2, 6, 5, 9)).unwrap())
        .unwrap();
    let ours = layer
        .conv2d_channels_last_fired(&bits, (1, 1), 4, &lif)
        .unwrap();
    assert_eq!(ours, want);
    let err = layer
        .conv2d_channels_last_fired(&bits, (1, 1), 3, &lif)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not 3 steps"), "{err}");
}

fn check_conv(
    shape: (usize, usize, usize, usize),
    o: usize,
    (k, pad, st): (usize, usize, usize),
    rate: f64,
) {
    let (b, c, h, w) = shape;
    let s = spikes(&[b, c, h, w], rate);
    let wt = Tensor::randn(0f32, 1.0, (o, c, k, k), &Device::Cpu).unwrap();
    let bits = SpikeBits::pack_channels_last(&s).unwrap();
    let ours = spike_conv2d(&bits, &wt, pad, st).unwrap();
    let dense = s.conv2d(&wt, pad, st, 1, 1).unwrap();
    assert_eq!(ours.dims(), dense.dims());
    assert!(max_rel_diff(&ours, &dense) < 1e-5);
}

/// At 0.8 the inner pixels subtract silent inputs while the border ones, whose windows
/// leave the image, add active ones.
#[test]
fn conv3x3_matches_dense() {
    for rate in [0.15, 0.8] {
        check_conv((2, 70, 7, 5), 9, (3, 1, 1), rate);
    }
}

#[test]
fn conv1x1_and_strided_match_dense() {
    for rate in [0.15, 0.8] {
        check_conv((3, 5, 6, 6), 4, (1, 0, 1), rate);
        check_conv((2, 3, 9, 9), 4, (3, 1, 2), rate);
    }
}

#[test]
fn conv_rejects_channel_mismatch() {
    let bits = SpikeBits::pack_channels_last(&spikes(&[1, 3, 4, 4], 0.5)).unwrap();
    let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let err = spike_conv2d(&bits, &w, 1, 1).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
}

/// Scores and their product with v are exact integers, equal to the dense f32 matmuls.
#[test]
fn attention_matches_dense_exactly() {
    let (q, k, v) = (
        spikes(&[2, 3, 9, 70], 0.3),
        spikes(&[2, 3, 9, 70], 0.3),
        spikes(&[2, 3, 9, 70], 0.3),
    );
    let pack = |t: &Tensor| SpikeBits::pack(t).unwrap();
    let scores = spike_attention_scores(&pack(&q), &pack(&k)).unwrap();
    let dense = q.matmul(&k.t().unwrap()).unwrap();
    let as_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    assert_eq!(max_rel_diff(&as_f32(&scores), &dense), 0.0);
    let out = spike_attention(&pack(&q), &pack(&k), &pack(&v)).unwrap();
    let dense_out = dense.matmul(&v).unwrap();
    assert_eq!(out.dims(), &[2, 3, 9, 70]);
    assert_eq!(max_rel_diff(&as_f32(&out), &dense_out), 0.0);
}

/// Every instruction set gives the same bits and bit-identical sums (the AVX-512 path is
/// skipped, with a note, where the CPU lacks it).
#[test]
fn every_simd_level_packs_gathers_and_attends_alike() {
    let levels = Level::supported_levels();
    if !Level::Avx512.supported() {
        println!("skipped the avx512 path: this CPU lacks AVX-512");
    }
    let s = spikes(&[3, 203], 0.4);
    let values = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let packed = |level| {
        let mut words = vec![0u64; 3 * 4];
        for (row, w) in values.chunks(203).zip(words.chunks_mut(4)) {
            pack_binary_row_at(level, row, w);
        }
        words
    };
    let portable = packed(Level::Portable);
    assert_eq!(portable, SpikeBits::pack(&s).unwrap().words);
    let w = Tensor::randn(0f32, 1.0, (70, 9, 3, 3), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, 70, &Device::Cpu).unwrap();
    let layer = SpikeLayer::new(&w, Some(&b)).unwrap();
    let conv = |bits: &SpikeBits, level| {
        Gather {
            windows: Windows {
                spikes: bits,
                dims: (2, 7, 5, 9),
                win: Window {
                    kh: 3,
                    kw: 3,
                    padding: 1,
                    stride: 1,
                },
                out_hw: (7, 5),
            },
            weights: &layer.weights,
            schedule: LAYER,
        }
        .run_at(level)
    };
    let (q, k, v) = (
        SpikeBits::pack(&spikes(&[2, 9, 70], 0.3)).unwrap(),
        SpikeBits::pack(&spikes(&[2, 9, 70], 0.3)).unwrap(),
        SpikeBits::pack(&spikes(&[2, 9, 70], 0.3)).unwrap(),
    );
    let attend = |level| {
        spike_attention_at(level, &q, &k, &v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    };
    for rate in [0.15, 0.8] {
        let bits = SpikeBits::pack_channels_last(&spikes(&[2, 9, 7, 5], rate)).unwrap();
        let expected = conv(&bits, Level::Portable);
        for &level in &levels {
            assert_eq!(conv(&bits, level), expected, "{level}, rate {rate}");
        }
    }
    for &level in &levels {
        assert_eq!(packed(level), portable, "{level}");
        assert_eq!(attend(level), attend(Level::Portable), "{level}");
    }
}
