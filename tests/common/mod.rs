//! Helpers shared by the integration tests.

// Every test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::Tensor;

/// A file of the shared read-only data, `../shared/data/NAME` beside the repository root (the
/// manifest's directory); a missing file fails the test with a message naming it.
#[track_caller]
pub fn shared_data(name: &str) -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "missing shared test data {}: the tests need ../shared/data/{name} beside the \
         repository root (CLIP's bpe_simple_vocab_16e6.txt.gz and clip_prompts.json)",
        path.display()
    );
    path
}

/// The tiny CLIP fixture (width 8, transformers' reference features beside it).
pub fn clip_fixture_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip"))
}

/// The fixture CLIP plus OpenAI's merges file, as a user's CLIP directory `root/clip`.
pub fn clip_dir(root: &std::path::Path) -> PathBuf {
    let dir = root.join("clip");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(clip_fixture_dir().join(f), dir.join(f)).unwrap();
    }
    let gz = shared_data("bpe_simple_vocab_16e6.txt.gz");
    std::fs::copy(gz, dir.join("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    dir
}

/// A two-class image folder under `root` (`ant/`, `bee/`), `per_class` 40x36 images each that
/// differ from one another, and one file, `bee/corrupt.png`, that is not an image.
pub fn image_folder(root: &std::path::Path, per_class: u8) {
    for (c, class) in ["ant", "bee"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(40, 36, |x, y| {
                image::Rgb([x as u8 * 6, y as u8 * 3 + i * 20, c as u8 * 90])
            });
            img.save(root.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(
        root.join("bee").join("corrupt.png"),
        b"\x89PNG\r\n\x1a\n garbage",
    )
    .unwrap();
}

/// Fails the test with the command's stderr unless it exited successfully.
#[track_caller]
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `spikeclip ARGS --out OUT`, which must succeed, and returns `OUT/report.json`.
pub fn report_of(args: &[&str], out: &std::path::Path) -> serde_json::Value {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_spikeclip"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert_success(&run);
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

/// Largest absolute elementwise difference of two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A fresh SpikeCLIP of the `tiny` preset with the world's tokenizer, saved in `dir/tiny`: a
/// checkpoint to load in a second, for tests of the commands that read one.
pub fn tiny_checkpoint(dir: &std::path::Path) -> std::path::PathBuf {
    use spikeclip::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
    use spikeclip::model::config::SpikeClipConfig;
    let config = SpikeClipConfig::preset("tiny").unwrap();
    let model = spikeclip::model::SpikeClip::new(&config, 3, &candle_core::Device::Cpu).unwrap();
    let card = ModelCard {
        kind: ModelKind::SpikeClip,
        config,
        tokenizer: TokenizerSpec::World,
    };
    let path = dir.join("tiny");
    checkpoint::save(&path, &model, &card).unwrap();
    path
}
