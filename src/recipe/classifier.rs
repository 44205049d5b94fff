//! A trained student ready to classify: the checkpoint, the tokenizer its card names, and the
//! zero-shot classifier built from label names, as `classify`, `eval` and `energy` use it.

use std::path::Path;

use anyhow::bail;
use candle_core::{Device, Tensor, D};
use image::DynamicImage;

use super::dead_features::{Probe, PROBE_SIZE};
use super::energy::prompt_token_ids;
use super::stages::student_class_embeddings;
use super::student::Student;
use crate::data::prompts::DatasetPrompts;
use crate::data::world::{World, PROMPT_TEMPLATES};
use crate::model::checkpoint::{self, ModelCard, TokenizerSpec};
use crate::teacher::preprocess::{batch, student_input, Preprocessor};
use crate::teacher::Tokenize;
use crate::train::loss::cosine_logits;

/// Side of CLIP's preprocessing that student inputs are made from.
const CLIP_SIDE: u32 = 224;

/// The student a command runs: the loaded one or a view of it.
pub struct Inference<'a> {
    view: Option<Box<dyn Student + 'a>>,
    base: &'a dyn Student,
}

impl Inference<'_> {
    pub fn student(&self) -> &dyn Student {
        self.view.as_deref().unwrap_or(self.base)
    }

    /// Which image path runs, for the user.
    pub fn image_path(&self) -> &'static str {
        match self.view {
            Some(_) => "spike-driven",
            None => "dense",
        }
    }
}

pub struct LoadedStudent {
    pub student: Box<dyn Student>,
    pub card: ModelCard,
    pub tokenizer: Box<dyn Tokenize>,
}

impl LoadedStudent {
    /// Loads a checkpoint (a directory with `model.safetensors` + `model.json`, or a weights
    /// file beside a `model.json`) and the tokenizer it was trained with.
    pub fn open(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let (student, card) = checkpoint::load(path, device)?;
        let tokenizer = card.tokenizer.open()?;
        Ok(Self {
            student,
            card,
            tokenizer,
        })
    }

    /// The student to run inference with. A spiking checkpoint runs its image encoder
    /// spike-driven (the dense path's predictions at several times its speed) unless `dense`
    /// asks for the dense path; a checkpoint without spikes always runs as loaded.
    pub fn for_inference(&self, dense: bool) -> anyhow::Result<Inference<'_>> {
        let view = match dense {
            true => None,
            false => self.student.spike_driven().transpose()?,
        };
        Ok(Inference {
            view,
            base: self.student.as_ref(),
        })
    }

    /// Templates to use when only label names are given: the world's for world-trained
    /// students, CLIP's plain "a photo of a {}." otherwise.
    pub fn default_templates(&self) -> Vec<String> {
        match self.card.tokenizer {
            TokenizerSpec::World => PROMPT_TEMPLATES.iter().map(|t| t.to_string()).collect(),
            TokenizerSpec::Clip { .. } => vec!["a photo of a {}.".to_string()],
        }
    }

    /// The label set of label names: each name a class with the default templates. Names are
    /// trimmed and blank ones dropped; no names at all means the world's classes for a
    /// world-trained student and an error otherwise.
    pub fn prompts_for_labels(&self, labels: &[String]) -> anyhow::Result<DatasetPrompts> {
        let names: Vec<String> = labels
            .iter()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let classes = if !names.is_empty() {
            names
        } else if !labels.is_empty() {
            bail!("the label list is empty: give at least one label name")
        } else if self.card.tokenizer == TokenizerSpec::World {
            World::class_names()
        } else {
            bail!("the label list is empty: give label names or a prompt set")
        };
        Ok(DatasetPrompts {
            classes: classes.into_iter().map(|c| vec![c]).collect(),
            templates: self.default_templates(),
        })
    }

    /// Prompt-ensembled unit class embeddings `[C, D]`.
    pub fn class_embeddings(
        &self,
        prompts: &DatasetPrompts,
        device: &Device,
    ) -> anyhow::Result<Tensor> {
        student_class_embeddings(
            self.student.as_ref(),
            self.tokenizer.as_ref(),
            prompts,
            self.card.config.text.context_length,
            device,
        )
    }

    /// Warnings when the features of `student` (this checkpoint or its inference view) do
    /// not depend on the input (see [`super::dead_features`]): both encoders probed with the
    /// first [`PROBE_SIZE`] of `images` `[B, 3, 32, 32]` and sentences of `prompts`, and the
    /// class embeddings `classes` checked for ties.
    pub fn feature_warnings(
        &self,
        student: &dyn Student,
        images: &Tensor,
        prompts: &DatasetPrompts,
        classes: &Tensor,
        device: &Device,
    ) -> anyhow::Result<Vec<String>> {
        let ids = prompt_token_ids(
            prompts,
            self.tokenizer.as_ref(),
            self.card.config.text.context_length,
            4 * PROBE_SIZE,
            device,
        )?;
        let probe = Probe {
            images: Some(images.narrow(0, 0, images.dim(0)?.min(PROBE_SIZE))?),
            ids: Some(ids),
        };
        probe.warnings(student, Some(classes))
    }
}

/// CLIP's 224-pixel preprocessing of an image, the first half of a student input.
pub fn clip_pixels(image: &DynamicImage) -> Vec<f32> {
    Preprocessor::square(CLIP_SIDE).pixels(image)
}

/// Student inputs `[B, 3, 32, 32]` of images preprocessed by [`clip_pixels`]: bilinear down to
/// 32 as the authors feed their student.
pub fn student_inputs(pixels: Vec<Vec<f32>>, device: &Device) -> anyhow::Result<Tensor> {
    let side = CLIP_SIDE as usize;
    student_input(&batch(pixels, side, side, device)?, 32)
}

/// Zero-shot probabilities of each image over the classes, most likely first: softmax over
/// cosine similarities times 100, as CLIP reports them. `features` `[B, D]`, `classes` `[C, D]`.
pub fn ranked_probabilities(
    features: &Tensor,
    classes: &Tensor,
) -> anyhow::Result<Vec<Vec<(usize, f32)>>> {
    let logits = cosine_logits(features, classes, Some(100.0))?;
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
    Ok(probs
        .into_iter()
        .map(|row| {
            let mut ranked: Vec<(usize, f32)> = row.into_iter().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            ranked
        })
        .collect())
}
