//! Parity with the authors' PyTorch + SpikingJelly model (scripts/encoder_fixtures.py writes
//! it at a small size with their parameter names): imported weights give the same spikes per
//! layer and time step and the same features, within 1e-4, in eval mode.

mod common;
use common::max_abs_diff;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use spikeclip::model::block::NamedLif;
use spikeclip::model::config::{
    ImageEncoderConfig, ReadoutKind, SpikeClipConfig, TextEncoderConfig, TextEncoderKind,
};
use spikeclip::model::import::load_pth;
use spikeclip::model::SpikeClip;
use spikeclip::recipe::Student;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/encoders")
        .join(name)
}

/// The fixture's size (tests/fixtures/encoders/config.json) in our configuration.
fn config() -> SpikeClipConfig {
    SpikeClipConfig {
        time_steps: 4,
        out_dim: 16,
        readout: ReadoutKind::Tdw,
        image: ImageEncoderConfig {
            in_channels: 3,
            embed_dim: 32,
            num_heads: 4,
            mlp_ratio: 4,
            depth: 1,
        },
        text: TextEncoderConfig {
            kind: TextEncoderKind::Mlp,
            vocab_size: 30,
            context_length: 20,
            max_positions: 24,
            width: 4,
            hidden: 32,
            depth: 1,
            num_heads: 1,
            mlp_ratio: 1,
        },
    }
}

fn load() -> (SpikeClip, HashMap<String, Tensor>) {
    let model = SpikeClip::new(&config(), 0, &Device::Cpu).unwrap();
    load_pth(&fixture("image.pth"), model.varmap(), "image.").unwrap();
    load_pth(&fixture("text.pth.tar"), model.varmap(), "text.").unwrap();
    let io = candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap();
    (model, io)
}

fn check_spikes(lifs: Vec<&NamedLif>, prefix: &str, io: &HashMap<String, Tensor>) {
    for l in lifs {
        let want: Vec<u64> = io[&format!("{prefix}{}", l.name)]
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v as u64)
            .collect();
        assert_eq!(
            l.lif.monitor().counts().per_step_spikes,
            want,
            "spikes per step of {}",
            l.name
        );
    }
}

#[test]
fn imported_image_encoder_matches_pytorch_in_eval_mode() {
    let (model, io) = load();
    let lifs = model.image.lif_layers();
    assert_eq!(lifs.len(), 11);
    lifs.iter().for_each(|l| l.lif.monitor().enable());
    let features = model.image_features(&io["pixels"], false).unwrap();
    check_spikes(lifs, "image_spikes.", &io);
    let diff = max_abs_diff(&features, &io["image_features"]);
    assert!(diff < 1e-4, "image features differ by {diff}");
}

#[test]
fn imported_text_encoder_matches_pytorch_in_eval_mode() {
    let (model, io) = load();
    let lifs = model.text.lif_layers();
    lifs.iter().for_each(|l| l.lif.monitor().enable());
    let ids = io["ids"].to_dtype(DType::U32).unwrap();
    let features = model.text_features(&ids, false).unwrap();
    check_spikes(lifs, "text_spikes.", &io);
    let diff = max_abs_diff(&features, &io["text_features"]);
    assert!(diff < 1e-4, "text features differ by {diff}");
}

#[test]
fn importing_into_the_wrong_size_lists_the_mismatches() {
    let mut cfg = SpikeClipConfig::preset("tiny").unwrap();
    cfg.text.vocab_size = 30;
    let model = SpikeClip::new(&cfg, 0, &Device::Cpu).unwrap();
    let err = format!(
        "{:#}",
        load_pth(&fixture("image.pth"), model.varmap(), "image.").unwrap_err()
    );
    assert!(
        err.contains("image.pth") && err.contains("image.proj.weight: file has [16, 32]"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        load_pth(&fixture("absent.pth"), model.varmap(), "image.").unwrap_err()
    );
    assert!(err.contains("absent.pth"), "{err}");
}

#[test]
fn max_pool_matches_pytorch_forward_and_gradient() {
    let io = candle_core::safetensors::load(fixture("maxpool.safetensors"), &Device::Cpu).unwrap();
    let x = candle_core::Var::from_tensor(&io["x"]).unwrap();
    let y = spikeclip::model::layers::max_pool_3x3_s2(spikeclip::ops::Ops::Fused, x.as_tensor())
        .unwrap();
    assert_eq!(max_abs_diff(&y, &io["y"]), 0.0);
    let grads = (y * &io["g"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(max_abs_diff(grads.get(x.as_tensor()).unwrap(), &io["grad"]) < 1e-6);
}
