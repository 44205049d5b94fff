//! `spikeclip embed` and `spikeclip cache` end to end, on the tiny fixture CLIP.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use spikeclip::data::cache::Cache;
use spikeclip::data::ImageFeatureSet;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip"))
}

/// The fixture checkpoint plus OpenAI's merges file, as a user's CLIP directory.
fn clip_dir(root: &Path) -> PathBuf {
    let dir = root.join("clip");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixture_dir().join(f), dir.join(f)).unwrap();
    }
    let repo = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/bpe_simple_vocab_16e6.txt.gz"
    ));
    let gz = if repo.exists() {
        repo
    } else {
        "/work/shared/data/bpe_simple_vocab_16e6.txt.gz".into()
    };
    std::fs::copy(gz, dir.join("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    dir
}

fn spikeclip(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn embed_writes_transformers_features() {
    let tmp = tempfile::tempdir().unwrap();
    let model = format!("clip:{}", clip_dir(tmp.path()).display());
    let out = tmp.path().join("feats.safetensors");
    let image = fixture_dir().join("rgb_32x32.png");
    let run = spikeclip(&[
        "embed",
        "--model",
        &model,
        "--text",
        "a photo of a cat.",
        "--text",
        "A PHOTO of the Dog!!",
        "--image",
        image.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let want =
        candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let diff = (&got["text_features"] - want["text_features"].narrow(0, 0, 2).unwrap()).unwrap();
    assert!(
        diff.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            < 1e-4
    );
    let ids: Vec<Vec<u32>> = got["input_ids"].to_vec2().unwrap();
    let want_ids: Vec<Vec<i64>> = want["input_ids_77"]
        .narrow(0, 0, 2)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(
        ids,
        want_ids
            .iter()
            .map(|r| r.iter().map(|&v| v as u32).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    assert_eq!(got["image_features"].dims(), &[1, 8]);

    let bad = spikeclip(&[
        "embed",
        "--model",
        &model,
        "--image",
        "/nonexistent.png",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent.png"));
}

#[test]
fn cache_command_caches_a_folder_and_dtext() {
    let tmp = tempfile::tempdir().unwrap();
    let model = format!("clip:{}", clip_dir(tmp.path()).display());
    let data = tmp.path().join("data");
    for class in ["a", "b"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        std::fs::copy(
            fixture_dir().join("rgb_48x40.png"),
            data.join(class).join("x.png"),
        )
        .unwrap();
    }
    let prompts = tmp.path().join("prompts.json");
    std::fs::write(
        &prompts,
        r#"{"datasets": {"d": {"classes": ["a", ["b", "bee"]], "templates": ["a {}.", "{}"]}}}"#,
    )
    .unwrap();
    let out = tmp.path().join("cache");
    let dataset = format!("folder:{}:train:0", data.display());
    let run = spikeclip(&[
        "cache",
        "--teacher",
        &model,
        "--dataset",
        &dataset,
        "--dtext",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        ImageFeatureSet::len(&Cache::open(&out.join("images")).unwrap()),
        2
    );
    assert_eq!(Cache::open(&out.join("texts")).unwrap().len(), 6);

    // Text distillation from the cache, starting from CLIP's embeddings (fixture width 8).
    let student = tmp.path().join("student");
    let mut distill = vec!["train", "--stage", "distill-text", "--data"];
    let data_spec = format!("cache:{}", out.display());
    let tokenizer = tmp.path().join("clip");
    distill.extend([
        data_spec.as_str(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
        "--embeddings-from",
        &model,
        "--epochs",
        "0",
        "--out",
        student.to_str().unwrap(),
    ]);
    let narrow = spikeclip(&distill);
    assert!(!narrow.status.success());
    let err = String::from_utf8_lossy(&narrow.stderr);
    assert!(
        err.contains("[49408, 8]") && err.contains("[49408, 64]"),
        "{err}"
    );
    distill.extend(["--set", "text.width=8"]);
    let run = spikeclip(&distill);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ours =
        candle_core::safetensors::load(student.join("model.safetensors"), &Device::Cpu).unwrap();
    let clip =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let table = |map: &std::collections::HashMap<String, candle_core::Tensor>, name: &str| {
        map[name]
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(
        table(&ours, "text.clip_embedding.token_embedding.weight"),
        table(&clip, "text_model.embeddings.token_embedding.weight")
    );
    let positions = table(&clip, "text_model.embeddings.position_embedding.weight");
    assert_eq!(
        table(&ours, "text.clip_embedding.position_embedding.weight"),
        positions[..20 * 8]
    );
}
