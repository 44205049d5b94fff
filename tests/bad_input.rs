//! Every reader of user files, fed truncated, bit-flipped, overwritten and random bytes: it must
//! not panic, must return within a time limit, and every error must name the file it read and
//! say what is wrong. Each reader starts from a valid input it accepts, so a mutant that keeps
//! the file valid is fine; the number of inputs tried per reader is printed.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use half::f16;
use spikeclip::data::cache::Cache;
use spikeclip::data::prompts::PromptSet;
use spikeclip::data::sources::{Cifar, ImageFolder, ImageSource, Split, Stl10};
use spikeclip::data::student_inputs::{read_pixels, read_token_ids};
use spikeclip::data::{ImageFeatureSet, TextFeatureSet};
use spikeclip::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use spikeclip::model::config::SpikeClipConfig;
use spikeclip::model::import::load_pth;
use spikeclip::model::SpikeClip;
use spikeclip::recipe::classifier::LoadedStudent;
use spikeclip::recipe::Student;
use spikeclip::teacher::clip::ClipTeacher;
use spikeclip::teacher::preprocess::Preprocessor;
use spikeclip::teacher::tokenizer::ClipTokenizer;
use spikeclip::teacher::Tokenize;
use spikeclip::train::checkpoint as train_checkpoint;
use spikeclip::train::optim::{Adam, AdamConfig};
use spikeclip::train::rng::Rng;

/// Longest a reader may take on one input.
const TIME_LIMIT: Duration = Duration::from_secs(20);

type Reader = Arc<dyn Fn(&Path) -> anyhow::Result<()> + Send + Sync>;

/// What one input did.
enum Outcome {
    Accepted,
    Refused(String),
    Panicked(String),
}

/// Runs `read(dir)` on another thread, catching a panic and giving up after [`TIME_LIMIT`].
fn run_once(read: &Reader, dir: &Path) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let (read, dir) = (read.clone(), dir.to_path_buf());
    std::thread::spawn(move || {
        let outcome = match catch_unwind(AssertUnwindSafe(|| read(&dir))) {
            Ok(Ok(())) => Outcome::Accepted,
            Ok(Err(e)) => Outcome::Refused(format!("{e:#}")),
            Err(p) => Outcome::Panicked(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            ),
        };
        let _ = tx.send(outcome);
    });
    match rx.recv_timeout(TIME_LIMIT) {
        Ok(outcome) => outcome,
        Err(_) => panic!("the reader took over {TIME_LIMIT:?}: a hang"),
    }
}

/// The `i`-th mutant of `valid`: truncations, bit flips (half of them in the first KiB, where
/// headers and lengths live), overwritten runs of bytes and random bytes, in turn.
fn mutant(valid: &[u8], i: usize, rng: &mut Rng) -> Vec<u8> {
    let len = valid.len();
    let head = len.clamp(1, 1024);
    let pos = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            rng.below(head)
        } else {
            rng.below(len.max(1))
        }
    };
    match i % 4 {
        0 => {
            valid[..[0, len / 2, len.saturating_sub(1), rng.below(len.max(1))][i / 4 % 4]].to_vec()
        }
        1 => {
            let mut v = valid.to_vec();
            for _ in 0..1 + rng.below(8) {
                if !v.is_empty() {
                    let p = pos(rng);
                    v[p] ^= 1 << rng.below(8);
                }
            }
            v
        }
        2 => {
            let mut v = valid.to_vec();
            if !v.is_empty() {
                let at = pos(rng);
                let fill = [0x00, 0xff, rng.below(256) as u8][rng.below(3)];
                let end = (at + 1 + rng.below(8)).min(len);
                v[at..end].fill(fill);
            }
            v
        }
        _ => (0..rng.below(len.clamp(16, 4096) + 1))
            .map(|_| rng.below(256) as u8)
            .collect(),
    }
}

