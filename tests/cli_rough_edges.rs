//! What a user meets at the command line: a missing checkpoint named as given, logs without
//! colour codes and with plain progress lines when stderr is not a terminal, and `bench`
//! measuring each case's memory on its own, and `--device` reported or refused with its reason.

mod common;

use std::process::{Command, Output};

fn spikeclip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_missing_checkpoint_is_named_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("runs").join("x");
    let missing = missing.to_str().unwrap();
    let image = dir.path().join("a.png");
    for args in [
        vec!["eval", "--checkpoint", missing],
        vec![
            "classify",
            "--checkpoint",
            missing,
            "--image",
            image.to_str().unwrap(),
        ],
        vec!["energy", "--checkpoint", missing],
        vec![
            "train", "--stage", "finetune", "--init", missing, "--out", missing,
        ],
    ] {
        let out = spikeclip(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("checkpoint {missing}: ")) && err.contains("does not exist"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("model.json"), "{args:?}: {err}");
    }
}

#[test]
fn redirected_logs_have_no_colour_codes_and_plain_progress_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let run = spikeclip(&[
        "train",
        "--stage",
        "distill-text",
        "--batch-size",
        "512",
        "--epochs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    common::assert_success(&run);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escape in a redirected log: {err:?}"
    );
    let line = err
        .lines()
        .find(|l| l.contains("distill_text 1/1: ") && l.contains("(done)"))
        .unwrap_or_else(|| panic!("no plain progress line: {err}"));
    assert!(line.contains("/s, ETA") && line.contains("loss "), "{line}");
}

#[test]
fn bench_cases_measure_their_own_peak_memory_in_child_processes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    // adam_step holds ~80 MiB of parameters and optimiser state; world_batch a few MiB. Run in
    // one process, world_batch would report adam_step's resident pages as its own peak.
    let run = spikeclip(&[
        "bench",
        "--case",
        "adam_step,world_batch",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    common::assert_success(&run);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rss = |case: &str| results[case]["peak_rss_mib"].as_f64().unwrap();
    let (adam, world) = (rss("adam_step"), rss("world_batch"));
    assert!(adam > 0.0 && world > 0.0, "{results}");
    assert!(
        world + 40.0 < adam,
        "adam_step {adam} MiB, world_batch {world} MiB"
    );
    // One header and one row a case, after the lines naming the CPU and the kernels' paths.
    let table = String::from_utf8_lossy(&run.stdout);
    let rows = table.lines().skip_while(|l| !l.starts_with("case "));
    assert_eq!(rows.count(), 3, "{table}");
}

/// `--device`: `info` says where it built the model; on a build without the `cuda` feature a
/// CUDA device is refused with the reason, before any work; a device name that is none is
/// refused with the forms that are.
#[test]
fn the_device_flag_is_reported_and_cuda_without_the_feature_says_so() {
    let out = spikeclip(&["--device", "cpu", "info", "--preset", "tiny"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("device: cpu, ops: fused"), "{text}");
    if !cfg!(feature = "cuda") {
        for device in ["cuda", "cuda:1"] {
            let out = spikeclip(&["--device", device, "info", "--preset", "tiny"]);
            assert!(!out.status.success(), "{device}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("lacks the `cuda` feature"), "{device}: {err}");
        }
    }
    let out = spikeclip(&["info", "--device", "gpu"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected cpu, cuda, cuda:N"), "{err}");
}
