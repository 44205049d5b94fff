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

/// Tokenizer and text tower together: the reference's first row is "a photo of a cat.".
#[test]
fn teacher_embeds_sentences_like_transformers() {
    use spikeclip::teacher::{clip::ClipTeacher, tokenizer::ClipTokenizer, TextTeacher};
    let dev = Device::Cpu;
    let gz = ["../shared/data", "/work/shared/data"]
        .map(|d| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(d)
                .join("bpe_simple_vocab_16e6.txt.gz")
        })
        .into_iter()
        .find(|p| p.exists())
        .unwrap();
    let teacher = ClipTeacher {
        clip: Clip::load(format!("{FIX}/clip_tiny").as_ref(), &dev).unwrap(),
        tokenizer: ClipTokenizer::from_bpe_gz(&gz).unwrap(),
        embed_dim: 6,
        device: dev.clone(),
    };
    let refs = load(format!("{FIX}/clip_tiny_ref.safetensors"), &dev).unwrap();
    let ours = teacher
        .text_features(&["a photo of a cat.".to_string()])
        .unwrap();
    let want = refs["text_features"].narrow(0, 0, 1).unwrap();
    let d = (ours - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "differ by {d}");
}