/// Feeds `tries` mutants of each of `targets` (files inside `dir`, which must make `read`
/// succeed as they are) to `read`; every refusal must name the mutated file and more.
/// Returns the number of inputs tried.
fn fuzz(name: &str, dir: &Path, targets: &[&str], tries: usize, read: Reader) -> usize {
    assert!(
        matches!(run_once(&read, dir), Outcome::Accepted),
        "{name}: the valid input must be accepted"
    );
    let mut rng = Rng::new(name.len() as u64 * 7919);
    let (mut accepted, mut refused) = (0, 0);
    let started = Instant::now();
    for target in targets {
        let path = dir.join(target);
        let valid = std::fs::read(&path).unwrap();
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        for i in 0..tries {
            let bytes = mutant(&valid, i, &mut rng);
            std::fs::write(&path, &bytes).unwrap();
            match run_once(&read, dir) {
                Outcome::Accepted => accepted += 1,
                Outcome::Refused(msg) => {
                    refused += 1;
                    assert!(
                        msg.contains(&file_name),
                        "{name}: the error does not name {file_name} (mutant {i}): {msg}"
                    );
                    let problem = msg.replace(&*path.to_string_lossy(), "");
                    assert!(
                        problem.chars().filter(|c| c.is_alphabetic()).count() >= 8,
                        "{name}: the error names no problem (mutant {i}): {msg}"
                    );
                }
                Outcome::Panicked(msg) => {
                    panic!("{name}: panicked on mutant {i} of {file_name}: {msg}")
                }
            }
        }
        std::fs::write(&path, &valid).unwrap();
    }
    let tried = targets.len() * tries;
    println!(
        "{name}: {tried} inputs ({accepted} accepted, {refused} refused) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tried
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn names(n: usize) -> String {
    (0..n).map(|i| format!("class{i}\n")).collect()
}

fn pixels(n: usize, rng: &mut Rng) -> Vec<u8> {
    (0..n).map(|_| rng.below(256) as u8).collect()
}

/// Decodes every image of a source, as the cache does.
fn read_source(source: &dyn ImageSource) -> anyhow::Result<()> {
    for i in 0..source.len() {
        let _ = source.label(i);
        source.image(i)?;
    }
    Ok(())
}

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

#[test]
fn cifar10_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(1);
    let records: Vec<u8> = (0..3)
        .flat_map(|i| [vec![i as u8], pixels(3072, &mut rng)].concat())
        .collect();
    write(dir.path(), "test_batch.bin", records);
    write(dir.path(), "batches.meta.txt", names(10));
    fuzz(
        "cifar10",
        dir.path(),
        &["test_batch.bin", "batches.meta.txt"],
        400,
        Arc::new(|d| read_source(&Cifar::open_10(d, Split::Test)?)),
    );
}

#[test]
fn cifar100_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(2);
    let records: Vec<u8> = (0..3)
        .flat_map(|i| [vec![0, i as u8], pixels(3072, &mut rng)].concat())
        .collect();
    write(dir.path(), "test.bin", records);
    write(dir.path(), "fine_label_names.txt", names(5));
    fuzz(
        "cifar100",
        dir.path(),
        &["test.bin", "fine_label_names.txt"],
        400,
        Arc::new(|d| read_source(&Cifar::open_100(d, Split::Test)?)),
    );
}

#[test]
fn stl10_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(3);
    write(dir.path(), "test_X.bin", pixels(2 * 3 * 96 * 96, &mut rng));
    write(dir.path(), "test_y.bin", [1u8, 3]);
    write(dir.path(), "class_names.txt", names(4));
    fuzz(
        "stl10",
        dir.path(),
        &["test_X.bin", "test_y.bin", "class_names.txt"],
        300,
        Arc::new(|d| read_source(&Stl10::open(d, Split::Test)?)),
    );
}

#[test]
fn image_folder_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(4);
    let img = image::RgbImage::from_raw(12, 10, pixels(12 * 10 * 3, &mut rng)).unwrap();
    std::fs::create_dir_all(dir.path().join("cat")).unwrap();
    std::fs::create_dir_all(dir.path().join("dog")).unwrap();
    img.save(dir.path().join("cat/a.png")).unwrap();
    img.save(dir.path().join("dog/b.jpg")).unwrap();
    fuzz(
        "image folder",
        dir.path(),
        &["cat/a.png", "dog/b.jpg"],
        500,
        Arc::new(|d| read_source(&ImageFolder::open(d, Split::Train, 0.0, 0)?)),
    );
}

