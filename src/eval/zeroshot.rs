//! Zero-shot classification from label names: a class is the text embedding of its names,
//! averaged over prompt templates (prompt ensembling, as CLIP evaluates), and an image takes the
//! class most cosine-similar to its own feature. The classifier is built from text alone, so the
//! same code scores the teacher, the spiking student and the ANN twin.

use anyhow::{ensure, Context};
use candle_core::{DType, Tensor, D};

use crate::data::prompts::DatasetPrompts;
use crate::train::loss::normalize;

/// Prompt ensembling: each class's embedding is the mean over its names and the templates of
/// the normalised text features, normalised again. `embed` maps sentences to `[N, D]`
/// features (a teacher's, or a student text encoder's). Gives `[C, D]`.
pub fn class_embeddings(
    prompts: &DatasetPrompts,
    mut embed: impl FnMut(&[String]) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    ensure!(!prompts.classes.is_empty(), "the label list is empty");
    ensure!(
        !prompts.templates.is_empty(),
        "the prompt template list is empty"
    );
    let rows = prompts
        .classes
        .iter()
        .enumerate()
        .map(|(i, names)| {
            ensure!(!names.is_empty(), "class {i} has no name");
            let texts = prompts.class_sentences(i);
            let features = embed(&texts)
                .with_context(|| format!("embedding the prompts of class {:?}", names[0]))?;
            Ok(normalize(&features)?.mean_keepdim(0)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(normalize(&Tensor::cat(&rows, 0)?)?)
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
            let rank = rank_of(row, label);
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

/// Where class `label` lands when `scores` are ranked as `torch.topk` and `argmax` rank them:
/// every higher score and every equal score of a lower class index comes first, and NaN
/// counts as the highest score. A tie is therefore a hit for one class only, so a model
/// whose logits do not depend on the image scores what argmax gives (1/C on balanced
/// labels), never 100 %.
pub fn rank_of(scores: &[f32], label: usize) -> usize {
    let key = |s: f32| (s.is_nan(), if s.is_nan() { 0.0 } else { s });
    let own = key(scores[label]);
    scores
        .iter()
        .enumerate()
        .filter(|&(j, &s)| {
            let other = key(s);
            other > own || (other == own && j < label)
        })
        .count()
}

/// Class indices from the highest score to the lowest, ties in class order: the order
/// [`rank_of`] gives, so the first is argmax's class.
pub fn ranked_classes(scores: &[f32]) -> Vec<usize> {
    // The ranks are a permutation: ties are broken by class index.
    let mut order = vec![0; scores.len()];
    for c in 0..scores.len() {
        order[rank_of(scores, c)] = c;
    }
    order
}

/// Class probabilities from cosine logits, as CLIP's softmax over classes: `[B, C]`.
pub fn class_probabilities(logits: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(logits, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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

    #[test]
    fn constant_logits_score_what_argmax_gives() -> anyhow::Result<()> {
        // Ten classes, every logit equal, labels balanced: argmax says class 0 for every row.
        let labels: Vec<u32> = (0..100).map(|i| i % 10).collect();
        let logits = Tensor::full(0.25f32, (100, 10), &Device::Cpu)?;
        let acc = TopK::from_logits(&logits, &labels)?;
        assert_eq!((acc.correct1, acc.correct5, acc.total), (10, 50, 100));
        let nan = Tensor::full(f32::NAN, (100, 10), &Device::Cpu)?;
        assert_eq!(TopK::from_logits(&nan, &labels)?, acc);
        Ok(())
    }

    #[test]
    fn partial_ties_go_to_the_lower_class_index() -> anyhow::Result<()> {
        let row = [0.1f32, 0.5, 0.5, 0.2, 0.5, 0.0, 0.0];
        assert_eq!(
            (0..7).map(|c| rank_of(&row, c)).collect::<Vec<_>>(),
            [4, 0, 1, 3, 2, 5, 6]
        );
        assert_eq!(ranked_classes(&row), [1, 2, 4, 3, 0, 5, 6]);
        // A NaN outranks every number, as in torch.argmax.
        assert_eq!(rank_of(&[1.0, f32::NAN, 2.0], 1), 0);
        assert_eq!(rank_of(&[1.0, f32::NAN, 2.0], 2), 1);
        let logits = Tensor::new(&[row, row], &Device::Cpu)?;
        let acc = TopK::from_logits(&logits, &[1, 2])?;
        assert_eq!((acc.correct1, acc.correct5), (1, 2));
        Ok(())
    }

    #[test]
    fn ensembling_averages_names_and_templates() {
        let prompts = DatasetPrompts {
            classes: vec![vec!["x".into(), "y".into()]],
            templates: vec!["{}".into()],
        };
        // "x" -> (1, 0), "y" -> (0, 3): unit vectors averaged, renormalised: (1, 1)/sqrt 2.
        let emb = class_embeddings(&prompts, |texts| {
            let flat: Vec<f32> = texts
                .iter()
                .flat_map(|t| if t == "x" { [1., 0.] } else { [0., 3.] })
                .collect();
            Ok(Tensor::from_vec(flat, (texts.len(), 2), &Device::Cpu)?)
        })
        .unwrap();
        let v = emb.to_vec2::<f32>().unwrap();
        assert!((v[0][0] - 0.5f32.sqrt()).abs() < 1e-6 && (v[0][1] - 0.5f32.sqrt()).abs() < 1e-6);
        let empty = DatasetPrompts {
            classes: vec![],
            templates: vec!["{}".into()],
        };
        let err = class_embeddings(&empty, |_| unreachable!()).unwrap_err();
        assert!(err.to_string().contains("label list is empty"));
    }
}
