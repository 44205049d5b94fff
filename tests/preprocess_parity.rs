//! Preprocessing parity with transformers' PIL-backend CLIPImageProcessor, on images that need
//! upscaling, downscaling, non-square crops, grey, alpha and palette transparency, and a config
//! whose crop is larger than its resize (zero padding). Fixtures: scripts/preprocess_fixtures.py.

mod common;
use common::max_abs_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use spikeclip::teacher::clip::ClipModel;
use spikeclip::teacher::preprocess::{self, convert_rgb, Preprocessor};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("preprocess/reference.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn image_paths() -> Vec<PathBuf> {
    let text = std::fs::read_to_string(fixtures().join("preprocess/inputs.json")).unwrap();
    let inputs: serde_json::Value = serde_json::from_str(&text).unwrap();
    inputs["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| fixtures().join("preprocess").join(n.as_str().unwrap()))
        .collect()
}

fn clip_preprocessor() -> Preprocessor {
    Preprocessor::from_file(&fixtures().join("clip/preprocessor_config.json")).unwrap()
}

fn crop_of(pre: &Preprocessor, path: &Path) -> Vec<u8> {
    pre.crop(&convert_rgb(&image::open(path).unwrap()))
}

/// Compares every image's 8-bit crop with the processor's, naming the images that differ.
fn assert_crops_equal(pre: &Preprocessor, reference: &Tensor) {
    let mut wrong = Vec::new();
    for (i, path) in image_paths().iter().enumerate() {
        let theirs = reference.get(i).unwrap().flatten_all().unwrap();
        let theirs = theirs.to_vec1::<u8>().unwrap();
        let ours = crop_of(pre, path);
        assert_eq!(ours.len(), theirs.len());
        let differ = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        let most = ours.iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b)).max();
        if differ > 0 {
            wrong.push(format!(
                "{}: {differ} values, by up to {most:?}",
                path.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "crops differ:\n{}", wrong.join("\n"));
}

#[test]
fn crops_equal_pil_backend_exactly() {
    assert_crops_equal(&clip_preprocessor(), &reference()["pixels_u8"]);
}

#[test]
fn crops_larger_than_the_resize_pad_as_transformers() {
    let pre =
        Preprocessor::from_file(&fixtures().join("preprocess/preprocessor_padded.json")).unwrap();
    assert_eq!(pre.size.shortest_edge, 27);
    assert_crops_equal(&pre, &reference()["padded_pixels_u8"]);
}

/// transformers' pixel values, decoded from the 8-bit crop the fixture stores them as
/// (scripts/preprocess_fixtures.py checks this decoding reproduces them bit for bit).
fn reference_pixel_values(pre: &Preprocessor) -> Tensor {
    let u8s = reference()["pixels_u8"].to_dtype(DType::F64).unwrap();
    let rescaled = (u8s * pre.rescale_factor)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let per_channel = |v: [f32; 3]| Tensor::new(&v, &Device::Cpu).unwrap().reshape((1, 3, 1, 1));
    rescaled
        .broadcast_sub(&per_channel(pre.image_mean).unwrap())
        .unwrap()
        .broadcast_div(&per_channel(pre.image_std).unwrap())
        .unwrap()
}

fn our_pixel_values(pre: &Preprocessor) -> Tensor {
    let pixels = image_paths().iter().map(|p| pre.load(p).unwrap()).collect();
    preprocess::batch(pixels, 32, 32, &Device::Cpu).unwrap()
}

#[test]
fn pixel_values_within_one_8_bit_step() {
    let pre = clip_preprocessor();
    let (ours, theirs) = (our_pixel_values(&pre), reference_pixel_values(&pre));
    for c in 0..3 {
        let step = 1.0 / 255.0 / pre.image_std[c];
        let channel = |t: &Tensor| t.get_on_dim(1, c).unwrap();
        let worst = max_abs_diff(&channel(&ours), &channel(&theirs));
        assert!(
            worst <= step,
            "channel {c}: off by {worst} > one step {step}"
        );
    }
}

#[test]
fn image_features_match_transformers_from_the_files() {
    let model = ClipModel::load(&fixtures().join("clip"), &Device::Cpu).unwrap();
    let ours = model
        .image_features(&our_pixel_values(&clip_preprocessor()))
        .unwrap();
    let diff = max_abs_diff(&ours, &reference()["image_features"]);
    assert!(diff < 1e-4, "image features differ by {diff}");
}

#[test]
fn unsupported_steps_are_named_with_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    for (json, problem) in [
        (r#"{"resample": 2}"#, "resample 2"),
        (r#"{"do_center_crop": false}"#, "do_center_crop false"),
        (r#"{"size": {"height": 5, "width": 5}}"#, "not a CLIP"),
    ] {
        std::fs::write(&path, json).unwrap();
        let err = format!("{:#}", Preprocessor::from_file(&path).err().unwrap());
        assert!(
            err.contains("preprocessor_config.json") && err.contains(problem),
            "{err}"
        );
    }
}

#[test]
fn older_configs_with_bare_sizes_read_as_transformers_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    // openai/clip-vit-base-patch32's file: `size` is the shortest edge, `crop_size` a square.
    std::fs::write(&path, r#"{"crop_size": 224, "resample": 3, "size": 200}"#).unwrap();
    let pre = Preprocessor::from_file(&path).unwrap();
    assert_eq!(pre.size.shortest_edge, 200);
    assert_eq!((pre.crop_size.height, pre.crop_size.width), (224, 224));
}
