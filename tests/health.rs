//! The demo's health log: one line per epoch of every stage with what it promises, written
//! without changing the training it watches.

use candle_core::Device;
use spikeclip::recipe::demo::{train_and_save, DemoConfig};
use spikeclip::recipe::health::HealthRecord;
use spikeclip::recipe::world_recipe::{Arch, WorldRecipe};
use spikeclip::train::checkpoint::named_vars;

/// The quick demo cut to seconds: a few dozen images, one epoch per stage.
fn tiny(health: bool) -> DemoConfig {
    let sets = [
        "world.train_images=48",
        "world.test_images=24",
        "world.dtext_sentences=64",
        "pretrain.epochs=1",
        "finetune.epochs=1",
        "pretrain.batch_size=16",
        "finetune.batch_size=16",
    ];
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    DemoConfig {
        health,
        ..DemoConfig::quick(3).with_overrides(&sets).unwrap()
    }
}

fn weights(recipe: &WorldRecipe, arch: Arch) -> (Vec<(String, Vec<f32>)>, std::path::PathBuf) {
    let (student, _) = train_and_save(recipe, arch, "student").unwrap();
    let values = named_vars(student.varmap())
        .into_iter()
        .map(|(name, var)| {
            let v = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (name, v)
        })
        .collect();
    (values, recipe.out.join("student").join("health.jsonl"))
}

fn records(path: &std::path::Path) -> Vec<HealthRecord> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn health_log_watches_every_stage_without_changing_the_training() {
    for arch in [Arch::spiking(&tiny(false).model), Arch::Ann] {
        let (plain_dir, health_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let plain = WorldRecipe::new(tiny(false), plain_dir.path(), false, &Device::Cpu);
        let watched = WorldRecipe::new(tiny(true), health_dir.path(), false, &Device::Cpu);
        let (a, no_log) = weights(&plain, arch);
        let (b, log) = weights(&watched, arch);
        assert!(!no_log.exists(), "a run without --health writes no log");
        assert_eq!(a, b, "{arch:?}: the health probe changed the training");

        let rows = records(&log);
        let stages: Vec<&str> = rows.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(stages, ["distill_text", "distill_image", "finetune"]);
        for r in &rows {
            for top1 in [
                r.val_seen_top1,
                r.val_unseen_top1,
                r.image_side.unseen,
                r.text_side.seen,
            ] {
                assert!((0.0..=1.0).contains(&top1), "{top1}");
            }
            // Every parameter the stage trains has a gradient, and only those.
            let prefix = if r.stage == "distill_text" {
                "text."
            } else {
                "image."
            };
            assert!(!r.gradients.is_empty());
            for g in &r.gradients {
                assert!(g.param.starts_with(prefix), "{}: {}", r.stage, g.param);
                assert!(g.grad_rms.is_finite() && g.weight_rms > 0.0, "{g:?}");
            }
            assert!(r.gradients.iter().any(|g| g.grad_rms > 0.0));
        }
        let image_bn = &rows[1].batch_norm;
        match arch {
            Arch::Spiking { .. } => {
                // 4 tokenizer LIFs, 5 in the attention, 2 in the MLP, 2 in the text encoder.
                assert_eq!(rows[0].firing.len(), 13);
                for f in &rows[1].firing {
                    assert!((0.0..=1.0).contains(&f.rate), "{f:?}");
                    assert_eq!(f.per_step.len(), 4, "{f:?}");
                }
                assert!(rows[1].firing.iter().any(|f| f.rate > 0.0));
                // The image TDW starts where the paper starts it and moves only once trained.
                let image_tdw = |r: &HealthRecord| {
                    r.tdw
                        .iter()
                        .find(|t| t.param == "image.weights_tensor")
                        .unwrap()
                        .moved
                };
                assert_eq!(image_tdw(&rows[0]), 0.0);
                assert!(image_tdw(&rows[1]) > 0.0);
                // Image distillation trained BatchNorm: its running statistics left 0 and 1.
                assert!(image_bn.iter().any(|b| b.running_mean != 0.0));
                assert_eq!(image_bn.len(), 5 + 6);
            }
            Arch::Ann => {
                assert!(rows.iter().all(|r| r.firing.is_empty()));
            }
        }
    }
}
