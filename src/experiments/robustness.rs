//! The label sets of the robustness study (the paper's Table 2): a dataset's class names
//! enlarged with distractors or renamed with unseen synonyms from a pool of other labels (the
//! world's text-only lexicon, or the other datasets of a prompts file), chosen by the teacher's
//! text similarity.

use candle_core::Tensor;
use serde::Serialize;

use super::lab::Lab;
use super::labels::{enlarge, replace_with_nearest, Label};
use super::report::ChosenLabels;
use crate::data::prompts::DatasetPrompts;
use crate::data::world::World;
use crate::eval::zeroshot::class_embeddings;
use crate::teacher::TextTeacher;

/// The perturbations, as in the paper: enlargement factors and replaced fractions.
#[derive(Debug, Clone, Serialize)]
pub struct LabelSettings {
    pub enlarge: Vec<usize>,
    pub replace: Vec<f64>,
}

impl LabelSettings {
    pub fn paper() -> Self {
        Self {
            enlarge: vec![2, 5, 8],
            replace: vec![0.2, 0.4, 0.8, 1.0],
        }
    }
}

/// One column of Table 2: its label set under each seed.
pub struct LabelSet {
    pub column: String,
    pub prompts: Vec<DatasetPrompts>,
    /// What the first seed added or substituted (none for the original labels).
    pub chosen: Option<ChosenLabels>,
}

/// The original labels and the pool, each with the teacher's unit text embedding, and the
/// templates every label set is prompted with.
pub struct Robustness {
    originals: Vec<Label>,
    pool: Vec<Label>,
    templates: Vec<String>,
    renamed: DatasetPrompts,
}

/// Names with their rows of `classes` (`[N, D]`, unit rows).
pub fn labelled(names: Vec<String>, classes: &Tensor) -> anyhow::Result<Vec<Label>> {
    let rows: Vec<Vec<f32>> = classes.to_vec2()?;
    Ok(names
        .into_iter()
        .zip(rows)
        .map(|(name, embedding)| Label { name, embedding })
        .collect())
}

fn names(labels: &[Label]) -> Vec<String> {
    labels.iter().map(|l| l.name.clone()).collect()
}

impl Robustness {
    pub fn new(
        originals: Vec<Label>,
        pool: Vec<Label>,
        templates: Vec<String>,
    ) -> anyhow::Result<Self> {
        let all = replace_with_nearest(&originals, &pool, 1.0, 0)?;
        let renamed = DatasetPrompts {
            classes: names(&all.labels).into_iter().map(|n| vec![n]).collect(),
            templates: templates.clone(),
        };
        Ok(Self {
            originals,
            pool,
            templates,
            renamed,
        })
    }

    /// The world's 24 pairs against its text-only lexicon.
    pub fn world(lab: &Lab) -> anyhow::Result<Self> {
        let originals = labelled(World::class_names(), &lab.teacher_classes)?;
        let mut pool = Vec::new();
        for prompts in World::label_pool().datasets.values() {
            let pool_names = prompts.classes.iter().map(|c| c[0].clone()).collect();
            pool.extend(labelled(pool_names, &teacher_classes(lab, prompts)?)?);
        }
        Self::new(originals, pool, lab.prompts.templates.clone())
    }

    /// `names`, each prompted with this study's templates.
    fn prompts(&self, labels: &[Label]) -> DatasetPrompts {
        DatasetPrompts {
            classes: labels.iter().map(|l| vec![l.name.clone()]).collect(),
            templates: self.templates.clone(),
        }
    }

    /// Every label replaced by its nearest unseen pool label: the "other labels" of the
    /// ablations.
    pub fn renamed_all(&self) -> &DatasetPrompts {
        &self.renamed
    }

    /// The original labels, then each enlargement and each replacement, per seed.
    pub fn label_sets(
        &self,
        seeds: &[u64],
        settings: &LabelSettings,
    ) -> anyhow::Result<Vec<LabelSet>> {
        anyhow::ensure!(!seeds.is_empty(), "Table 2 needs at least one label seed");
        let mut sets = vec![LabelSet {
            column: "original".into(),
            prompts: vec![self.prompts(&self.originals)],
            chosen: None,
        }];
        let n = self.originals.len();
        for &factor in &settings.enlarge {
            let per_seed = seeds
                .iter()
                .map(|&s| enlarge(&self.originals, &self.pool, factor, s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            sets.push(LabelSet {
                column: format!("x{factor} labels"),
                chosen: Some(ChosenLabels {
                    setting: format!("x{factor}: distractors"),
                    labels: names(&per_seed[0][n..]),
                }),
                prompts: per_seed.iter().map(|l| self.prompts(l)).collect(),
            });
        }
        for &fraction in &settings.replace {
            let per_seed = seeds
                .iter()
                .map(|&s| replace_with_nearest(&self.originals, &self.pool, fraction, s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let pct = 100.0 * fraction;
            sets.push(LabelSet {
                column: format!("{pct:.0}% replaced"),
                chosen: Some(ChosenLabels {
                    setting: format!("{pct:.0}% replaced"),
                    labels: per_seed[0]
                        .changes
                        .iter()
                        .map(|(o, r)| format!("{o} -> {r}"))
                        .collect(),
                }),
                prompts: per_seed.iter().map(|r| self.prompts(&r.labels)).collect(),
            });
        }
        Ok(sets)
    }
}

/// The teacher's prompt-ensembled class embeddings of a label set.
pub fn teacher_classes(lab: &Lab, prompts: &DatasetPrompts) -> anyhow::Result<Tensor> {
    class_embeddings(prompts, |t| lab.world.teacher().text_features(t))
}