/// A finished cache of 3 images and 3 sentences, as `spikeclip cache` lays it out.
fn write_cache(dir: &Path) {
    let f16s = |n: usize, rng: &mut Rng| -> Vec<f16> {
        (0..n).map(|_| f16::from_f64(rng.normal())).collect()
    };
    let mut rng = Rng::new(5);
    let dev = Device::Cpu;
    let shard: HashMap<String, Tensor> = [
        ("labels", Tensor::new(&[0u32, 1, 0], &dev).unwrap()),
        (
            "teacher",
            Tensor::from_vec(f16s(3 * 8, &mut rng), (3, 8), &dev).unwrap(),
        ),
        (
            "inputs",
            Tensor::from_vec(f16s(3 * 3 * 32 * 32, &mut rng), (3, 3, 32, 32), &dev).unwrap(),
        ),
        (
            "token_ids",
            Tensor::from_vec((0..60u32).collect::<Vec<_>>(), (3, 20), &dev).unwrap(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&shard, dir.join("shard-00000.safetensors")).unwrap();
    let index = serde_json::json!({
        "job": {"dataset": "test"},
        "class_names": ["a", "b"],
        "shards": [{"file": "shard-00000.safetensors", "rows": 3}],
    });
    write(
        dir,
        "index.json",
        serde_json::to_vec_pretty(&index).unwrap(),
    );
}

#[test]
fn cache_shards_and_index() {
    let dir = tempfile::tempdir().unwrap();
    write_cache(dir.path());
    fuzz(
        "cache",
        dir.path(),
        &["shard-00000.safetensors", "index.json"],
        600,
        Arc::new(|d| {
            let cache = Cache::open(d)?;
            let all: Vec<usize> = (0..Cache::len(&cache)).collect();
            ImageFeatureSet::batch(&cache, &all, &Device::Cpu)?;
            TextFeatureSet::batch(&cache, &all, &Device::Cpu)?;
            Ok(())
        }),
    );
}

/// The authors' model at the size of `tests/fixtures/encoders`.
fn small_config() -> SpikeClipConfig {
    let mut cfg = SpikeClipConfig::preset("tiny").unwrap();
    cfg.out_dim = 16;
    cfg.image.embed_dim = 32;
    cfg.text.vocab_size = 30;
    cfg.text.max_positions = 24;
    cfg.text.width = 4;
    cfg.text.hidden = 32;
    cfg
}

#[test]
fn checkpoints_and_model_cards() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_config();
    cfg.text.vocab_size = spikeclip::data::world::World::new(Default::default())
        .tokenizer()
        .vocab_size();
    let card = ModelCard {
        kind: ModelKind::SpikeClip,
        config: cfg.clone(),
        tokenizer: TokenizerSpec::World,
    };
    let model = SpikeClip::new(&cfg, 0, &Device::Cpu).unwrap();
    checkpoint::save(dir.path(), &model, &card).unwrap();
    fuzz(
        "checkpoint",
        dir.path(),
        &["model.safetensors", "model.json"],
        400,
        Arc::new(|d| LoadedStudent::open(d, &Device::Cpu).map(|_| ())),
    );
}

#[test]
fn training_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let model = SpikeClip::new(&small_config(), 0, &Device::Cpu).unwrap();
    let optim = || {
        Adam::new(
            train_checkpoint::named_vars(model.varmap()),
            AdamConfig::default(),
        )
    };
    let state = train_checkpoint::TrainState {
        epoch: 1,
        step: 3,
        best_metric: Some(0.5),
        rng: Rng::new(9),
    };
    let path = dir.path().join("distill_text_last.safetensors");
    train_checkpoint::save(&path, model.varmap(), &optim(), &state).unwrap();
    let varmap = model.varmap().clone();
    fuzz(
        "training checkpoint",
        dir.path(),
        &["distill_text_last.safetensors"],
        600,
        Arc::new(move |d| {
            let mut optim = Adam::new(train_checkpoint::named_vars(&varmap), AdamConfig::default());
            train_checkpoint::load(
                &d.join("distill_text_last.safetensors"),
                &varmap,
                &mut optim,
            )
            .map(|_| ())
        }),
    );
}

