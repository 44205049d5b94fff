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

/// Without synchronised BatchNorm each rank normalises its own half of the global batch: the
/// job's loss is the mean of the two halves' losses, each normalised on its own, which one
/// process gives as two steps of half the batch (the same permutation, `--lr 0` so that the
/// second half meets the same weights), and the ranks' gradient is the mean of the halves'
/// ([`halves_gap`]). With synchronisation the loss is the whole batch's. Image distillation
/// only: after so short a pre-training the tiny student's image features
/// do not yet depend on the image, so fine-tuning's loss is the same for any batch.
#[test]
fn without_sync_two_ranks_normalise_each_half_as_one_process_would() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    let init_s = init.to_str().unwrap();
    run(0, &stage_args("distill-text", "32", "0", init_s, None));
    let stage = "distill-image";
    let out = |name: &str| dir.path().join(format!("{stage}-{name}"));
    let (halves, apart, whole) = (out("halves"), out("apart"), out("whole"));
    let mut args = stage_args(stage, "32", "1", halves.to_str().unwrap(), Some(init_s));
    let batch = args.iter().position(|a| *a == "--batch-size").unwrap() + 1;
    args[batch] = "16";
    args.extend(["--lr", "0", "--eta-min", "0"]);
    let halves = step_losses(&run(0, &args));
    let mut args = stage_args(stage, "32", "1", apart.to_str().unwrap(), Some(init_s));
    args.push("--no-sync-bn");
    let apart = step_losses(&run(2, &args));
    let whole = step_losses(&run(
        2,
        &stage_args(stage, "32", "1", whole.to_str().unwrap(), Some(init_s)),
    ));
    assert_eq!((halves.len(), apart.len()), (2, 1), "{stage}");
    let mean = (halves[0] + halves[1]) / 2.0;
    assert!(
        (apart[0] - mean).abs() <= 1e-6,
        "{stage}: {} on two ranks apart, {mean} from the halves alone",
        apart[0]
    );
    assert!(
        (whole[0] - mean).abs() > 1e-4,
        "{stage}: synchronised BatchNorm gave the halves' loss {mean}"
    );
    let (a, b) = (
        weights(&last(&out("halves"), stage)),
        weights(&last(&out("apart"), stage)),
    );
    let gap = halves_gap(&a, &b);
    assert!(
        gap <= 1e-3,
        "{stage}: the halves' gradients are not the ranks' ({gap})"
    );
    // The measure tells the two apart: the synchronised gradient is not the halves' mean.
    let synced = halves_gap(&a, &weights(&last(&out("whole"), stage)));
    assert!(
        synced > 1e-2,
        "{stage}: synchronised, the gap is only {synced}"
    );
}

/// How far the two ranks' gradient, without sync, is from the mean of one process's two
/// half-batch gradients, read off Adam's moments (beta 0.9, 0.999). The process's two steps
/// (`a`) hold `m = 0.09 g0 + 0.1 g1` and `v = 0.000999 g0^2 + 0.001 g1^2`; the ranks' one step
/// (`b`) holds `m = 0.1 (g0 + g1) / 2`. The two `m`s give `g0` and `g1`; the gap is how far
/// the `v` they predict is from the process's, relative to each tensor's largest `v`.
fn halves_gap(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    let values = |t: &Tensor| -> Vec<f64> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f64::from).collect()
    };
    let mut gap = 0f64;
    for name in a.keys().filter_map(|k| k.strip_suffix(".m")) {
        if feeds_batch_norm(&name.replacen("optim.", "model.", 1), a) {
            continue;
        }
        let (ma, va, mb) = (
            values(&a[&format!("{name}.m")]),
            values(&a[&format!("{name}.v")]),
            values(&b[&format!("{name}.m")]),
        );
        let largest = va.iter().copied().fold(1e-30, f64::max);
        for ((ma, va), mb) in ma.iter().zip(&va).zip(&mb) {
            let g0 = (2.0 * mb - ma) / 0.01;
            let g1 = 20.0 * mb - g0;
            let v = 0.000999 * g0 * g0 + 0.001 * g1 * g1;
            gap = gap.max((v - va).abs() / largest);
        }
    }
    gap as f32
}

/// A bias that feeds BatchNorm (`X_conv.bias` beside `X_bn`) and that BatchNorm's running
/// mean: BatchNorm subtracts any constant, so the bias's gradient is zero but for rounding,
/// and Adam, which divides a gradient by its own scale, turns that noise into steps of the
/// learning rate in a direction each run draws anew (in PyTorch as here); the running mean
/// follows the bias. These are left out of the comparison.
fn feeds_batch_norm(name: &str, all: &HashMap<String, Tensor>) -> bool {
    let bn = |n: &str| n.replace("_conv.bias", "_bn.weight");
    let fed = |n: &str| n.ends_with("_conv.bias") && all.contains_key(&bn(n));
    fed(name)
        || name
            .strip_suffix("_bn.running_mean")
            .is_some_and(|layer| fed(&format!("{layer}_conv.bias")))
}

