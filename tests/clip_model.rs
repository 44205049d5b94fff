use candle_core::{safetensors::load, DType, Device};
use spikeclip::teacher::clip::Clip;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// Features of a tiny random transformers CLIPModel (scripts/clip_model_fixtures.py).
#[test]
fn features_match_transformers() {
    let dev = Device::Cpu;
    let clip = Clip::load(format!("{FIX}/clip_tiny").as_ref(), &dev).unwrap();
    let refs = load(format!("{FIX}/clip_tiny_ref.safetensors"), &dev).unwrap();
    let ids = refs["input_ids"].to_dtype(DType::U32).unwrap();
    let cases = [
        (clip.text_features(&ids).unwrap(), "text_features"),
        (
            clip.image_features(&refs["pixel_values"]).unwrap(),
            "image_features",
        ),
    ];
    for (ours, name) in cases {
        let d = (ours - &refs[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{name} differ by {d}");
    }
    assert_eq!(clip.token_embedding().dims(), &[49408, 8]);
}

#[test]
fn missing_checkpoint_is_named() {
    let err = format!(
        "{:#}",
        Clip::load("/nonexistent/clip".as_ref(), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(err.contains("/nonexistent/clip/config.json"), "{err}");
}
