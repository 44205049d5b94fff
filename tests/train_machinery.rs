//! The training machinery against PyTorch (fixtures from scripts/optim_fixtures.py) and its
//! crash/resume guarantees.

mod common;
use common::max_abs_diff;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use spikeclip::train::checkpoint::{self, write_atomic_with, TrainState};
use spikeclip::train::grads::Gradients;
use spikeclip::train::optim::{Adam, AdamConfig};
use spikeclip::train::rng::Rng;
use spikeclip::train::schedule::CosineAnnealing;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

struct TorchAdam {
    tensors: HashMap<String, Tensor>,
    cfg: AdamConfig,
    steps: usize,
}

fn torch_adam() -> TorchAdam {
    let tensors =
        candle_core::safetensors::load(fixture("optim_torch.safetensors"), &Device::Cpu).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cosine_torch.json")).unwrap())
            .unwrap();
    let a = &json["adam"];
    let cfg = AdamConfig {
        lr: a["lr"].as_f64().unwrap(),
        beta1: a["beta1"].as_f64().unwrap(),
        beta2: a["beta2"].as_f64().unwrap(),
        eps: a["eps"].as_f64().unwrap(),
        weight_decay: a["weight_decay"].as_f64().unwrap(),
        amsgrad: false,
    };
    TorchAdam {
        tensors,
        cfg,
        steps: a["steps"].as_u64().unwrap() as usize,
    }
}

const NAMES: [&str; 2] = ["a", "b"];

fn params(t: &TorchAdam) -> Vec<(String, Var)> {
    NAMES
        .iter()
        .map(|n| {
            (
                n.to_string(),
                Var::from_tensor(&t.tensors[&format!("init.{n}")]).unwrap(),
            )
        })
        .collect()
}

