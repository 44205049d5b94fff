//! `spikeclip train`: a stage on the built-in world, resumed, ending in a checkpoint.

mod common;

use std::process::Command;

fn train(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args([
            "train",
            "--stage",
            "distill-text",
            "--batch-size",
            "512",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_stage_runs_resumes_and_leaves_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let first = train(dir.path(), &["--epochs", "1"]);
    common::assert_success(&first);
    let resumed = train(dir.path(), &["--epochs", "2", "--resume"]);
    common::assert_success(&resumed);
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, [1, 2]);
    assert!(dir.path().join("model.safetensors").exists());
    assert!(dir.path().join("model.json").exists());
    let bad = Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args([
            "train",
            "--stage",
            "finetune",
            "--data",
            "cache:/nowhere",
            "--init",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--prompt-set"));
}

#[test]
fn overrides_shape_a_fresh_model_and_are_refused_with_init() {
    let dir = tempfile::tempdir().unwrap();
    // Zero epochs: the fresh model is built and saved, nothing is trained.
    let sets = ["--set", "text.kind=transformer", "--set", "text.depth=1"];
    let fresh = train(dir.path(), &[&["--epochs", "0"][..], &sets].concat());
    common::assert_success(&fresh);
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.json")).unwrap())
            .unwrap();
    assert_eq!(card["config"]["text"]["kind"], "transformer");
    let init = dir.path().join("model.safetensors");
    let again = train(
        &dir.path().join("again"),
        &[
            "--epochs",
            "1",
            "--init",
            init.to_str().unwrap(),
            "--set",
            "readout=mean",
        ],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr)
        .contains("--set and --embeddings-from build a fresh model"));
}
