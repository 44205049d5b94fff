//! The training losses against PyTorch (fixture from scripts/loss_fixtures.py): values and
//! gradients of cosine distillation and of the dual loss, with and without a logit scale.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use spikeclip::train::loss::{cosine_distillation, dual_loss, DualLossConfig};

fn fixture() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/loss_torch.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    let d: f32 = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-5, "{what}: max diff {d}");
}

#[test]
fn cosine_distillation_matches_torch() {
    let f = fixture();
    let student = Var::from_tensor(&f["student"]).unwrap();
    let loss = cosine_distillation(student.as_tensor(), &f["teacher"]).unwrap();
    assert!((scalar(&loss) - scalar(&f["distill"])).abs() < 1e-6);
    let grads = loss.backward().unwrap();
    assert_close(
        grads.get(student.as_tensor()).unwrap(),
        &f["distill_grad"],
        "distill grad",
    );
}

#[test]
fn dual_loss_matches_torch() {
    let f = fixture();
    let labels = f["labels"].to_dtype(DType::U32).unwrap();
    for (tag, logit_scale) in [("noscale", None), ("scale", Some(10.0))] {
        let student = Var::from_tensor(&f["student"]).unwrap();
        let cfg = DualLossConfig {
            lambda: 0.7,
            logit_scale,
            eps: 1e-10,
        };
        let loss = dual_loss(
            student.as_tensor(),
            &f["classes"],
            &f["teacher_probs"],
            &labels,
            &cfg,
        )
        .unwrap();
        for (part, t) in [("ce", &loss.ce), ("kl", &loss.kl), ("total", &loss.total)] {
            let (got, want) = (scalar(t), scalar(&f[&format!("{tag}.{part}")]));
            assert!((got - want).abs() < 1e-5, "{tag} {part}: {got} vs {want}");
        }
        let grads = loss.total.backward().unwrap();
        assert_close(
            grads.get(student.as_tensor()).unwrap(),
            &f[&format!("{tag}.grad")],
            tag,
        );
    }
}
