//! Class names and prompt templates per dataset, the material of D-text and of zero-shot
//! classifiers (prompt ensembling averages a class's embedding over its templates).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};

use serde::{Deserialize, Serialize};

/// One dataset's label set: each class may have several names (synonyms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetPrompts {
    pub classes: Vec<Vec<String>>,
    /// Sentences with `{}` where a class name goes.
    pub templates: Vec<String>,
}

impl DatasetPrompts {
    /// Every sentence of class `c`: each of its names in each template.
    pub fn class_sentences(&self, c: usize) -> Vec<String> {
        self.classes[c]
            .iter()
            .flat_map(|name| self.templates.iter().map(move |t| t.replace("{}", name)))
            .collect()
    }
}

/// Prompts of several datasets, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptSet {
    pub datasets: BTreeMap<String, DatasetPrompts>,
}

/// A class in the prompt file: one name, or several synonyms.
#[derive(Deserialize)]
#[serde(untagged)]
enum ClassNames {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct FileDataset {
    classes: Vec<ClassNames>,
    templates: Vec<String>,
}

#[derive(Deserialize)]
struct PromptFile {
    datasets: BTreeMap<String, FileDataset>,
}

impl PromptSet {
    /// Reads a file in the format of `clip_prompts.json`:
    /// `{"datasets": {NAME: {"classes": [name or [synonyms]], "templates": ["... {} ..."]}}}`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: PromptFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a prompt file", path.display()))?;
        let mut datasets = BTreeMap::new();
        for (name, d) in file.datasets {
            if let Some(t) = d.templates.iter().find(|t| !t.contains("{}")) {
                bail!(
                    "{}: dataset {name}: template {t:?} has no {{}}",
                    path.display()
                );
            }
            let classes = d
                .classes
                .into_iter()
                .map(|c| match c {
                    ClassNames::One(n) => vec![n],
                    ClassNames::Many(ns) => ns,
                })
                .collect::<Vec<_>>();
            if let Some(i) = classes.iter().position(|c| c.is_empty()) {
                bail!("{}: dataset {name}: class {i} has no name", path.display());
            }
            datasets.insert(
                name,
                DatasetPrompts {
                    classes,
                    templates: d.templates,
                },
            );
        }
        Ok(Self { datasets })
    }

    /// The dataset called `name`, with its name as the file spells it: the exact name, or
    /// else the one name equal to it ignoring case (a file may say `CIFAR10` where a dataset's
    /// kind is `cifar10`). No match, or several, is an error listing the candidates.
    pub fn find(&self, name: &str) -> Result<(&str, &DatasetPrompts)> {
        if let Some((k, d)) = self.datasets.get_key_value(name) {
            return Ok((k, d));
        }
        let matches: Vec<(&String, &DatasetPrompts)> = self
            .datasets
            .iter()
            .filter(|(k, _)| k.to_lowercase() == name.to_lowercase())
            .collect();
        match matches[..] {
            [(k, d)] => Ok((k, d)),
            [] => bail!(
                "no prompts for dataset {name:?}; known: {:?}",
                self.datasets.keys().collect::<Vec<_>>()
            ),
            _ => bail!(
                "dataset {name:?} is ambiguous: the prompts file has {:?}, which differ only in \
                 case; give one of them exactly",
                matches.iter().map(|(k, _)| k).collect::<Vec<_>>()
            ),
        }
    }

    /// Keeps the named datasets (found as [`Self::find`] finds them).
    pub fn select(&self, names: &[String]) -> Result<Self> {
        let datasets = names
            .iter()
            .map(|n| {
                let (name, d) = self.find(n)?;
                Ok((name.to_string(), d.clone()))
            })
            .collect::<Result<_>>()?;
        Ok(Self { datasets })
    }

    /// D-text: every class name (synonyms included) in every template of its dataset,
    /// deduplicated across datasets, in first-seen order.
    pub fn dtext(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for d in self.datasets.values() {
            for names in &d.classes {
                for name in names {
                    for t in &d.templates {
                        let s = t.replace("{}", name);
                        if seen.insert(s.clone()) {
                            out.push(s);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(json: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.json");
        std::fs::write(&path, json).unwrap();
        (dir, path)
    }

    #[test]
    fn synonyms_and_duplicates_across_datasets() {
        let (_d, path) = write(
            r#"{"datasets": {"a": {"classes": ["cat", ["dog", "puppy"]], "templates": ["a {}.", "{}!"]},
                             "b": {"classes": ["cat"], "templates": ["a {}."]}}}"#,
        );
        let set = PromptSet::from_file(&path).unwrap();
        assert_eq!(set.datasets["a"].classes[1], vec!["dog", "puppy"]);
        assert_eq!(
            set.dtext(),
            vec!["a cat.", "cat!", "a dog.", "dog!", "a puppy.", "puppy!"]
        );
        assert_eq!(set.select(&["b".into()]).unwrap().dtext(), vec!["a cat."]);
        assert!(set.select(&["c".into()]).is_err());
    }

    #[test]
    fn names_match_ignoring_case_unless_ambiguous() {
        let (_d, path) = write(
            r#"{"datasets": {"CIFAR10": {"classes": ["cat"], "templates": ["{}"]},
                             "stl10": {"classes": ["dog"], "templates": ["{}"]},
                             "Stl10": {"classes": ["ship"], "templates": ["{}"]}}}"#,
        );
        let set = PromptSet::from_file(&path).unwrap();
        assert_eq!(set.find("cifar10").unwrap().0, "CIFAR10");
        assert_eq!(set.find("Cifar10").unwrap().1.classes, [["cat"]]);
        // An exact name is never ambiguous; a name matching two only ignoring case is.
        assert_eq!(set.find("Stl10").unwrap().1.classes, [["ship"]]);
        let err = set.find("STL10").unwrap_err().to_string();
        assert!(
            err.contains("ambiguous") && err.contains("\"Stl10\"") && err.contains("\"stl10\""),
            "{err}"
        );
        let err = set.find("mnist").unwrap_err().to_string();
        assert!(err.contains("known") && err.contains("CIFAR10"), "{err}");
        let picked = set.select(&["cifar10".into()]).unwrap();
        assert_eq!(picked.datasets.keys().collect::<Vec<_>>(), ["CIFAR10"]);
    }

    #[test]
    fn malformed_files_are_named() {
        let (_d, path) =
            write(r#"{"datasets": {"a": {"classes": ["cat"], "templates": ["no slot"]}}}"#);
        let err = format!("{:#}", PromptSet::from_file(&path).err().unwrap());
        assert!(
            err.contains("prompts.json") && err.contains("no slot"),
            "{err}"
        );
        let (_d, path) = write("{\"datasets\": ");
        let err = format!("{:#}", PromptSet::from_file(&path).err().unwrap());
        assert!(err.contains("not a prompt file"), "{err}");
    }

    #[test]
    fn shared_prompt_file_dtext_size() {
        let set = PromptSet::from_file(&crate::shared_test_data("clip_prompts.json")).unwrap();
        assert_eq!(set.datasets.len(), 27);
        // The paper reports 115,708; this file deduplicated across datasets gives 114,341.
        assert_eq!(set.dtext().len(), 114_341);
    }
}
