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

/// A short stage on the built-in world: the first `items` items in global batches of 32.
fn stage_args<'a>(
    stage: &'a str,
    items: &'a str,
    epochs: &'a str,
    out: &'a str,
    init: Option<&'a str>,
) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--stage",
        stage,
        "--items",
        items,
        "--batch-size",
        "32",
        "--epochs",
        epochs,
        "--out",
        out,
    ];
    match init {
        Some(init) => args.extend(["--init", init]),
        None => args.extend(["--preset", "tiny"]),
    }
    args
}

const STAGES: [&str; 3] = ["distill-text", "distill-image", "finetune"];

/// The stage's checkpoint file in `dir`.
fn last(dir: &Path, stage: &str) -> std::path::PathBuf {
    dir.join(format!("{}_last.safetensors", stage.replace('-', "_")))
}

/// The largest difference of Adam's first moments (a tenth of the first step's gradients) in
/// two checkpoints relative to the moment's scale, and the largest difference of BatchNorm's
/// running statistics. Moments below 1e-4 of the model's largest are rounding noise and left
/// out: a bias followed by BatchNorm has an exact gradient of zero.
fn gradient_and_statistics_gaps(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
) -> (f32, f32) {
    let scale = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let moments: Vec<&String> = a.keys().filter(|k| k.ends_with(".m")).collect();
    let largest = moments.iter().map(|k| scale(&a[*k])).fold(0f32, f32::max);
    let gradients = moments
        .iter()
        .filter(|k| scale(&a[**k]) >= 1e-4 * largest)
        .map(|k| common::max_abs_diff(&a[*k], &b[*k]) / scale(&a[*k]))
        .fold(0f32, f32::max);
    let statistics = a
        .keys()
        .filter(|k| k.contains("running_"))
        .map(|k| common::max_abs_diff(&a[k], &b[k]))
        .fold(0f32, f32::max);
    (gradients, statistics)
}

/// One step of each stage on a global batch of 32, alone and on two ranks: the same loss,
/// the same gradients (Adam's first moments) and the same running statistics; without
/// synchronised BatchNorm the image stage's gradients and statistics are another batch's.
#[test]
fn one_step_on_two_ranks_has_the_loss_and_gradients_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    let init_s = init.to_str().unwrap();
    run(0, &stage_args("distill-text", "32", "0", init_s, None));
    for stage in STAGES {
        let (one, two) = (
            dir.path().join(format!("{stage}-1")),
            dir.path().join(format!("{stage}-2")),
        );
        let alone = run(
            0,
            &stage_args(stage, "32", "1", one.to_str().unwrap(), Some(init_s)),
        );
        let pair = run(
            2,
            &stage_args(stage, "32", "1", two.to_str().unwrap(), Some(init_s)),
        );
        let (a, b) = (step_losses(&alone), step_losses(&pair));
        assert_eq!(
            (a.len(), b.len()),
            (1, 1),
            "{stage}: one step each, logged by rank 0 alone"
        );
        assert!(
            (a[0] - b[0]).abs() <= 1e-6,
            "{stage}: loss {} alone, {} on two ranks",
            a[0],
            b[0]
        );
        let (a, b) = (weights(&last(&one, stage)), weights(&last(&two, stage)));
        let (gradients, statistics) = gradient_and_statistics_gaps(&a, &b);
        assert!(
            gradients <= 1e-4,
            "{stage}: gradients differ by {gradients} of their scale"
        );
        assert!(
            statistics <= 1e-5,
            "{stage}: running statistics differ by {statistics}"
        );
        if stage == "distill-image" {
            let apart = dir.path().join("no-sync");
            let mut args = stage_args(stage, "32", "1", apart.to_str().unwrap(), Some(init_s));
            args.push("--no-sync-bn");
            run(2, &args);
            let (gradients, statistics) =
                gradient_and_statistics_gaps(&a, &weights(&last(&apart, stage)));
            assert!(
                gradients > 1e-2 && statistics > 1e-3,
                "without sync: {gradients}, {statistics}"
            );
        }
    }
}

/// Two epochs of two steps of each stage, alone and on two ranks, follow the same losses (each
/// stage starts from the single process's previous result, so each reads the other's
/// checkpoints). Spiking networks amplify rounding: a membrane potential that lands on the
/// other side of the threshold flips a spike, so the losses are compared to 1e-5.
#[test]
fn several_steps_on_two_ranks_follow_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut init: Option<String> = None;
    for stage in STAGES {
        let (one, two) = (
            dir.path().join(format!("{stage}-1")),
            dir.path().join(format!("{stage}-2")),
        );
        let (one, two) = (one.to_str().unwrap(), two.to_str().unwrap());
        let alone = run(0, &stage_args(stage, "64", "2", one, init.as_deref()));
        let pair = run(2, &stage_args(stage, "64", "2", two, init.as_deref()));
        let (a, b) = (step_losses(&alone), step_losses(&pair));
        assert_eq!((a.len(), b.len()), (4, 4), "{stage}");
        for (step, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5,
                "{stage} step {step}: loss {a} alone, {b} on two ranks"
            );
        }
        init = Some(one.to_string());
    }
}

/// The process of `rank` among those `mpirun` started, once it is running.
/// The parent of process `pid`, from `/proc/PID/stat` (the field after the parenthesised name).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `pid` descends from `ancestor` (a job's mpirun): tests run in parallel, and another
/// test's job has a rank 1 too.
fn descends_from(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..8 {
        match parent(pid) {
            Some(p) if p == ancestor => return true,
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

/// The process id of rank `rank` of the job that `mpirun` (process `job`) started.
fn rank_pid(job: u32, rank: usize) -> u32 {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let exe = std::fs::read_link(entry.path().join("exe")).ok();
            let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let ours = exe.is_some_and(|e| e == Path::new(BIN)) && descends_from(pid, job);
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
        stage_args("distill-image", "64", "3", out.to_str().unwrap(), None)
            .into_iter()
            .map(String::from)
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
    let victim = rank_pid(job.id(), 1);
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
