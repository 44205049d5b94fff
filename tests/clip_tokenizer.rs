use std::path::PathBuf;

use spikeclip::teacher::tokenizer::ClipTokenizer;
use spikeclip::teacher::Tokenize;

fn shared(name: &str) -> PathBuf {
    let beside = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")).join(name);
    if beside.exists() {
        beside
    } else {
        PathBuf::from("/work/shared/data").join(name)
    }
}

/// Ids from transformers' CLIPTokenizer (scripts/clip_tokenizer_fixtures.py).
#[test]
fn ids_match_transformers() {
    let tok = ClipTokenizer::from_bpe_gz(&shared("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    assert_eq!(tok.vocab_size(), 49_408);
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/clip_tokenizer.json")).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap().to_string();
        let max_len = case["max_len"].as_u64().unwrap() as usize;
        let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(std::slice::from_ref(&text), max_len).unwrap()[0],
            want,
            "{text:?} at {max_len}"
        );
    }
}

#[test]
fn missing_or_truncated_merges_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.txt.gz");
    let err = format!("{:#}", ClipTokenizer::from_bpe_gz(&missing).err().unwrap());
    assert!(err.contains("none.txt.gz"), "{err}");
    let short = dir.path().join("short.txt.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&short).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut gz, b"#version\ni n\n").unwrap();
    gz.finish().unwrap();
    let err = format!("{:#}", ClipTokenizer::from_bpe_gz(&short).err().unwrap());
    assert!(err.contains("short.txt.gz"), "{err}");
}
