//! `spikeclip import` on every form of the authors' checkpoints in `tests/fixtures/encoders`
//! (scripts/encoder_fixtures.py), then `embed --model spikeclip:DIR` against the features and
//! spikes their PyTorch model gave, and `eval`, `classify` and `energy` on the result.

mod common;
use common::{assert_success, max_abs_diff};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

/// `--set`s that turn the paper preset into the fixture's size (fixtures/encoders/config.json).
const FIXTURE_SIZE: [&str; 8] = [
    "out_dim=16",
    "image.embed_dim=32",
    "image.num_heads=4",
    "image.depth=1",
    "text.vocab_size=30",
    "text.max_positions=24",
    "text.width=4",
    "text.hidden=32",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/encoders")
        .join(name)
}

fn spikeclip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A CLIP-format BPE tokenizer (vocab.json + merges.txt) small enough for the fixture's
/// 30-token vocabulary.
fn small_tokenizer(dir: &Path) -> PathBuf {
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    let vocab = serde_json::json!({
        "a": 0, "c": 1, "t": 2, "a</w>": 3, "t</w>": 4, "ca": 5, "cat</w>": 6,
        "<|startoftext|>": 7, "<|endoftext|>": 8,
    });
    std::fs::write(tok.join("vocab.json"), vocab.to_string()).unwrap();
    std::fs::write(tok.join("merges.txt"), "#version: 0.2\nc a\nca t</w>\n").unwrap();
    tok
}

/// Runs `spikeclip import` with the fixture's size; `image`/`text` are fixture file names.
fn import(image: &str, text: Option<&str>, tokenizer: &Path, out: &Path) -> Output {
    let (image, text) = (fixture(image), text.map(fixture));
    let mut args = vec![
        "import".to_string(),
        "--image-encoder".into(),
        image.to_string_lossy().into_owned(),
        "--preset".into(),
        "paper".into(),
        "--tokenizer".into(),
        tokenizer.to_string_lossy().into_owned(),
        "--out".into(),
        out.to_string_lossy().into_owned(),
    ];
    if let Some(t) = text {
        args.extend(["--text-encoder".into(), t.to_string_lossy().into_owned()]);
    }
    for s in FIXTURE_SIZE {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spikeclip(&args)
}

fn save(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

/// The fixture's inputs as `embed` reads them: `pixel_values` and the file's only tensor.
fn inputs(dir: &Path, io: &HashMap<String, Tensor>) -> (PathBuf, PathBuf) {
    let (px, ids) = (dir.join("pixels.safetensors"), dir.join("ids.safetensors"));
    save(&px, &[("pixel_values", io["pixels"].clone())]);
    save(&ids, &[("tokens", io["ids"].clone())]);
    (px, ids)
}

/// `embed --model spikeclip:CKPT` on the fixture's inputs, returning what it wrote.
fn embed(ckpt: &Path, px: &Path, ids: &Path, dense: bool) -> HashMap<String, Tensor> {
    let out = ckpt.with_extension("embed.safetensors");
    let model = format!("spikeclip:{}", ckpt.display());
    let mut args = vec![
        "embed",
        "--model",
        &model,
        "--pixels",
        px.to_str().unwrap(),
        "--ids",
        ids.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    if dense {
        args.push("--dense");
    }
    assert_success(&spikeclip(&args));
    candle_core::safetensors::load(&out, &Device::Cpu).unwrap()
}

/// Features within 1e-4 of PyTorch's and, for every LIF layer, the same spikes per step.
fn assert_matches_pytorch(got: &HashMap<String, Tensor>, io: &HashMap<String, Tensor>) {
    for f in ["image_features", "text_features"] {
        let diff = max_abs_diff(&got[f], &io[f]);
        assert!(diff < 1e-4, "{f} differ by {diff}");
    }
    let layers: Vec<&String> = io.keys().filter(|k| k.contains("_spikes.")).collect();
    assert_eq!(layers.len(), 11 + 2, "the fixture's LIF layers");
    for layer in layers {
        let want = io[layer]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        let ours = got
            .get(layer)
            .unwrap_or_else(|| panic!("embed wrote no {layer}"))
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(ours, want, "spikes per step of {layer}");
    }
}

#[test]
fn every_form_of_the_authors_checkpoints_imports_and_embeds_as_pytorch_ran_it() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let io = candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu).unwrap();
    let (px, ids) = inputs(dir.path(), &io);
    let forms = [
        ("image.pth", "text.pth.tar"),
        ("image_plain.pth", "text_transformers.pth"),
        ("image_wrapped.pth.tar", "text.pth.tar"),
    ];
    for (i, (image, text)) in forms.into_iter().enumerate() {
        let ckpt = dir.path().join(format!("ckpt{i}"));
        let out = import(image, Some(text), &tok, &ckpt);
        assert_success(&out);
        let got = embed(&ckpt, &px, &ids, false);
        assert_matches_pytorch(&got, &io);
        assert_eq!(
            got["input_ids"].to_vec2::<i64>().unwrap(),
            io["ids"].to_vec2::<i64>().unwrap()
        );
    }
    let dense = embed(&dir.path().join("ckpt0"), &px, &ids, true);
    assert_matches_pytorch(&dense, &io);
}

#[test]
fn an_imported_checkpoint_runs_eval_classify_and_energy() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let ckpt = dir.path().join("ckpt");
    assert_success(&import("image.pth", Some("text.pth.tar"), &tok, &ckpt));
    let ckpt_s = ckpt.to_str().unwrap();
    let json = dir.path().join("eval.json");
    assert_success(&spikeclip(&[
        "eval",
        "--checkpoint",
        ckpt_s,
        "--json",
        json.to_str().unwrap(),
    ]));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(rows[0]["images"].as_u64().unwrap() > 0, "{rows}");
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/rgb_32x32.png");
    let out = spikeclip(&[
        "classify",
        "--checkpoint",
        ckpt_s,
        "--image",
        image.to_str().unwrap(),
        "--labels",
        "cat,ca",
    ]);
    assert_success(&out);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("% ") && printed.contains("cat"),
        "{printed}"
    );
    let energy = dir.path().join("energy");
    assert_success(&spikeclip(&[
        "energy",
        "--checkpoint",
        ckpt_s,
        "--labels",
        "cat,ca",
        "--samples",
        "4",
        "--out",
        energy.to_str().unwrap(),
    ]));
    assert!(energy.join("energy.json").exists());
}

