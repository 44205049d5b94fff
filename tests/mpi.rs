//! Data-parallel training over MPI (`cargo test --features mpi --test mpi`, with Open MPI's
//! `mpirun` on PATH): two ranks train as one process does on the same global batch, a killed
//! rank ends the job, and a killed job resumes to the same bytes.
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_spikeclip");

/// Open MPI as root, one compute thread per process, every step's loss logged.
fn environment(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "warn,spikeclip::steps=debug")
}

/// `spikeclip ARGS` alone (`ranks` 0) or as `mpirun -np RANKS`.
fn command(ranks: usize, args: &[&str]) -> Command {
    let mut cmd = if ranks == 0 {
        Command::new(BIN)
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "-np",
            &ranks.to_string(),
            "--oversubscribe",
            "--bind-to",
            "none",
            BIN,
        ]);
        c
    };
    environment(cmd.args(args));
    cmd
}

fn run(ranks: usize, args: &[&str]) -> Output {
    let out = command(ranks, args).output().expect("running spikeclip");
    common::assert_success(&out);
    out
}

/// The loss of every step, from the log.
fn step_losses(out: &Output) -> Vec<f64> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.split_once(" loss ").filter(|_| l.contains(" step ")))
        .map(|(_, loss)| loss.trim().parse().unwrap())
        .collect()
}

fn weights(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A short stage on the built-in world: 96 items in global batches of 32, two epochs.
fn stage_args<'a>(stage: &'a str, out: &'a str, init: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--stage",
        stage,
        "--items",
        "96",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--out",
        out,
    ];
    match init {
        Some(init) => args.extend(["--init", init]),
        None => args.extend(["--preset", "tiny"]),
    }
    args
}

/// Each stage from the same start, alone and on two ranks: the same loss at every step and
/// the same weights at the end (each stage starts from the single process's previous result,
/// so the checkpoints of one are read by the other).
#[test]
fn two_ranks_with_synchronised_batch_norm_train_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut init: Option<String> = None;
    for stage in ["distill-text", "distill-image", "finetune"] {
        let (one, two) = (
            dir.path().join(format!("{stage}-1")),
            dir.path().join(format!("{stage}-2")),
        );
        let (one, two) = (one.to_str().unwrap(), two.to_str().unwrap());
        let alone = run(0, &stage_args(stage, one, init.as_deref()));
        let pair = run(2, &stage_args(stage, two, init.as_deref()));
        let (a, b) = (step_losses(&alone), step_losses(&pair));
        assert_eq!(
            a.len(),
            6,
            "{stage}: {}",
            String::from_utf8_lossy(&alone.stderr)
        );
        assert_eq!(b.len(), 6, "{stage}: rank 0 alone logs its steps");
        for (step, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "{stage} step {step}: loss {a} alone, {b} on two ranks"
            );
        }
        let (a, b) = (
            weights(&Path::new(one).join("model.safetensors")),
            weights(&Path::new(two).join("model.safetensors")),
        );
        assert_eq!(a.len(), b.len());
        for (name, w) in &a {
            let diff = common::max_abs_diff(w, &b[name]);
            assert!(diff <= 1e-5, "{stage}: {name} differs by {diff}");
        }
        init = Some(one.to_string());
    }
}

/// The process of `rank` among those `mpirun` started, once it is running.
fn rank_pid(rank: usize) -> u32 {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let exe = std::fs::read_link(entry.path().join("exe")).ok();
            let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let ours = exe.is_some_and(|e| e == Path::new(BIN));
            if ours && env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("rank {rank} never started")
}

/// Rank 1 killed during the second epoch ends the job within 30 s, non-zero, naming the rank;
/// resumed on two ranks, the job ends in the same checkpoint, byte for byte, as a run that was
/// never interrupted.
#[test]
fn a_killed_rank_ends_the_job_and_the_job_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, cut) = (dir.path().join("whole"), dir.path().join("cut"));
    let args = |out: &Path| -> Vec<String> {
        let out = out.to_str().unwrap().to_string();
        [
            "train",
            "--stage",
            "distill-image",
            "--preset",
            "tiny",
            "--items",
            "192",
        ]
        .into_iter()
        .map(String::from)
        .chain(["--batch-size", "16", "--epochs", "3", "--out"].map(String::from))
        .chain([out])
        .collect()
    };
    let whole_args = args(&whole);
    run(
        2,
        &whole_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    let cut_args = args(&cut);
    let cut_args: Vec<&str> = cut_args.iter().map(String::as_str).collect();
    let job = command(2, &cut_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let victim = rank_pid(1);
    let first = cut.join("distill_image_last.safetensors");
    let start = Instant::now();
    while !first.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint after the first epoch"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let killed_at = Instant::now();
    let out = job.wait_with_output().unwrap();
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "the job outlived its rank by 30 s"
    );
    assert!(!out.status.success(), "the job succeeded without rank 1");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("rank 1"), "no message names rank 1: {said}");

    let resumed: Vec<&str> = cut_args.iter().copied().chain(["--resume"]).collect();
    let out = run(2, &resumed);
    assert!(step_losses(&out).len() < 36, "the resumed run started over");
    let last = |d: &Path| std::fs::read(d.join("distill_image_last.safetensors")).unwrap();
    assert!(
        last(&whole) == last(&cut),
        "the resumed checkpoint differs from the uninterrupted one"
    );
}

/// Ranks started with different arguments are stopped at once, with a message naming the
/// rank that differs.
#[test]
fn ranks_with_different_arguments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let mut cmd = Command::new("mpirun");
    let text = ["train", "--stage", "distill-text", "--out", out, "--epochs"];
    environment(&mut cmd)
        .args(["--oversubscribe", "-np", "1", BIN])
        .args(text)
        .args(["1", ":", "-np", "1", BIN])
        .args(text)
        .arg("2");
    let start = Instant::now();
    let res = cmd.output().unwrap();
    assert!(!res.status.success());
    assert!(start.elapsed() < Duration::from_secs(30));
    let said = String::from_utf8_lossy(&res.stderr);
    assert!(
        said.contains("the command line differs between ranks") && said.contains("rank 1 "),
        "{said}"
    );
}
