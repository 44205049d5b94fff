//! Zero-shot classification: a class is represented by the text embedding of its name, averaged
//! over prompt templates (prompt ensembling, as CLIP evaluates), and an image takes the class
//! whose embedding is most cosine-similar to its own.

use candle_core::{DType, Result, Tensor, D};

/// Rows scaled to unit L2 norm (a zero row stays zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// Every sentence of each class: each of its names in each template (`{}` is the name).
pub fn class_prompts(classes: &[Vec<String>], templates: &[String]) -> Vec<Vec<String>> {
    classes
        .iter()
        .map(|names| {
            names
                .iter()
                .flat_map(|name| templates.iter().map(move |t| t.replace("{}", name)))
                .collect()
        })
        .collect()
}

/// Prompt-ensembled class embeddings `[C, D]`, unit norm: the normalised mean over a class's
/// sentences of their normalised text features. `encode` maps sentences to `[N, D]` features.
pub fn class_embeddings(
    prompts: &[Vec<String>],
    mut encode: impl FnMut(&[String]) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    let mut rows = Vec::with_capacity(prompts.len());
    for (c, sentences) in prompts.iter().enumerate() {
        anyhow::ensure!(!sentences.is_empty(), "class {c} has no prompt sentences");
        let feats = l2_normalize(&encode(sentences)?.to_dtype(DType::F32)?)?;
        rows.push(feats.mean(0)?);
    }
    anyhow::ensure!(!rows.is_empty(), "no classes to embed");
    Ok(l2_normalize(&Tensor::stack(&rows, 0)?)?)
}

/// Cosine similarities `[B, C]` between image features `[B, D]` and unit class embeddings.
pub fn cosine_logits(image_features: &Tensor, class_embeddings: &Tensor) -> Result<Tensor> {
    l2_normalize(image_features)?.matmul(&class_embeddings.t()?)
}

/// Top-1 and top-5 accuracy counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct TopK {
    pub correct1: usize,
    pub correct5: usize,
    pub total: usize,
}

impl TopK {
    /// Counts the rows of `logits` `[B, C]` whose true label ranks first, or in the first five.
    pub fn from_logits(logits: &Tensor, labels: &[u32]) -> anyhow::Result<Self> {
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        anyhow::ensure!(
            rows.len() == labels.len(),
            "{} logit rows for {} labels",
            rows.len(),
            labels.len()
        );
        let mut acc = Self::default();
        for (row, &label) in rows.iter().zip(labels) {
            let label = label as usize;
            anyhow::ensure!(
                label < row.len(),
                "label {label} out of {} classes",
                row.len()
            );
            // Rank = number of classes scoring strictly higher than the true one.
            let rank = row.iter().filter(|&&s| s > row[label]).count();
            acc.correct1 += (rank == 0) as usize;
            acc.correct5 += (rank < 5) as usize;
            acc.total += 1;
        }
        Ok(acc)
    }

    pub fn merge(self, other: Self) -> Self {
        Self {
            correct1: self.correct1 + other.correct1,
            correct5: self.correct5 + other.correct5,
            total: self.total + other.total,
        }
    }

    pub fn top1(&self) -> f64 {
        self.correct1 as f64 / self.total.max(1) as f64
    }

    pub fn top5(&self) -> f64 {
        self.correct5 as f64 / self.total.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn prompts_cover_every_name_and_template() {
        let classes = vec![
            vec!["cat".to_string(), "kitty".to_string()],
            vec!["dog".to_string()],
        ];
        let templates = vec!["a {}.".to_string(), "a photo of a {}.".to_string()];
        let p = class_prompts(&classes, &templates);
        assert_eq!(
            p[0],
            [
                "a cat.",
                "a photo of a cat.",
                "a kitty.",
                "a photo of a kitty."
            ]
        );
        assert_eq!(p[1].len(), 2);
    }

    #[test]
    fn ensembling_averages_normalised_features() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Class 0's two sentences embed to (3, 0) and (0, 1): normalised mean is (1, 1) / sqrt 2.
        let prompts = vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["c".to_string()],
        ];
        let emb = class_embeddings(&prompts, |s| {
            let rows: Vec<f32> = s
                .iter()
                .flat_map(|t| match t.as_str() {
                    "a" => [3.0, 0.0],
                    "b" => [0.0, 1.0],
                    _ => [0.0, -2.0],
                })
                .collect();
            Ok(Tensor::from_vec(rows, (s.len(), 2), &dev)?)
        })?;
        let e: Vec<Vec<f32>> = emb.to_vec2()?;
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((e[0][0] - h).abs() < 1e-6 && (e[0][1] - h).abs() < 1e-6);
        assert_eq!(e[1], vec![0.0, -1.0]);
        Ok(())
    }

    #[test]
    fn top_k_counts_ranks() -> anyhow::Result<()> {
        let logits = Tensor::new(
            &[
                [0.9f32, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
                [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
            ],
            &Device::Cpu,
        )?;
        // Ranks of the true labels: 0, 6, 4.
        let acc = TopK::from_logits(&logits, &[0, 0, 4])?;
        assert_eq!((acc.correct1, acc.correct5, acc.total), (1, 2, 3));
        assert!(TopK::from_logits(&logits, &[0, 9, 1]).is_err());
        Ok(())
    }
}