#[test]
fn import_lists_every_problem_of_both_files_in_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let out_dir = dir.path().join("never");
    // The image file as the text encoder: every text key is missing, every image key unexpected.
    let out = import("image.pth", Some("image_plain.pth"), &tok, &out_dir);
    assert!(!out.status.success());
    let err = stderr(&out);
    for want in [
        "image_plain.pth does not fit the model",
        "missing text.fc1.weight [32, 80]",
        "missing text.clip_embedding.token_embedding.weight [30, 4]",
        "unexpected text.patch_embed.block0_conv.weight",
    ] {
        assert!(err.contains(want), "no {want:?} in: {err}");
    }
    assert!(!out_dir.exists(), "nothing is written on error");
    // A wrong size: wrong-shaped keys of both files in the one error.
    let wrong = dir.path().join("wrong");
    let mut args: Vec<String> = ["import", "--image-encoder"].map(String::from).to_vec();
    args.push(fixture("image.pth").to_string_lossy().into_owned());
    args.extend([
        "--text-encoder".into(),
        fixture("text.pth.tar").to_string_lossy().into_owned(),
    ]);
    args.extend(["--tokenizer".into(), tok.to_string_lossy().into_owned()]);
    args.extend(["--out".into(), wrong.to_string_lossy().into_owned()]);
    for s in FIXTURE_SIZE {
        args.extend(["--set".into(), s.into()]);
    }
    args.extend(["--set".into(), "out_dim=8".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = stderr(&spikeclip(&args));
    for want in [
        "image.pth does not fit",
        "image.proj.weight: file has [16, 32], model expects [8, 32]",
        "text.pth.tar does not fit",
        "text.fc2.weight: file has [16, 32], model expects [8, 32]",
    ] {
        assert!(err.contains(want), "no {want:?} in: {err}");
    }
}

#[test]
fn a_tokenizer_larger_than_the_text_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = import("image.pth", None, Path::new("world"), &dir.path().join("c"));
    let err = stderr(&out);
    assert!(
        err.contains("--tokenizer world") && err.contains("text.vocab_size is 30"),
        "{err}"
    );
}

#[test]
fn embed_names_the_file_and_the_problem_of_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(dir.path());
    let ckpt = dir.path().join("ckpt");
    assert_success(&import("image.pth", Some("text.pth.tar"), &tok, &ckpt));
    let model = format!("spikeclip:{}", ckpt.display());
    let dev = Device::Cpu;
    let bad = dir.path().join("bad.safetensors");
    let cases: [(&str, Vec<(&str, Tensor)>, &str); 5] = [
        (
            "--pixels",
            vec![(
                "pixel_values",
                Tensor::zeros((2, 3, 16, 16), DType::F32, &dev).unwrap(),
            )],
            "pixels must be [N, 3, 32, 32] with N > 0, not [2, 3, 16, 16]",
        ),
        (
            "--pixels",
            vec![(
                "pixel_values",
                Tensor::zeros((2, 3, 32, 32), DType::F16, &dev).unwrap(),
            )],
            "pixels must be f32, not F16",
        ),
        (
            "--pixels",
            vec![
                (
                    "a",
                    Tensor::zeros((2, 3, 32, 32), DType::F32, &dev).unwrap(),
                ),
                (
                    "b",
                    Tensor::zeros((2, 3, 32, 32), DType::F32, &dev).unwrap(),
                ),
            ],
            "no tensor named pixel_values and not exactly one tensor (it holds a, b)",
        ),
        (
            "--ids",
            vec![(
                "input_ids",
                Tensor::zeros((2, 20), DType::F32, &dev).unwrap(),
            )],
            "token ids must be integers, not F32",
        ),
        (
            "--ids",
            vec![("input_ids", Tensor::full(30i64, (1, 20), &dev).unwrap())],
            "token id 30 is outside the text encoder's vocabulary of 30",
        ),
    ];
    for (flag, tensors, want) in cases {
        save(&bad, &tensors);
        let out = spikeclip(&[
            "embed",
            "--model",
            &model,
            flag,
            bad.to_str().unwrap(),
            "--out",
            dir.path().join("e.safetensors").to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("bad.safetensors") && err.contains(want),
            "{flag}: no {want:?} in: {err}"
        );
    }
}
