//! Class names and prompt templates per dataset, the material of D-text and of zero-shot
//! classifiers (prompt ensembling averages a class's embedding over its templates).

use std::collections::BTreeMap;

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
