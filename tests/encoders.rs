//! The encoders: shapes, gradients to every parameter, BatchNorm modes, parameter counts,
//! checkpoints.

use candle_core::{Device, Tensor};
use spikeclip::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use spikeclip::model::config::{ReadoutKind, SpikeClipConfig};
use spikeclip::model::{ScratchClip, SpikeClip};
use spikeclip::recipe::student::trainable;
use spikeclip::recipe::Student;
use spikeclip::train::checkpoint::named_vars;
use spikeclip::train::grads::Gradients;
use spikeclip::train::loss::cosine_distillation;

fn tiny() -> SpikeClipConfig {
    SpikeClipConfig::preset("tiny").unwrap()
}

fn inputs(cfg: &SpikeClipConfig, b: usize) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = (Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &dev).unwrap() * 1.5).unwrap();
    let ids: Vec<u32> = (0..b * cfg.text.context_length)
        .map(|i| (i * 37 % cfg.text.vocab_size) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, cfg.text.context_length), &dev).unwrap();
    (x, ids)
}

fn students(cfg: &SpikeClipConfig) -> Vec<(&'static str, Box<dyn Student>)> {
    vec![
        (
            "spikeclip",
            Box::new(SpikeClip::new(cfg, 1, &Device::Cpu).unwrap()),
        ),
        (
            "scratchclip",
            Box::new(ScratchClip::new(cfg, 1, &Device::Cpu).unwrap()),
        ),
    ]
}

#[test]
fn features_have_the_output_shape() {
    let cfg = tiny();
    let (x, ids) = inputs(&cfg, 3);
    for (name, s) in students(&cfg) {
        assert_eq!(
            s.image_features(&x, true).unwrap().dims(),
            &[3, 512],
            "{name}"
        );
        assert_eq!(
            s.image_features(&x, false).unwrap().dims(),
            &[3, 512],
            "{name}"
        );
        assert_eq!(
            s.text_features(&ids, false).unwrap().dims(),
            &[3, 512],
            "{name}"
        );
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let cfg = tiny();
    let (x, ids) = inputs(&cfg, 4);
    let target = Tensor::randn(0f32, 1.0, (4, 512), &Device::Cpu).unwrap();
    for (name, s) in students(&cfg) {
        let loss = (cosine_distillation(&s.image_features(&x, true).unwrap(), &target).unwrap()
            + cosine_distillation(&s.text_features(&ids, true).unwrap(), &target).unwrap())
        .unwrap();
        let grads = Gradients::backward(&loss, &s.grad_slots()).unwrap();
        let mut params = trainable(s.as_ref(), "image.");
        params.extend(trainable(s.as_ref(), "text."));
        assert!(params.len() > 10, "{name}");
        spikeclip::train::guard::all_have_gradients(&grads, &params)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
}

#[test]
fn readout_variants_all_run_and_only_tdw_learns() {
    for kind in [
        ReadoutKind::Tdw,
        ReadoutKind::Mean,
        ReadoutKind::Ad,
        ReadoutKind::Ar,
    ] {
        let cfg = SpikeClipConfig {
            readout: kind,
            ..tiny()
        };
        let s = SpikeClip::new(&cfg, 2, &Device::Cpu).unwrap();
        let (x, ids) = inputs(&cfg, 2);
        assert_eq!(s.image_features(&x, false).unwrap().dims(), &[2, 512]);
        assert_eq!(s.text_features(&ids, false).unwrap().dims(), &[2, 512]);
        let has_tdw = named_vars(s.varmap())
            .iter()
            .any(|(n, _)| n.ends_with("weights_tensor"));
        assert_eq!(has_tdw, kind == ReadoutKind::Tdw);
    }
}

#[test]
fn batch_norm_train_mode_updates_running_statistics_and_eval_mode_uses_them() {
    let cfg = tiny();
    let s = SpikeClip::new(&cfg, 3, &Device::Cpu).unwrap();
    let (x, _) = inputs(&cfg, 4);
    let running = |s: &SpikeClip| -> Vec<f32> {
        named_vars(s.varmap())
            .into_iter()
            .find(|(n, _)| n == "image.patch_embed.block0_bn.running_mean")
            .unwrap()
            .1
            .as_tensor()
            .to_vec1()
            .unwrap()
    };
    let before = running(&s);
    let eval1 = s
        .image_features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(
        running(&s),
        before,
        "eval mode must not touch running statistics"
    );
    s.image_features(&x, true).unwrap();
    assert_ne!(running(&s), before, "train mode updates running statistics");
    let eval2 = s
        .image_features(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(eval1, eval2, "eval output follows the running statistics");
    // Eval mode is per-sample: a sample's feature does not depend on its batch mates.
    let one = s
        .image_features(&x.narrow(0, 0, 1).unwrap(), false)
        .unwrap();
    let diff = (one
        - s.image_features(&x, false)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn paper_model_has_the_papers_parameter_counts() {
    let cfg = SpikeClipConfig::preset("paper").unwrap();
    let s = SpikeClip::new(&cfg, 0, &Device::Cpu).unwrap();
    let count = |prefix: &str| -> usize {
        trainable(&s, prefix)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    };
    assert_eq!(count("image."), 9_513_396);
    assert_eq!(count("text."), 47_358_980);
    assert_eq!(count("image."), cfg.image_param_count());
}

#[test]
fn checkpoint_round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let (x, ids) = inputs(&cfg, 2);
    for kind in [ModelKind::SpikeClip, ModelKind::ScratchClip] {
        let card = ModelCard {
            kind,
            config: cfg.clone(),
            tokenizer: TokenizerSpec::World,
        };
        let original: Box<dyn Student> = match kind {
            ModelKind::SpikeClip => Box::new(SpikeClip::new(&cfg, 7, &Device::Cpu).unwrap()),
            ModelKind::ScratchClip => Box::new(ScratchClip::new(&cfg, 7, &Device::Cpu).unwrap()),
        };
        let sub = dir.path().join(format!("{kind:?}"));
        checkpoint::save(&sub, original.as_ref(), &card).unwrap();
        let (loaded, loaded_card) = checkpoint::load(&sub, &Device::Cpu).unwrap();
        assert_eq!(loaded_card, card);
        let a = original.image_features(&x, false).unwrap();
        let b = loaded.image_features(&x, false).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        let a = original.text_features(&ids, false).unwrap();
        let b = loaded.text_features(&ids, false).unwrap();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }
}

#[test]
fn a_checkpoint_of_another_config_lists_every_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let s = SpikeClip::new(&cfg, 0, &Device::Cpu).unwrap();
    let card = ModelCard {
        kind: ModelKind::SpikeClip,
        config: cfg.clone(),
        tokenizer: TokenizerSpec::World,
    };
    checkpoint::save(dir.path(), &s, &card).unwrap();
    let mut other = cfg.clone();
    other.text.hidden = 128;
    other.image.depth = 2;
    let wider = SpikeClip::new(&other, 0, &Device::Cpu).unwrap();
    let err = checkpoint::load_weights(&wider, &dir.path().join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("text.fc1.weight"), "{err}");
    assert!(err.contains("missing image.block.1"), "{err}");
    // A missing card is an error naming the file.
    let lone = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("model.safetensors"),
        lone.path().join("w.safetensors"),
    )
    .unwrap();
    let err = checkpoint::load(&lone.path().join("w.safetensors"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.json"), "{err}");
}