#[test]
fn prompt_files() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = serde_json::json!({"datasets": {
        "CIFAR10": {"classes": ["cat", ["dog", "puppy"]], "templates": ["a photo of a {}."]},
        "STL10": {"classes": ["ship"], "templates": ["a {}.", "the {}"]},
    }});
    write(dir.path(), "prompts.json", prompts.to_string());
    fuzz(
        "prompts",
        dir.path(),
        &["prompts.json"],
        1000,
        Arc::new(|d| PromptSet::from_file(&d.join("prompts.json")).map(|_| ())),
    );
}

/// Opens the tokenizer in `dir` and encodes a sentence with it.
fn tokenize(dir: &Path) -> anyhow::Result<()> {
    let tok = ClipTokenizer::from_dir(dir)?;
    tok.encode(&["a photo of a cat.".to_string()], 20)?;
    Ok(())
}

#[test]
fn tokenizer_vocab_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = serde_json::json!({
        "a": 0, "b": 1, "c": 2, "t": 3, "a</w>": 4, "t</w>": 5, "ca": 6, "cat</w>": 7,
        "<|startoftext|>": 8, "<|endoftext|>": 9,
    });
    write(dir.path(), "vocab.json", vocab.to_string());
    write(dir.path(), "merges.txt", "#version: 0.2\nc a\nca t</w>\n");
    fuzz(
        "tokenizer vocab.json + merges.txt",
        dir.path(),
        &["vocab.json", "merges.txt"],
        500,
        Arc::new(tokenize),
    );
}

/// OpenAI's merges file is large and slow to build a tokenizer from: fewer tries.
#[test]
fn tokenizer_bpe_gz() {
    let dir = tempfile::tempdir().unwrap();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let bpe = shared.join("bpe_simple_vocab_16e6.txt.gz");
    let bytes = std::fs::read(&bpe).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the shared data directory must sit beside the repository)",
            bpe.display()
        )
    });
    write(dir.path(), "bpe_simple_vocab_16e6.txt.gz", bytes);
    fuzz(
        "tokenizer bpe_simple_vocab_16e6.txt.gz",
        dir.path(),
        &["bpe_simple_vocab_16e6.txt.gz"],
        60,
        Arc::new(tokenize),
    );
}

#[test]
fn clip_model_directories() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixture("clip").join(f), dir.path().join(f)).unwrap();
    }
    let vocab = serde_json::json!({"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2});
    write(dir.path(), "vocab.json", vocab.to_string());
    write(dir.path(), "merges.txt", "#version: 0.2\n");
    fuzz(
        "clip model",
        dir.path(),
        &[
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ],
        300,
        Arc::new(|d| {
            ClipTeacher::load(d, &Device::Cpu)?;
            Preprocessor::from_file(&d.join("preprocessor_config.json"))?;
            Ok(())
        }),
    );
}

#[test]
fn authors_pth_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["image.pth", "text.pth.tar"] {
        std::fs::copy(fixture("encoders").join(f), dir.path().join(f)).unwrap();
    }
    fuzz(
        "authors' .pth",
        dir.path(),
        &["image.pth", "text.pth.tar"],
        400,
        Arc::new(|d| {
            let model = SpikeClip::new(&small_config(), 0, &Device::Cpu)?;
            load_pth(&d.join("image.pth"), model.varmap(), "image.")?;
            load_pth(&d.join("text.pth.tar"), model.varmap(), "text.")
        }),
    );
}

#[test]
fn student_input_files() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let px = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
    let ids = Tensor::arange(0i64, 40, &dev)
        .unwrap()
        .reshape((2, 20))
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_string(), px)]),
        dir.path().join("pixels.safetensors"),
    )
    .unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("input_ids".to_string(), ids)]),
        dir.path().join("ids.safetensors"),
    )
    .unwrap();
    fuzz(
        "student inputs (--pixels, --ids)",
        dir.path(),
        &["pixels.safetensors", "ids.safetensors"],
        500,
        Arc::new(|d| {
            read_pixels(&d.join("pixels.safetensors"), 3)?;
            read_token_ids(&d.join("ids.safetensors"), 20, 49408)?;
            Ok(())
        }),
    );
}
