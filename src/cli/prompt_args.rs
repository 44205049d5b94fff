//! The `--prompts FILE --prompt-set NAME` pair that several commands take.

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::data::prompts::{DatasetPrompts, PromptSet};
use crate::data::ImageFeatureSet;

/// A dataset of a prompts file (clip_prompts.json format).
#[derive(clap::Args)]
pub(crate) struct PromptFileArgs {
    /// A prompts file (clip_prompts.json format) with --prompt-set naming its dataset.
    #[arg(long, requires = "prompt_set")]
    prompts: Option<PathBuf>,
    #[arg(long)]
    prompt_set: Option<String>,
}

impl PromptFileArgs {
    /// The named dataset's class names and templates, when a file was given.
    pub fn load(&self) -> anyhow::Result<Option<DatasetPrompts>> {
        let (Some(file), Some(name)) = (&self.prompts, &self.prompt_set) else {
            return Ok(None);
        };
        let set = PromptSet::from_file(file)?;
        let (_, prompts) = set
            .find(name)
            .with_context(|| format!("{}: --prompt-set {name:?}", file.display()))?;
        Ok(Some(prompts.clone()))
    }

    /// The prompts labelling a cached image set: required, with one class per label.
    pub fn for_images(
        &self,
        images: &dyn ImageFeatureSet,
        command: &str,
    ) -> anyhow::Result<DatasetPrompts> {
        let Some(prompts) = self.load()? else {
            bail!("{command} on a cache needs --prompts FILE --prompt-set NAME");
        };
        if images.class_names().len() != prompts.classes.len() {
            bail!(
                "the cache has {} classes but the prompt set has {}",
                images.class_names().len(),
                prompts.classes.len()
            );
        }
        Ok(prompts)
    }
}
