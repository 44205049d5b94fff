//! Parity with transformers' CLIP: fixtures from scripts/clip_fixtures.py.

mod common;
use common::max_abs_diff;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use spikeclip::teacher::clip::{ClipModel, ClipTeacher};
use spikeclip::teacher::preprocess::{self, Preprocessor};
use spikeclip::teacher::tokenizer::ClipTokenizer;
use spikeclip::teacher::{ImageTeacher, TextTeacher, Tokenize};

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip"))
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn inputs() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("inputs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn texts() -> Vec<String> {
    inputs()["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn ids(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

#[test]
fn tokenizer_from_bpe_gz_matches_transformers_at_77_and_20() {
    let tok =
        ClipTokenizer::from_bpe_gz(&common::shared_data("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    let r = reference();
    let texts = texts();
    assert_eq!(tok.encode(&texts, 77).unwrap(), ids(&r["input_ids_77"]));
    assert_eq!(tok.encode(&texts, 20).unwrap(), ids(&r["input_ids_20"]));
}

#[test]
fn tokenizer_mask_marks_real_tokens() {
    let tok =
        ClipTokenizer::from_bpe_gz(&common::shared_data("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    let enc = tok.encode_with_mask(&["a cat".to_string()], 6).unwrap();
    assert_eq!(enc.mask, vec![vec![1, 1, 1, 1, 0, 0]]);
    assert_eq!(enc.ids[0][3], tok.end_id());
}

#[test]
fn tokenizer_missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = ClipTokenizer::from_bpe_gz(&dir.path().join("nope.gz"))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("nope.gz"));
}

fn teacher() -> ClipTeacher {
    ClipTeacher {
        model: ClipModel::load(&fixture_dir(), &Device::Cpu).unwrap(),
        tokenizer: ClipTokenizer::from_bpe_gz(&common::shared_data("bpe_simple_vocab_16e6.txt.gz"))
            .unwrap(),
    }
}

#[test]
fn text_features_match_transformers() {
    let t = teacher();
    let ours = t.text_features(&texts()).unwrap();
    let diff = max_abs_diff(&ours, &reference()["text_features"]);
    assert!(diff < 1e-4, "text features differ by {diff}");
}

#[test]
fn image_features_match_transformers_given_identical_pixels() {
    let t = teacher();
    let r = reference();
    let ours = t.image_features(&r["pixel_values"]).unwrap();
    let diff = max_abs_diff(&ours, &r["image_features"]);
    assert!(diff < 1e-4, "image features differ by {diff}");
}

#[test]
fn embeddings_for_the_student_have_clip_shapes() {
    let t = teacher();
    assert_eq!(t.model.token_embedding().dims(), &[49408, 8]);
    assert_eq!(t.model.position_embedding().dims(), &[77, 8]);
}

#[test]
fn wrong_shaped_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"hidden_size\": 8", "\"hidden_size\": 12"),
    )
    .unwrap();
    std::fs::copy(
        fixture_dir().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        ClipModel::load(dir.path(), &Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains("model.safetensors") && err.contains("config.json"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = format!(
        "{:#}",
        ClipModel::load(dir.path(), &Device::Cpu).err().unwrap()
    );
    assert!(err.contains("no model.safetensors"), "{err}");
}

#[test]
fn student_input_matches_torch_bilinear_interpolate() {
    let r = reference();
    let ours = preprocess::student_input(&r["interp_in"], 32).unwrap();
    let diff = max_abs_diff(&ours, &r["interp_out"]);
    assert!(diff < 1e-5, "student input differs by {diff}");
}

#[test]
fn corrupt_image_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.png");
    std::fs::write(&path, b"\x89PNG not really").unwrap();
    let err = format!("{:#}", Preprocessor::square(32).load(&path).err().unwrap());
    assert!(err.contains("broken.png"), "{err}");
}
