//! A checkpoint whose text encoder never fires: every class embedding is the same vector and
//! every logit ties. `eval` must score it as argmax does (the first class wins every tie) and
//! warn, naming the encoder and the layer, and `classify` must warn and flag the tie.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;
use spikeclip::data::world::{Split, World, WorldConfig};
use spikeclip::data::ImageFeatureSet;
use spikeclip::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use spikeclip::model::SpikeClip;
use spikeclip::recipe::demo::DemoConfig;
use spikeclip::recipe::Student;

/// A fresh world-sized SpikeCLIP saved to `dir`. With `dead_text`, its token and position
/// tables are zero, so the text encoder's first LIF layer gets no input and never fires;
/// otherwise its first text layer's weights are scaled up so that the second LIF layer fires
/// too (at a fresh model's scale it does not, and all class embeddings are equal).
fn save_student(dir: &Path, dead_text: bool) {
    let config = DemoConfig::quick(0).model;
    let student = SpikeClip::new(&config, 3, &Device::Cpu).unwrap();
    for (name, var) in student.varmap().data().lock().unwrap().iter() {
        if dead_text && name.starts_with("text.clip_embedding.") {
            var.set(&var.zeros_like().unwrap()).unwrap();
        } else if !dead_text && name == "text.fc1.weight" {
            var.set(&(var.as_tensor() * 10.0).unwrap()).unwrap();
        }
    }
    let card = ModelCard {
        kind: ModelKind::SpikeClip,
        config,
        tokenizer: TokenizerSpec::World,
    };
    checkpoint::save(dir, &student, &card).unwrap();
}

fn spikeclip(args: &[&str], checkpoint: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(args)
        .arg("--checkpoint")
        .arg(checkpoint)
        .output()
        .unwrap();
    common::assert_success(&out);
    out
}

/// Top-1 of `eval --json` rows by set name.
fn top1(rows: &serde_json::Value, set: &str) -> f64 {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["set"] == set)
        .unwrap_or_else(|| panic!("no row {set} in {rows}"))["top1"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_dead_text_encoder_scores_what_argmax_gives_and_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("dead");
    save_student(&ckpt, true);
    let json = dir.path().join("eval.json");
    let eval = spikeclip(&["eval", "--json", json.to_str().unwrap()], &ckpt);
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // Every logit ties, so every image is given class 0, as torch's argmax would give it.
    let world = World::new(WorldConfig::default());
    for (name, split) in [("seen", Split::TestSeen), ("unseen", Split::TestUnseen)] {
        let set = world.images(split);
        let all: Vec<usize> = (0..set.len()).collect();
        let labels = set.batch(&all, &Device::Cpu).unwrap().labels;
        let zeros = labels.iter().filter(|&&l| l == 0).count();
        let expected = zeros as f64 / labels.len() as f64;
        let got = top1(&rows, &format!("student {name}"));
        assert!(got < 0.5, "student {name}: {got}");
        assert!(
            (got - expected).abs() < 1e-12,
            "student {name}: {got} vs {expected}"
        );
    }
    let stderr = String::from_utf8_lossy(&eval.stderr);
    assert!(
        stderr.contains("the text encoder's first LIF layer lif1 fired 0 %"),
        "{stderr}"
    );
    assert!(
        stderr.contains("class embeddings are the same vector"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("image encoder's first LIF"),
        "the image encoder fires: {stderr}"
    );

    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    world
        .sample(Split::TestSeen, 0)
        .rgb_image()
        .save(images.join("0.png"))
        .unwrap();
    let classify = spikeclip(
        &[
            "classify",
            "--top",
            "2",
            "--image",
            images.to_str().unwrap(),
        ],
        &ckpt,
    );
    let stdout = String::from_utf8_lossy(&classify.stdout);
    let first = &World::class_names()[0];
    assert!(
        stdout.contains(&format!("%  {first}\n")) && stdout.contains("24 of 24 labels tie"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&classify.stderr);
    assert!(
        stderr.contains("text encoder's first LIF layer lif1"),
        "{stderr}"
    );
}

#[test]
fn a_live_checkpoint_is_not_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    save_student(dir.path(), false);
    let eval = spikeclip(&["eval"], dir.path());
    let stderr = String::from_utf8_lossy(&eval.stderr);
    assert!(!stderr.contains("WARN"), "{stderr}");
}