fn grads_for(t: &TorchAdam, params: &[(String, Var)], step: usize) -> Gradients {
    // A GradStore can only be made by backward: d/dp sum(p * g) = g.
    let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (name, var) in params {
        let g = &t.tensors[&format!("grad.{step}.{name}")];
        loss = (loss + (var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    Gradients::backward(&loss, &[]).unwrap()
}

#[test]
fn adam_matches_torch_with_and_without_amsgrad() {
    let t = torch_adam();
    for amsgrad in [false, true] {
        let ps = params(&t);
        let mut opt = Adam::new(
            ps.clone(),
            AdamConfig {
                amsgrad,
                ..t.cfg.clone()
            },
        );
        for step in 0..t.steps {
            opt.step(&grads_for(&t, &ps, step)).unwrap();
            for (name, var) in &ps {
                let want = &t.tensors[&format!("amsgrad{}.{step}.{name}", amsgrad as u8)];
                let d = max_abs_diff(var.as_tensor(), want);
                assert!(
                    d < 2e-6,
                    "amsgrad={amsgrad} step {step} {name}: max diff {d}"
                );
            }
        }
    }
}

#[test]
fn adam_first_step_matches_hand_computation() {
    // Step 1: m = (1-b1) g, v = (1-b2) g^2, bias-corrected update = lr * g / (|g| + eps).
    let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
    let cfg = AdamConfig {
        lr: 0.1,
        ..Default::default()
    };
    let mut opt = Adam::new(vec![("p".into(), p.clone())], cfg);
    let loss = (p.as_tensor() * &Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    opt.step(&Gradients::backward(&loss, &[]).unwrap()).unwrap();
    let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
    let want = [
        1.0 - 0.1 * 0.5 / (0.5 + 1e-8),
        -2.0 + 0.1 * 3.0 / (3.0 + 1e-8),
    ];
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
}

#[test]
fn cosine_schedule_matches_torch() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cosine_torch.json")).unwrap())
            .unwrap();
    for case in json["cosine"].as_array().unwrap() {
        let sched = CosineAnnealing {
            base_lr: case["base_lr"].as_f64().unwrap(),
            t_max: case["t_max"].as_u64().unwrap() as usize,
            eta_min: case["eta_min"].as_f64().unwrap(),
        };
        for (epoch, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let (got, want) = (sched.lr_at(epoch), want.as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-12 * want.max(1.0) + 1e-15,
                "epoch {epoch}: {got} vs {want}"
            );
        }
    }
}

fn bits(ps: &[(String, Var)]) -> Vec<Vec<u32>> {
    ps.iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

#[test]
fn optimiser_state_round_trip_gives_bit_identical_next_steps() {
    let t = torch_adam();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let ps = params(&t);
    let mut opt = Adam::new(
        ps.clone(),
        AdamConfig {
            amsgrad: true,
            ..t.cfg.clone()
        },
    );
    for step in 0..3 {
        opt.step(&grads_for(&t, &ps, step)).unwrap();
    }
    opt.save(&path).unwrap();
    // A fresh optimiser over copies of the same weights, state loaded from disk.
    let copies: Vec<(String, Var)> = ps
        .iter()
        .map(|(n, v)| (n.clone(), Var::from_tensor(v.as_tensor()).unwrap()))
        .collect();
    let mut resumed = Adam::new(
        copies.clone(),
        AdamConfig {
            amsgrad: true,
            ..t.cfg.clone()
        },
    );
    resumed.load(&path).unwrap();
    for step in 3..t.steps {
        opt.step(&grads_for(&t, &ps, step)).unwrap();
        resumed.step(&grads_for(&t, &copies, step)).unwrap();
        assert_eq!(bits(&ps), bits(&copies), "step {step}");
    }
    // Without AMSGrad the saved state has an extra `vmax`: refused, naming the file.
    let mut plain = Adam::new(copies, t.cfg.clone());
    let err = format!("{:#}", plain.load(&path).unwrap_err());
    assert!(
        err.contains("optim.safetensors") && err.contains("vmax"),
        "{err}"
    );
}

#[test]
fn failed_atomic_write_leaves_the_old_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.bin");
    write_atomic_with(&path, |tmp| Ok(std::fs::write(tmp, b"old")?)).unwrap();
    let err = write_atomic_with(&path, |tmp| {
        std::fs::write(tmp, b"half-writ")?;
        anyhow::bail!("killed before rename")
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("ckpt.bin"));
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temporary file removed");
}

fn model(shape: (usize, usize)) -> VarMap {
    let vm = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, candle_core::DType::F32, &Device::Cpu);
    candle_nn::linear(shape.0, shape.1, vb.pp("fc")).unwrap();
    vm
}

fn train_steps(vm: &VarMap, opt: &mut Adam, steps: std::ops::Range<u64>) {
    let x = Tensor::new(&[[1f32, -0.5, 0.25]], &Device::Cpu).unwrap();
    let vars = checkpoint::named_vars(vm);
    for step in steps {
        let w = vars
            .iter()
            .find(|(n, _)| n == "fc.weight")
            .unwrap()
            .1
            .as_tensor();
        let loss = (x.matmul(&w.t().unwrap()).unwrap() - step as f64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step(&Gradients::backward(&loss, &[]).unwrap()).unwrap();
    }
}

#[test]
fn checkpoint_resume_is_bit_identical_and_rejects_another_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("last.safetensors");
    let vm = model((3, 2));
    let mut opt = Adam::new(checkpoint::named_vars(&vm), AdamConfig::default());
    train_steps(&vm, &mut opt, 0..4);
    let mut rng = Rng::new(5);
    rng.next_u64();
    let state = TrainState {
        epoch: 1,
        step: 4,
        best_metric: Some(0.5),
        rng,
    };
    checkpoint::save(&path, &vm, &opt, &state).unwrap();
    let saved = bits(&checkpoint::named_vars(&vm));
    train_steps(&vm, &mut opt, 4..8);

    let resumed = model((3, 2));
    let mut opt2 = Adam::new(checkpoint::named_vars(&resumed), AdamConfig::default());
    assert_eq!(checkpoint::load(&path, &resumed, &mut opt2).unwrap(), state);
    train_steps(&resumed, &mut opt2, 4..8);
    let weights_only = model((3, 2));
    assert_eq!(
        checkpoint::load_weights(&path, &weights_only).unwrap().step,
        4
    );
    assert_eq!(bits(&checkpoint::named_vars(&weights_only)), saved);
    assert!(checkpoint::load_weights(&path, &model((4, 2))).is_err());
    assert_eq!(
        bits(&checkpoint::named_vars(&vm)),
        bits(&checkpoint::named_vars(&resumed))
    );

    let other = model((4, 2));
    let mut opt3 = Adam::new(checkpoint::named_vars(&other), AdamConfig::default());
    let err = format!(
        "{:#}",
        checkpoint::load(&path, &other, &mut opt3).unwrap_err()
    );
    assert!(
        err.contains("last.safetensors") && err.contains("fc.weight") && err.contains("shape"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("trunc.safetensors"),
        &std::fs::read(&path).unwrap()[..100],
    )
    .unwrap();
    let err =
        checkpoint::load(&dir.path().join("trunc.safetensors"), &resumed, &mut opt2).unwrap_err();
    assert!(format!("{err:#}").contains("trunc.safetensors"), "{err:#}");
    assert!(
        checkpoint::load(Path::new("/nonexistent/x.safetensors"), &resumed, &mut opt2).is_err()
    );
}

/// A small distillation run on the built-in world with every piece of the machinery: seeded
/// shuffles, cosine schedule, guards, AMSGrad, checkpoint per epoch. Returns the final
/// weights' bits and the per-epoch mean losses.
fn distill_run(
    dir: &Path,
    epochs: std::ops::Range<usize>,
    resume: bool,
) -> (Vec<Vec<u32>>, Vec<f64>) {
    use spikeclip::data::world::{Split, World, WorldConfig};
    use spikeclip::data::ImageFeatureSet;
    use spikeclip::train::{epoch::run_epoch, guard, loss::cosine_distillation};

    let dev = Device::Cpu;
    let world = World::new(WorldConfig {
        seed: 9,
        train_images: 96,
        embed_dim: 32,
        ..Default::default()
    });
    let images = world.images(Split::Train);
    let vm = VarMap::new();
    let vb = spikeclip::train::init::seeded_var_builder(&vm, 1, candle_core::DType::F32, &dev);
    let probe = candle_nn::linear(48, 32, vb.pp("probe")).unwrap();
    let params = checkpoint::named_vars(&vm);
    let mut opt = Adam::new(
        params.clone(),
        AdamConfig {
            lr: 0.05,
            amsgrad: true,
            ..Default::default()
        },
    );
    let sched = CosineAnnealing {
        base_lr: 0.05,
        t_max: 4,
        eta_min: 0.005,
    };
    let path = dir.join("last.safetensors");
    let mut state = if resume {
        checkpoint::load(&path, &vm, &mut opt).unwrap()
    } else {
        TrainState {
            epoch: 0,
            step: 0,
            best_metric: None,
            rng: Rng::new(42),
        }
    };
    assert_eq!(state.epoch, epochs.start);
    let mut losses = Vec::new();
    for epoch in epochs {
        opt.set_lr(sched.lr_at(epoch));
        let summary = run_epoch(images.len(), 16, &mut state.rng, "distill", false, |idx| {
            let batch = images.batch(idx, &dev)?;
            // 8x8 average pooling to 3x4x4 = 48 inputs.
            let x = batch.inputs.avg_pool2d(8)?.flatten_from(1)?;
            let loss =
                cosine_distillation(&candle_nn::Module::forward(&probe, &x)?, &batch.teacher)?;
            let value = guard::finite_loss(&loss, state.step)?;
            let grads = Gradients::backward(&loss, &[])?;
            guard::all_have_gradients(&grads, &params)?;
            opt.step(&grads)?;
            state.step += 1;
            Ok(value)
        })
        .unwrap();
        state.epoch = epoch + 1;
        losses.push(summary.mean_loss);
        checkpoint::save(&path, &vm, &opt, &state).unwrap();
    }
    (bits(&params), losses)
}

#[test]
fn interrupted_run_resumes_bit_identically_and_loss_falls() {
    let straight = tempfile::tempdir().unwrap();
    let (want, losses) = distill_run(straight.path(), 0..4, false);
    assert!(
        losses[3] < losses[0] * 0.9,
        "distillation loss should fall: {losses:?}"
    );
    let split = tempfile::tempdir().unwrap();
    distill_run(split.path(), 0..2, false);
    let (got, resumed_losses) = distill_run(split.path(), 2..4, true);
    assert_eq!(got, want);
    assert_eq!(resumed_losses, losses[2..]);
}
