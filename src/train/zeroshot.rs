//! Zero-shot classification from label names: the classifier is built from text alone, so the
//! same code scores the teacher, the spiking student and the ANN baseline.

use anyhow::{ensure, Context};
use candle_core::{Tensor, D};

use super::loss::normalize;
use crate::data::prompts::DatasetPrompts;

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
            let texts: Vec<String> = names
                .iter()
                .flat_map(|n| prompts.templates.iter().map(move |t| t.replace("{}", n)))
                .collect();
            let features = embed(&texts)
                .with_context(|| format!("embedding the prompts of class {:?}", names[0]))?;
            Ok(normalize(&features)?.mean_keepdim(0)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(normalize(&Tensor::cat(&rows, 0)?)?)
}

/// Fraction of rows of `logits` `[B, C]` whose label is among the `k` highest scores.
pub fn topk_accuracy(logits: &Tensor, labels: &[u32], k: usize) -> anyhow::Result<f64> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    ensure!(
        rows.len() == labels.len(),
        "{} score rows for {} labels",
        rows.len(),
        labels.len()
    );
    ensure!(!rows.is_empty(), "no examples to score");
    let hits = rows
        .iter()
        .zip(labels)
        .filter(|(row, &label)| {
            let own = row[label as usize];
            // Rank = number of classes scoring strictly higher (ties favour the label).
            row.iter().filter(|&&s| s > own).count() < k
        })
        .count();
    Ok(hits as f64 / rows.len() as f64)
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
    fn topk_counts_labels_within_the_k_best() {
        let logits = Tensor::new(
            &[[0.1f32, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.1]],
            &Device::Cpu,
        )
        .unwrap();
        let labels = [1, 2, 2];
        assert!((topk_accuracy(&logits, &labels, 1).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((topk_accuracy(&logits, &labels, 2).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(topk_accuracy(&logits, &labels, 3).unwrap(), 1.0);
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