/// For the parameters of `a` and `b` that learn (not [`feeds_batch_norm`]): the largest
/// difference, and the share of values more than 1e-5 apart.
fn weight_gaps(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> (f32, f64) {
    let (mut largest, mut apart, mut total) = (0f32, 0usize, 0usize);
    for (name, x) in a {
        if feeds_batch_norm(name, a) {
            continue;
        }
        let d: Vec<f32> = (x - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        largest = d.iter().copied().fold(largest, f32::max);
        apart += d.iter().filter(|&&v| v > 1e-5).count();
        total += d.len();
    }
    (largest, apart as f64 / total as f64)
}

/// Two epochs of two steps of each stage, alone and on two ranks (each stage starts from the
/// single process's previous result, so each reads the other's checkpoints): the same loss at
/// every step within 1e-6, the weights within 1e-5 but for a few values in a thousand that
/// Adam's normalisation moves further (a gradient near zero, where rounding decides its
/// sign). The biases that feed BatchNorm are not compared ([`feeds_batch_norm`]).
#[test]
fn several_steps_on_two_ranks_follow_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut init: Option<String> = None;
    for stage in STAGES {
        let (one, two) = (
            dir.path().join(format!("{stage}-1")),
            dir.path().join(format!("{stage}-2")),
        );
        let (one_s, two_s) = (one.to_str().unwrap(), two.to_str().unwrap());
        let alone = run(0, &stage_args(stage, "64", "2", one_s, init.as_deref()));
        let pair = run(2, &stage_args(stage, "64", "2", two_s, init.as_deref()));
        let (a, b) = (step_losses(&alone), step_losses(&pair));
        assert_eq!((a.len(), b.len()), (4, 4), "{stage}");
        for (step, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "{stage} step {step}: loss {a} alone, {b} on two ranks"
            );
        }
        let model = |d: &Path| weights(&d.join("model.safetensors"));
        let (largest, apart) = weight_gaps(&model(&one), &model(&two));
        assert!(
            largest <= 1e-4 && apart <= 1e-3,
            "{stage}: weights up to {largest} apart, {apart} of them by more than 1e-5"
        );
        init = Some(one_s.to_string());
    }
    // Evaluation on two ranks: each scores part of every set, the counts are summed.
    let checkpoint = init.unwrap();
    let eval = |ranks| {
        let out = run(ranks, &["eval", "--checkpoint", &checkpoint]);
        String::from_utf8(out.stdout).unwrap()
    };
    let (alone, pair) = (eval(0), eval(2));
    assert!(alone.contains("(600 images)"), "{alone}");
    assert_eq!(alone, pair, "eval on two ranks");
}

/// Copies directory `from` with everything under it to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
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
/// never interrupted; resumed on one, it ends where one process follows two ranks.
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

    // The same cut job resumed on one rank instead of two: the batches do not depend on the
    // count, so it follows the uninterrupted run as one process follows two ranks.
    let alone = dir.path().join("cut-alone");
    copy_tree(&cut, &alone);
    let alone_args = args(&alone);
    let resumed: Vec<&str> = alone_args
        .iter()
        .map(String::as_str)
        .chain(["--resume"])
        .collect();
    let out = run(0, &resumed);
    assert!(step_losses(&out).len() < 6, "the resumed run started over");
    let model = |d: &Path| weights(&d.join("model.safetensors"));
    let (largest, apart) = weight_gaps(&model(&whole), &model(&alone));
    assert!(
        largest <= 1e-4 && apart <= 1e-3,
        "resumed on one rank: weights up to {largest} apart, {apart} of them by more than 1e-5"
    );

    let resumed: Vec<&str> = cut_args.iter().copied().chain(["--resume"]).collect();
    let out = run(2, &resumed);
    assert!(step_losses(&out).len() < 6, "the resumed run started over");
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

/// Every file of a cache directory (`images/`, `texts/`), name and bytes, in name order.
fn cache_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for part in ["images", "texts"] {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(part))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for name in names {
            let bytes = std::fs::read(dir.join(part).join(&name)).unwrap();
            files.push((format!("{part}/{name}"), bytes));
        }
    }
    files
}

/// The teacher cache of a two-class image folder (one file unreadable) and a D-text, in shards
/// of 4 rows: made by two ranks, it is the single process's cache byte for byte; with shards
/// and the index lost (a kill), three ranks complete it to the same bytes.
#[test]
fn ranks_cache_their_shards_into_the_single_process_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = format!("clip:{}", common::clip_dir(tmp.path()).display());
    let data = tmp.path().join("data");
    common::image_folder(&data, 7);
    let prompts = tmp.path().join("prompts.json");
    std::fs::write(
        &prompts,
        r#"{"datasets": {"d": {"classes": ["ant", "bee", "wasp"], "templates": ["a {}.", "{}", "a photo of a {}."]}}}"#,
    )
    .unwrap();
    let dataset = format!("folder:{}:train:0", data.display());
    let cache = |ranks: usize, out: &Path| -> Output {
        run(
            ranks,
            &[
                "cache",
                "--teacher",
                &teacher,
                "--dataset",
                &dataset,
                "--dtext",
                prompts.to_str().unwrap(),
                "--shard-rows",
                "4",
                "--batch",
                "3",
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    cache(0, &one);
    let pair = cache(2, &two);
    let said = String::from_utf8_lossy(&pair.stdout);
    assert!(
        said.matches("cached 14 images (1 unreadable, skipped)")
            .count()
            == 1,
        "the ranks' counts are not summed: {said}"
    );
    let want = cache_files(&one);
    assert_eq!(
        want.iter().filter(|(n, _)| n.contains("shard-")).count(),
        4 + 3,
        "15 images and 9 sentences in shards of 4"
    );
    let names = |files: &[(String, Vec<u8>)]| files.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    let got = cache_files(&two);
    assert_eq!(names(&got), names(&want));
    for ((name, a), (_, b)) in want.iter().zip(&got) {
        assert!(a == b, "{name} differs between one and two ranks");
    }

    for lost in [
        "images/shard-00001.safetensors",
        "images/shard-00002.safetensors",
        "images/index.json",
        "texts/index.json",
    ] {
        std::fs::remove_file(two.join(lost)).unwrap();
    }
    cache(3, &two);
    let again = cache_files(&two);
    assert_eq!(names(&again), names(&want));
    for ((name, a), (_, b)) in want.iter().zip(&again) {
        assert!(a == b, "{name} differs after the resume on three ranks");
    }
}
