//! `spikeclip embed` and `spikeclip cache` end to end, on the tiny fixture CLIP.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use spikeclip::data::cache::Cache;
use spikeclip::data::ImageFeatureSet;

use common::{clip_dir, clip_fixture_dir as fixture_dir};

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
    common::assert_success(&run);
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

/// Caches a two-class image folder ("a", "b") and the D-text of `prompts_json` with the
/// fixture CLIP under `root`; the `clip:DIR` spec, the cache and the prompts file.
fn cached(root: &Path, prompts_json: &str) -> (String, PathBuf, PathBuf) {
    let model = format!("clip:{}", clip_dir(root).display());
    let data = root.join("data");
    for class in ["a", "b"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        std::fs::copy(
            fixture_dir().join("rgb_48x40.png"),
            data.join(class).join("x.png"),
        )
        .unwrap();
    }
    let prompts = root.join("prompts.json");
    std::fs::write(&prompts, prompts_json).unwrap();
    let out = root.join("cache");
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
    common::assert_success(&run);
    (model, out, prompts)
}

#[test]
fn cache_command_caches_a_folder_and_dtext() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, out, _) = cached(
        tmp.path(),
        r#"{"datasets": {"d": {"classes": ["a", ["b", "bee"]], "templates": ["a {}.", "{}"]}}}"#,
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
    common::assert_success(&run);
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

#[test]
fn reproduce_on_real_data_pretrains_fine_tunes_and_reports_tables_2_3_4_and_8() {
    let tmp = tempfile::tempdir().unwrap();
    let pool: Vec<String> = (0..16).map(|i| format!("\"thing {i}\"")).collect();
    let (model, cache, prompts) = cached(
        tmp.path(),
        &format!(
            r#"{{"datasets": {{"d": {{"classes": ["a", "b"], "templates": ["a {{}}."]}},
                "e": {{"classes": ["x", "y"], "templates": ["{{}}"]}},
                "other": {{"classes": [{}], "templates": ["{{}}"]}}}}}}"#,
            pool.join(", ")
        ),
    );
    let out = tmp.path().join("repro");
    let data = format!("cache:{}", cache.display());
    let eval = format!("d=cache:{}", cache.display());
    let other_eval = format!("e=cache:{}", cache.display());
    let mut args = vec![
        "reproduce",
        "--teacher",
        &model,
        "--data",
        &data,
        "--eval",
        &eval,
        "--eval",
        &other_eval,
        "--finetune",
        &eval,
        "--finetune-epochs",
        "1",
        "--finetune-batch-size",
        "2",
        "--lambdas",
        "0,1",
        "--prompts",
        prompts.to_str().unwrap(),
        "--preset",
        "tiny",
        "--set",
        "text.width=8",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--label-seeds",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = spikeclip(&args);
    common::assert_success(&run);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let tables = report["tables"].as_array().unwrap();
    let ids: Vec<&str> = tables.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["table2", "table3", "table4", "table8"]);
    let rows = |t: &serde_json::Value| -> Vec<String> {
        t["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(rows(&tables[0]).len(), 6);
    assert_eq!(
        rows(&tables[0])[..3],
        ["CLIP (teacher) on d", "SpikeCLIP on d", "ScratchCLIP on d"]
    );
    assert_eq!(tables[0]["columns"].as_array().unwrap().len(), 8);
    assert_eq!(
        tables[1]["columns"],
        serde_json::json!(["d (fine-tuned on)", "e"])
    );
    assert_eq!(
        rows(&tables[1]),
        [
            "SpikeCLIP (full recipe)",
            "w/o pre-training",
            "w/o fine-tuning",
            "w/o KL (lambda = 0)",
            "ScratchCLIP (ANN twin)"
        ]
    );
    assert_eq!(rows(&tables[2]), ["lambda = 0", "lambda = 1"]);
    assert_eq!(rows(&tables[3]), ["d", "e"]);
    for t in tables {
        for r in t["rows"].as_array().unwrap() {
            for c in r["cells"].as_array().unwrap() {
                let v = c["mean"].as_f64().unwrap();
                assert!((0.0..=100.0).contains(&v), "{}: {v}", t["id"]);
            }
        }
    }
    // Distractors and replacements come from the other datasets, never the originals.
    for chosen in report["chosen_labels"].as_array().unwrap() {
        let originals = match chosen["setting"].as_str().unwrap().starts_with("d:") {
            true => ["a", "b"],
            false => ["x", "y"],
        };
        for label in chosen["labels"].as_array().unwrap() {
            let label = label.as_str().unwrap();
            let new = label.split(" -> ").last().unwrap();
            assert!(!originals.contains(&new), "{label}");
        }
    }
    let judged: Vec<&str> = report["claims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["table"].as_str().unwrap())
        .collect();
    assert!(
        judged.contains(&"Table 2") && judged.contains(&"Table 8"),
        "{judged:?}"
    );
    // The students are checkpoints the other commands read, started from CLIP's embeddings.
    let weights = candle_core::safetensors::load(
        out.join("spikeclip").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        weights["text.clip_embedding.token_embedding.weight"].dims(),
        &[49408, 8]
    );
    // A rerun with --resume finds every stage finished.
    args.push("--resume");
    let again = spikeclip(&args);
    common::assert_success(&again);
    // What real data cannot run is refused by name.
    args.extend(["--only", "table6"]);
    let refused = spikeclip(&args);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("table6") && err.contains("built-in world"),
        "{err}"
    );
}
