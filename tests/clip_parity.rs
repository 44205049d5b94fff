//! Parity with transformers' CLIP: fixtures from scripts/clip_fixtures.py.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use spikeclip::teacher::tokenizer::ClipTokenizer;
use spikeclip::teacher::Tokenize;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip"))
}

fn shared_file(name: &str) -> PathBuf {
    let in_repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")).join(name);
    if in_repo.exists() {
        in_repo
    } else {
        PathBuf::from("/work/shared/data").join(name)
    }
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
    let tok = ClipTokenizer::from_bpe_gz(&shared_file("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    let r = reference();
    let texts = texts();
    assert_eq!(tok.encode(&texts, 77).unwrap(), ids(&r["input_ids_77"]));
    assert_eq!(tok.encode(&texts, 20).unwrap(), ids(&r["input_ids_20"]));
}

#[test]
fn tokenizer_mask_marks_real_tokens() {
    let tok = ClipTokenizer::from_bpe_gz(&shared_file("bpe_simple_vocab_16e6.txt.gz")).unwrap();
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
