//! The recipe's two objectives: feature distillation (alignment pre-training) and the
//! dual loss of fine-tuning, which learns the labels while a KL term keeps the student's class
//! distribution close to CLIP's so zero-shot ability on other labels is not forgotten.

use candle_core::{DType, Result, Tensor, D};

/// Rows scaled to unit L2 norm (a tiny floor keeps an all-zero row finite).
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Mean over the batch of `1 - cos(student_i, teacher_i)`; both `[B, D]`.
pub fn cosine_distillation(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let cos = (normalize(student)? * normalize(teacher)?)?.sum(D::Minus1)?;
    cos.affine(-1.0, 1.0)?.mean_all()
}

/// Zero-shot logits: cosine similarity of each feature `[B, D]` with each class embedding
/// `[C, D]`, times `logit_scale` when given. Gives `[B, C]`.
pub fn cosine_logits(
    features: &Tensor,
    class_embeds: &Tensor,
    logit_scale: Option<f64>,
) -> Result<Tensor> {
    let logits = normalize(features)?.matmul(&normalize(class_embeds)?.t()?)?;
    match logit_scale {
        Some(s) => logits * s,
        None => Ok(logits),
    }
}

/// Settings of the dual loss.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DualLossConfig {
    /// Weight of the KL term.
    pub lambda: f64,
    /// Multiplier of the cosine logits; `None` (the authors' choice) uses raw cosines.
    pub logit_scale: Option<f64>,
    /// Added to both distributions inside the log so that a zero probability stays finite.
    pub eps: f64,
}

impl Default for DualLossConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            logit_scale: None,
            eps: 1e-10,
        }
    }
}

/// The dual loss and its parts (scalars), kept apart for logging.
#[derive(Debug, Clone)]
pub struct DualLoss {
    pub total: Tensor,
    pub ce: Tensor,
    pub kl: Tensor,
}

/// `CE(logits, labels) + lambda * KL(p_teacher || p_student)`, both means over the batch.
///
/// Student logits are the cosine logits of `student_features` `[B, D]` against
/// `class_embeds` `[C, D]`; `teacher_probs` `[B, C]` is CLIP's class distribution for the same
/// images (constant: no gradient flows into it). The KL term is
/// `sum_c p_t * log((p_t + eps) / (p_s + eps))`, the paper's eq. 5 with its epsilon; the source
/// was not reachable when this was written, so the placement of epsilon (inside both logs'
/// arguments) is our reading, documented here.
pub fn dual_loss(
    student_features: &Tensor,
    class_embeds: &Tensor,
    teacher_probs: &Tensor,
    labels: &Tensor,
    cfg: &DualLossConfig,
) -> Result<DualLoss> {
    let logits = cosine_logits(student_features, class_embeds, cfg.logit_scale)?;
    let ce = candle_nn::loss::cross_entropy(&logits, &labels.to_dtype(DType::U32)?)?;
    // `softmax_last_dim` is a fused op without a backward pass; this one is differentiable.
    let p_student = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let p_teacher = teacher_probs.detach();
    let ratio = ((&p_teacher + cfg.eps)?.log()? - (p_student + cfg.eps)?.log()?)?;
    let kl = (p_teacher * ratio)?.sum(D::Minus1)?.mean_all()?;
    let total = (&ce + (&kl * cfg.lambda)?)?;
    Ok(DualLoss { total, ce, kl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn fixture() -> (Var, Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let feats = Var::from_vec(vec![0.3f32, -1.0, 0.5, 2.0, 0.1, -0.4], (2, 3), &dev).unwrap();
        let classes = Tensor::new(
            &[
                [1f32, 0., 0.],
                [0., 1., 0.],
                [0.5, 0.5, 1.0],
                [-1., 0.2, 0.3],
            ],
            &dev,
        )
        .unwrap();
        let teacher = Tensor::new(&[[0.1f32, 0.2, 0.3, 0.4], [0.7, 0.1, 0.2, 0.0]], &dev).unwrap();
        let labels = Tensor::new(&[2u32, 0], &dev).unwrap();
        (feats, classes, teacher, labels)
    }

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
    }

    /// Plain-f64 softmax of cosine logits, independent of the tensor code.
    fn hand_probs(feats: &[Vec<f64>], classes: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let unit = |v: &Vec<f64>| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / n).collect::<Vec<_>>()
        };
        feats
            .iter()
            .map(|f| {
                let f = unit(f);
                let logits: Vec<f64> = classes
                    .iter()
                    .map(|c| unit(c).iter().zip(&f).map(|(a, b)| a * b).sum())
                    .collect();
                let z: f64 = logits.iter().map(|l| l.exp()).sum();
                logits.iter().map(|l| l.exp() / z).collect()
            })
            .collect()
    }

    #[test]
    fn lambda_zero_is_plain_cross_entropy() {
        let (feats, classes, teacher, labels) = fixture();
        let cfg = DualLossConfig {
            lambda: 0.0,
            ..Default::default()
        };
        let loss = dual_loss(feats.as_tensor(), &classes, &teacher, &labels, &cfg).unwrap();
        let probs = hand_probs(&rows(feats.as_tensor()), &rows(&classes));
        let ce = -(probs[0][2].ln() + probs[1][0].ln()) / 2.0;
        let total = loss.total.to_scalar::<f32>().unwrap() as f64;
        assert!((total - ce).abs() < 1e-6, "{total} vs {ce}");
    }

    #[test]
    fn kl_term_matches_hand_computation_and_gradients_flow() {
        let (feats, classes, teacher, labels) = fixture();
        let cfg = DualLossConfig {
            lambda: 0.7,
            ..Default::default()
        };
        let loss = dual_loss(feats.as_tensor(), &classes, &teacher, &labels, &cfg).unwrap();
        let ps = hand_probs(&rows(feats.as_tensor()), &rows(&classes));
        let pt = rows(&teacher);
        let kl: f64 = pt
            .iter()
            .zip(&ps)
            .map(|(t, s)| {
                t.iter()
                    .zip(s)
                    .map(|(t, s)| t * ((t + 1e-10) / (s + 1e-10)).ln())
                    .sum::<f64>()
            })
            .sum::<f64>()
            / 2.0;
        let got = loss.kl.to_scalar::<f32>().unwrap() as f64;
        assert!((got - kl).abs() < 1e-6, "{got} vs {kl}");
        let ce = loss.ce.to_scalar::<f32>().unwrap() as f64;
        let total = loss.total.to_scalar::<f32>().unwrap() as f64;
        assert!((total - (ce + 0.7 * kl)).abs() < 1e-6);
        let grads = loss.total.backward().unwrap();
        let g = grads
            .get(feats.as_tensor())
            .expect("features get a gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0 && norm.is_finite());
    }

    #[test]
    fn distillation_is_zero_for_parallel_and_two_for_opposite() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2., 3.], [0., -1., 0.5]], &dev).unwrap();
        let same = cosine_distillation(&a, &(&a * 3.0).unwrap()).unwrap();
        let opposite = cosine_distillation(&a, &a.neg().unwrap()).unwrap();
        assert!(same.to_scalar::<f32>().unwrap().abs() < 1e-6);
        assert!((opposite.to_scalar::<f32>().unwrap() - 2.0).abs() < 1e-6);
    }
}
