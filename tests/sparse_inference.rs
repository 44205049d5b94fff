//! The spike-driven inference path of the image encoder against the dense eval-mode path.

mod common;

use candle_core::{Device, Tensor};
use spikeclip::bench::set_batch_norm_shift;
use spikeclip::model::config::SpikeClipConfig;
use spikeclip::model::SpikeClip;
use spikeclip::neuron::SpikeCounts;
use spikeclip::recipe::Student;

/// A small random Spikingformer (two blocks, 32 channels, 4 heads) with its BatchNorm shifted
/// so that every layer fires.
fn model() -> SpikeClip {
    let mut cfg = SpikeClipConfig::preset("tiny").unwrap();
    cfg.image.embed_dim = 32;
    cfg.image.depth = 2;
    let model = SpikeClip::new(&cfg, 7, &Device::Cpu).unwrap();
    set_batch_norm_shift(model.varmap(), 1.0).unwrap();
    model
}

/// Deterministic images `[b, 3, 32, 32]` with the spread of CLIP-normalised pixels.
fn images(b: usize, phase: f32) -> Tensor {
    let values = (0..b * 3 * 32 * 32)
        .map(|i| 1.5 * ((i as f32) * 0.37 + phase).sin() + 0.3 * ((i as f32) * 0.011).cos())
        .collect();
    Tensor::from_vec(values, (b, 3, 32, 32), &Device::Cpu).unwrap()
}

/// Spike counts of every LIF layer, per time step, after running `f`.
fn counts(model: &SpikeClip, f: impl FnOnce() -> Tensor) -> (Tensor, Vec<SpikeCounts>) {
    let lifs = model.image.lif_layers();
    for l in &lifs {
        l.lif.monitor().reset();
        l.lif.monitor().enable();
    }
    let out = f();
    let counts = lifs.iter().map(|l| l.lif.monitor().counts()).collect();
    for l in &lifs {
        l.lif.monitor().disable();
    }
    (out, counts)
}

fn assert_sparse_matches_dense(model: &SpikeClip, x: &Tensor) {
    let weights = model.image.sparse_weights().unwrap();
    let (dense, dense_counts) = counts(model, || model.image_features(x, false).unwrap());
    let (sparse, sparse_counts) =
        counts(model, || model.image.forward_sparse(x, &weights).unwrap());
    let quietest = dense_counts
        .iter()
        .map(SpikeCounts::firing_rate)
        .fold(1.0, f64::min);
    assert!(quietest > 0.05, "a layer barely fires: {dense_counts:?}");
    assert_eq!(sparse_counts, dense_counts);
    let diff = common::max_abs_diff(&sparse, &dense);
    assert!(diff < 1e-4, "features differ by {diff}");
}

#[test]
fn sparse_path_gives_the_dense_spikes_and_features() {
    let model = model();
    assert_sparse_matches_dense(&model, &images(3, 0.0));
}

/// After training-mode passes the running statistics are no longer 0 and 1, so the folded
/// BatchNorm is a real scale and shift.
#[test]
fn sparse_path_matches_after_batch_norm_updates() {
    let model = model();
    for step in 0..3 {
        model
            .image_features(&(images(4, step as f32) * 1.7).unwrap(), true)
            .unwrap();
    }
    let stats = model
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| name.ends_with("running_var"))
        .map(|(_, v)| common::max_abs_diff(v.as_tensor(), &v.ones_like().unwrap()))
        .fold(0f32, f32::max);
    assert!(stats > 0.1, "running statistics barely moved: {stats}");
    assert_sparse_matches_dense(&model, &images(3, 0.5));
}

#[test]
fn weights_of_another_encoder_are_rejected() {
    let mut cfg = SpikeClipConfig::preset("tiny").unwrap();
    cfg.image.embed_dim = 32;
    let one_block = SpikeClip::new(&cfg, 1, &Device::Cpu).unwrap();
    let weights = one_block.image.sparse_weights().unwrap();
    let err = model()
        .image
        .forward_sparse(&images(1, 0.0), &weights)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another encoder"), "{err}");
}
