//! Class names and prompt templates per dataset, the material of D-text and of zero-shot
//! classifiers (prompt ensembling averages a class's embedding over its templates).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context};

use serde::{Deserialize, Serialize};

/// One dataset's label set: each class may have several names (synonyms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetPrompts {
    pub classes: Vec<Vec<String>>,
    /// Sentences with `{}` where a class name goes.
    pub templates: Vec<String>,
}

/// Prompts of several datasets, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub datasets: BTreeMap<String, DatasetPrompts>,
}

/// A class as the prompt file writes it: one name, or several synonyms.
#[derive(Deserialize)]
#[serde(untagged)]
enum ClassNames {
    One(String),
    Several(Vec<String>),
}

#[derive(Deserialize)]
struct DatasetPromptsFile {
    classes: Vec<ClassNames>,
    templates: Vec<String>,
}

#[derive(Deserialize)]
struct PromptFile {
    datasets: BTreeMap<String, DatasetPromptsFile>,
}

impl PromptSet {
    /// Reads a prompt file in the format of `clip_prompts.json`, where a class is a string
    /// or a list of synonyms; every class must have a name and every template a `{}` slot,
    /// otherwise D-text would silently lose sentences.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompt file {}", path.display()))?;
        let file: PromptFile = serde_json::from_str(&text)
            .with_context(|| format!("parsing prompt file {}", path.display()))?;
        let mut datasets = BTreeMap::new();
        for (name, ds) in file.datasets {
            let classes: Vec<Vec<String>> = ds
                .classes
                .into_iter()
                .map(|c| match c {
                    ClassNames::One(n) => vec![n],
                    ClassNames::Several(ns) => ns,
                })
                .collect();
            if let Some(i) = classes.iter().position(|c| c.is_empty()) {
                bail!("{}: dataset {name}: class {i} has no name", path.display());
            }
            if let Some(t) = ds.templates.iter().find(|t| !t.contains("{}")) {
                bail!(
                    "{}: dataset {name}: template {t:?} has no {{}}",
                    path.display()
                );
            }
            datasets.insert(
                name,
                DatasetPrompts {
                    classes,
                    templates: ds.templates,
                },
            );
        }
        Ok(Self { datasets })
    }

    /// D-text, the text side's distillation corpus: each class's first (canonical) name in
    /// every template of the chosen datasets (all when `only` is empty), deduplicated in
    /// first-seen order so the teacher embeds each sentence once.
    pub fn dtext(&self, only: &[String]) -> anyhow::Result<Vec<String>> {
        if let Some(missing) = only.iter().find(|n| !self.datasets.contains_key(*n)) {
            bail!("prompt set has no dataset named {missing:?}");
        }
        let mut seen = HashSet::new();
        let mut sentences = Vec::new();
        let chosen = self
            .datasets
            .iter()
            .filter(|(name, _)| only.is_empty() || only.contains(name));
        for (_, ds) in chosen {
            for class in &ds.classes {
                for template in &ds.templates {
                    let sentence = template.replace("{}", &class[0]);
                    if seen.insert(sentence.clone()) {
                        sentences.push(sentence);
                    }
                }
            }
        }
        Ok(sentences)
    }
}
