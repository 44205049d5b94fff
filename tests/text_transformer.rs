//! The spiking-transformer text encoder (`text.kind = transformer`): shapes, gradients, padding
//! masking, parameter counts, layer tables, checkpoints, energy and `spikeclip info`.

mod common;

use std::process::Command;

use candle_core::{Device, Tensor};
use common::max_abs_diff;
use spikeclip::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use spikeclip::model::config::{SpikeClipConfig, TextEncoderKind};
use spikeclip::model::summary::total;
use spikeclip::model::{SpikeClip, INPUT_SIDE};
use spikeclip::recipe::energy::measure_energy;
use spikeclip::recipe::student::trainable;
use spikeclip::recipe::Student;
use spikeclip::train::checkpoint::named_vars;
use spikeclip::train::grads::Gradients;
use spikeclip::train::loss::cosine_distillation;

/// The tiny preset with a two-block transformer text tower.
fn config() -> SpikeClipConfig {
    let sets = ["text.kind=transformer", "text.depth=2"].map(String::from);
    SpikeClipConfig::preset("tiny")
        .unwrap()
        .with_overrides(&sets)
        .unwrap()
}

/// World-style rows: start 0, words, end 1 padded with 1.
fn ids(rows: &[Vec<u32>], len: usize) -> Tensor {
    let padded: Vec<u32> = rows
        .iter()
        .flat_map(|r| {
            let mut r = r.clone();
            r.resize(len, 1);
            r
        })
        .collect();
    Tensor::from_vec(padded, (rows.len(), len), &Device::Cpu).unwrap()
}

fn sample_ids(cfg: &SpikeClipConfig) -> Tensor {
    let rows: Vec<Vec<u32>> = (0..4u32)
        .map(|i| {
            (0..3 + i)
                .map(|j| 2 + (i * 7 + j * 13) % 900)
                .chain([1])
                .collect()
        })
        .map(|r: Vec<u32>| [0].into_iter().chain(r).collect())
        .collect();
    ids(&rows, cfg.text.context_length)
}

