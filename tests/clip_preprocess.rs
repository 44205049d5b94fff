use candle_core::{safetensors::load, Device};
use spikeclip::teacher::preprocess::{student_input, PreprocessConfig};

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Against transformers' CLIPImageProcessor and F.interpolate
/// (scripts/clip_preprocess_fixtures.py).
#[test]
fn preprocessing_matches_transformers() {
    let refs = load(format!("{FIX}/clip_preprocess.safetensors"), &Device::Cpu).unwrap();
    let cfg = PreprocessConfig::clip(24);
    for name in ["rgb_40x30", "gray_23x51", "rgba_64x64", "rgb_17x20"] {
        let image = image::open(format!("{FIX}/pre_{name}.png")).unwrap();
        let ours = cfg.pixels(&image);
        let want = refs[&format!("{name}.pixels")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let d = max_diff(&ours, &want);
        assert!(d < 2e-2, "{name}: pixel values differ by {d}");
        // Student input from the reference pixels isolates the interpolation.
        let student = student_input(&want, 24);
        let want = refs[&format!("{name}.student")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let d = max_diff(&student, &want);
        assert!(d < 1e-5, "{name}: student input differs by {d}");
    }
}
