//! The teacher-feature cache, with the tiny fixture CLIP as teacher.

mod common;
use common::max_abs_diff;

use std::path::PathBuf;

use candle_core::Device;
use spikeclip::data::cache::{cache_images, cache_texts, Cache, CacheOptions};
use spikeclip::data::sources::DatasetSpec;
use spikeclip::data::{ImageFeatureSet, TextFeatureSet};
use spikeclip::teacher::clip::{ClipModel, ClipTeacher};
use spikeclip::teacher::preprocess::{self, Preprocessor};
use spikeclip::teacher::tokenizer::ClipTokenizer;
use spikeclip::teacher::{ImageTeacher, TextTeacher, Tokenize};

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip"))
}

fn teacher() -> ClipTeacher {
    let gz = common::shared_data("bpe_simple_vocab_16e6.txt.gz");
    ClipTeacher {
        model: ClipModel::load(&fixture_dir(), &Device::Cpu).unwrap(),
        tokenizer: ClipTokenizer::from_bpe_gz(&gz).unwrap(),
    }
}

fn opts() -> CacheOptions {
    CacheOptions {
        shard_rows: 4,
        batch: 3,
        progress: false,
    }
}

#[test]
fn image_cache_holds_teacher_features_and_survives_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::image_folder(&data, 3);
    let spec = format!("folder:{}:train:0", data.display());
    let source = DatasetSpec::parse(&spec).unwrap().open().unwrap();
    let t = teacher();
    let pre = Preprocessor::from_file(&fixture_dir().join("preprocessor_config.json")).unwrap();
    let out = tmp.path().join("cache");
    let job = serde_json::json!({ "dataset": spec });
    let (rows, skipped) =
        cache_images(source.as_ref(), &t, &pre, job.clone(), &out, &opts()).unwrap();
    assert_eq!((rows, skipped), (6, 1));

    let cache = Cache::open(&out).unwrap();
    assert_eq!(ImageFeatureSet::len(&cache), 6);
    assert_eq!(cache.class_names(), ["ant", "bee"]);
    let order = [5, 0, 3];
    let batch = ImageFeatureSet::batch(&cache, &order, &Device::Cpu).unwrap();
    // Source order without the corrupt file (sorted: bee/0,1,2 precede corrupt.png).
    let readable: Vec<usize> = (0..source.len())
        .filter(|&i| source.image(i).is_ok())
        .collect();
    let pixels: Vec<Vec<f32>> = order
        .iter()
        .map(|&k| pre.pixels_rgb(&source.image(readable[k]).unwrap()))
        .collect();
    let pixels = preprocess::batch(pixels, 32, 32, &Device::Cpu).unwrap();
    let want = t.image_features(&pixels).unwrap();
    assert!(max_abs_diff(&batch.teacher, &want) < 5e-3);
    assert!(max_abs_diff(&batch.inputs, &pixels) < 5e-3);
    let labels: Vec<u32> = order.iter().map(|&k| source.label(readable[k])).collect();
    assert_eq!(batch.labels, labels);

    // A kill after the first shard: the finished shard is kept, the rest recomputed.
    let first = std::fs::read(out.join("shard-00000.safetensors")).unwrap();
    std::fs::remove_file(out.join("shard-00001.safetensors")).unwrap();
    std::fs::remove_file(out.join("index.json")).unwrap();
    let (rows, _) = cache_images(source.as_ref(), &t, &pre, job, &out, &opts()).unwrap();
    assert_eq!(rows, 6);
    assert_eq!(
        std::fs::read(out.join("shard-00000.safetensors")).unwrap(),
        first
    );
    let again = Cache::open(&out).unwrap();
    let rebatch = ImageFeatureSet::batch(&again, &order, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&rebatch.teacher, &batch.teacher), 0.0);

    let other = serde_json::json!({ "dataset": "something else" });
    let err = cache_images(source.as_ref(), &t, &pre, other, &out, &opts())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("different job"));
}

#[test]
fn text_cache_holds_student_ids_and_teacher_features() {
    let tmp = tempfile::tempdir().unwrap();
    let t = teacher();
    let texts: Vec<String> = [
        "a photo of a cat.",
        "a photo of a dog.",
        "itap of a bird",
        "a car",
        "x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let rows = cache_texts(
        &texts,
        &t.tokenizer,
        &t,
        20,
        serde_json::json!("texts"),
        tmp.path(),
        &opts(),
    )
    .unwrap();
    assert_eq!(rows, 5);
    let cache = Cache::open(tmp.path()).unwrap();
    let batch = TextFeatureSet::batch(&cache, &[4, 1], &Device::Cpu).unwrap();
    let pick = vec![texts[4].clone(), texts[1].clone()];
    assert_eq!(
        batch.token_ids.to_vec2::<u32>().unwrap(),
        t.tokenizer.encode(&pick, 20).unwrap()
    );
    assert!(max_abs_diff(&batch.teacher, &t.text_features(&pick).unwrap()) < 5e-3);
    assert!(TextFeatureSet::batch(&cache, &[5], &Device::Cpu).is_err());
}

#[test]
fn unfinished_cache_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = format!("{:#}", Cache::open(tmp.path()).err().unwrap());
    assert!(err.contains("index.json"), "{err}");
}