#[test]
fn features_have_the_output_shape_and_every_parameter_learns() {
    let cfg = config();
    let s = SpikeClip::new(&cfg, 1, &Device::Cpu).unwrap();
    let x = sample_ids(&cfg);
    assert_eq!(
        s.text_features(&x, false).unwrap().dims(),
        &[4, cfg.out_dim]
    );
    let target = Tensor::randn(0f32, 1.0, (4, cfg.out_dim), &Device::Cpu).unwrap();
    let loss = cosine_distillation(&s.text_features(&x, true).unwrap(), &target).unwrap();
    let grads = Gradients::backward(&loss, &s.grad_slots()).unwrap();
    let params = trainable(&s, "text.");
    assert!(
        params
            .iter()
            .any(|(n, _)| n == "text.block.1.attn.k_conv.weight"),
        "{:?}",
        params.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    spikeclip::train::guard::all_have_gradients(&grads, &params).unwrap();
}

/// A transformer whose attention fires at initialisation: at the default init q, k and v
/// hardly spike, `(q k^T) v` stays under the attention LIF's threshold and padding could not
/// leak anyway. One head (the widest dot products) and BatchNorm gains x10 make it fire.
fn firing_model() -> SpikeClip {
    let cfg = config()
        .with_overrides(&["text.num_heads=1".to_string()])
        .unwrap();
    let s = SpikeClip::new(&cfg, 2, &Device::Cpu).unwrap();
    for (name, var) in named_vars(s.varmap()) {
        if name.starts_with("text.block") && name.ends_with("_bn.weight") {
            var.set(&(var.as_tensor() * 10.0).unwrap()).unwrap();
        }
    }
    s
}

#[test]
fn padding_is_masked_but_real_tokens_count() {
    let s = firing_model();
    let len = s.config.text.context_length;
    let sentence = vec![0, 5, 9, 23, 17, 41, 1];
    let base = ids(std::slice::from_ref(&sentence), len);
    // Other ids where the padding was, the row still ending in the end token.
    let mut junk = sentence.clone();
    junk.extend((0..len - sentence.len() - 1).map(|i| 40 + i as u32 * 31));
    let junk = ids(&[junk], len);
    let mut other_word = sentence.clone();
    other_word[2] = 10;
    let other_word = ids(&[other_word], len);
    let f = |x: &Tensor| s.text_features(x, false).unwrap();
    let lifs = s.text.lif_layers();
    lifs.iter().for_each(|l| l.lif.monitor().enable());
    let with_junk = f(&junk);
    for l in lifs.iter().filter(|l| l.name.ends_with("attn_lif")) {
        let rate = l.lif.monitor().counts().firing_rate();
        assert!(
            rate > 0.01,
            "{} fires at {rate}: the test would be vacuous",
            l.name
        );
    }
    let masked = max_abs_diff(&f(&base), &with_junk);
    assert!(masked < 1e-6, "padding changed the features by {masked}");
    let real = max_abs_diff(&f(&base), &f(&other_word));
    assert!(
        real > 1e-3,
        "a real token changed the features by only {real}"
    );
}

#[test]
fn parameter_counts_match_the_varmap_and_the_layer_tables() {
    let mut paper = SpikeClipConfig::preset("paper").unwrap();
    paper.text.kind = TextEncoderKind::Transformer;
    let mean = config()
        .with_overrides(&["readout=mean".to_string()])
        .unwrap();
    for cfg in [
        config(),
        mean,
        paper,
        SpikeClipConfig::preset("tiny").unwrap(),
    ] {
        let s = SpikeClip::new(&cfg, 0, &Device::Cpu).unwrap();
        let count = |prefix: &str| -> usize {
            trainable(&s, prefix)
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum()
        };
        assert_eq!(count("text."), cfg.text_param_count(), "{:?}", cfg.text);
        assert_eq!(count("image."), cfg.image_param_count());
        assert_eq!(total(&s.text.layers()), cfg.text_param_count());
        assert_eq!(total(&s.image.layers(INPUT_SIDE)), cfg.image_param_count());
    }
}

#[test]
fn checkpoint_round_trip_keeps_the_transformer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let card = ModelCard {
        kind: ModelKind::SpikeClip,
        config: cfg.clone(),
        tokenizer: TokenizerSpec::World,
    };
    let original = SpikeClip::new(&cfg, 7, &Device::Cpu).unwrap();
    checkpoint::save(dir.path(), &original, &card).unwrap();
    let (loaded, loaded_card) = checkpoint::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(loaded_card.config.text.kind, TextEncoderKind::Transformer);
    let x = sample_ids(&cfg);
    let a = original.text_features(&x, false).unwrap();
    let b = loaded.text_features(&x, false).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
}

#[test]
fn energy_accounts_every_transformer_layer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let s = SpikeClip::new(&cfg, 3, &Device::Cpu).unwrap();
    let images = Tensor::randn(0f32, 1.5, (2, 3, INPUT_SIDE, INPUT_SIDE), &Device::Cpu).unwrap();
    let report = measure_energy(
        &s,
        &images,
        &sample_ids(&cfg),
        spikeclip::energy::EnergyConstants::fp32(),
        dir.path(),
    )
    .unwrap()
    .unwrap();
    let text = report.encoders.iter().find(|e| e.name == "text").unwrap();
    // Seven LIF layers per block: five in attention, two in the MLP.
    assert_eq!(text.firing_rates.len(), 7 * cfg.text.depth);
    assert!(text.snn.totals.sops > 0.0, "{:?}", text.snn.totals);
}

fn info(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .arg("info")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn info_prints_layer_tables_of_the_overridden_config_and_names_bad_keys() {
    let out = info(&["--preset", "tiny", "--set", "text.kind=transformer"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    common::assert_success(&out);
    let cfg = SpikeClipConfig::preset("tiny")
        .unwrap()
        .with_overrides(&["text.kind=transformer".to_string()])
        .unwrap();
    assert!(stdout.contains("spiking self-attention"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "text encoder parameters:  {}",
            cfg.text_param_count()
        )),
        "{stdout}"
    );
    let bad = info(&["--preset", "tiny", "--set", "text.knd=transformer"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown key \"text.knd\""));
}
