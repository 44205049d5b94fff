//! The teacher's answer beside the student's, so a visitor sees how close the distilled SNN
//! comes to what it imitates on the same image and labels.
//!
//! The teacher is the CLIP given with `--teacher clip:DIR`, or, for a checkpoint trained on the
//! built-in world and no `--teacher`, the world's analytic teacher, which `eval` scores a world
//! checkpoint against. The analytic teacher reads the attributes an image was drawn with, not
//! its pixels, so it ranks labels for the world's sample images (the page's) and says so for any
//! other upload.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::Serialize;

use super::engine::{Labels, Ranked};
use super::page::Samples;
use crate::data::prompts::DatasetPrompts;
use crate::eval::zeroshot::class_embeddings;
use crate::model::checkpoint::TokenizerSpec;
use crate::recipe::classifier::ranked_probabilities;
use crate::teacher::clip::ClipTeacher;
use crate::teacher::preprocess::{self, convert_rgb, Preprocessor};
use crate::teacher::{ImageTeacher, ModelSpec, TextTeacher};

/// Label sets whose teacher class embeddings are kept.
const LABEL_CACHE: usize = 64;

/// Which teacher a server answers with.
#[derive(Debug, Clone, PartialEq)]
pub enum TeacherChoice {
    Clip(PathBuf),
    /// The built-in world's analytic teacher.
    World,
}

impl TeacherChoice {
    /// The CLIP of `--teacher`, else the world's analytic teacher for a checkpoint with the
    /// world's tokenizer, else none.
    pub fn resolve(teacher: Option<&ModelSpec>, tokenizer: &TokenizerSpec) -> Option<Self> {
        match (teacher, tokenizer) {
            (Some(ModelSpec::Clip(dir)), _) => Some(Self::Clip(dir.clone())),
            (None, TokenizerSpec::World) => Some(Self::World),
            (None, TokenizerSpec::Clip { .. }) => None,
        }
    }
}

/// How an upload becomes the teacher's input: done by the handlers, off the model thread, so
/// the queue holds the teacher's crop rather than a full-size image.
#[derive(Clone)]
pub enum TeacherView {
    Clip(Arc<Preprocessor>),
    World(Arc<Samples>),
}

/// An upload as the teacher reads it.
#[derive(Debug)]
pub enum TeacherImage {
    /// CLIP-preprocessed pixels `[3, H, W]`, flattened.
    Pixels(Vec<f32>),
    /// One of the world's sample images.
    Sample(usize),
    /// An image the world's analytic teacher never drew.
    Unknown,
}

impl TeacherView {
    pub fn image(&self, image: &DynamicImage) -> TeacherImage {
        match self {
            Self::Clip(pre) => TeacherImage::Pixels(pre.pixels(image)),
            Self::World(samples) => samples
                .find(&convert_rgb(image))
                .map_or(TeacherImage::Unknown, TeacherImage::Sample),
        }
    }
}

/// The teacher's ranking of a request's labels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeacherAnswer {
    /// Which teacher answered.
    pub teacher: String,
    /// Most likely first; none when the teacher cannot read this image or these labels.
    pub ranked: Option<Vec<Ranked>>,
    /// Why there is no ranking.
    pub note: Option<String>,
}

enum Model {
    Clip {
        clip: Box<ClipTeacher>,
        crop: (usize, usize),
    },
    World(Arc<Samples>),
}

/// The teacher on the model thread.
pub struct Teacher {
    name: String,
    model: Model,
    /// Unit class embeddings `[C, D]` per label set.
    cache: HashMap<Labels, Tensor>,
}

impl Teacher {
    /// Loads the chosen teacher and the view the handlers prepare its inputs with.
    pub fn load(
        choice: &TeacherChoice,
        samples: Arc<Samples>,
    ) -> anyhow::Result<(Self, TeacherView)> {
        let (name, model, view) = match choice {
            TeacherChoice::Clip(dir) => {
                let clip = Box::new(ClipTeacher::load(dir, &Device::Cpu)?);
                let pre = Preprocessor::from_dir_or_square(dir, clip.image_size() as u32)?;
                let crop = (pre.crop_size.height as usize, pre.crop_size.width as usize);
                let view = TeacherView::Clip(Arc::new(pre));
                let name = format!("CLIP ({})", dir.display());
                (name, Model::Clip { clip, crop }, view)
            }
            TeacherChoice::World => (
                "the built-in world's analytic teacher".to_string(),
                Model::World(samples.clone()),
                TeacherView::World(samples),
            ),
        };
        let teacher = Self {
            name,
            model,
            cache: HashMap::new(),
        };
        Ok((teacher, view))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Unnormalised features `[1, D]` of each image, none where the teacher cannot see it; the
    /// CLIP's images run through its image tower together.
    pub fn image_features(
        &self,
        images: &[Option<&TeacherImage>],
    ) -> anyhow::Result<Vec<Option<Tensor>>> {
        let dev = Device::Cpu;
        match &self.model {
            Model::Clip { clip, crop } => {
                let pixels: Vec<Vec<f32>> = images
                    .iter()
                    .filter_map(|i| match i {
                        Some(TeacherImage::Pixels(p)) => Some(p.clone()),
                        _ => None,
                    })
                    .collect();
                let features = match pixels.is_empty() {
                    true => None,
                    false => Some(
                        clip.image_features(&preprocess::batch(pixels, crop.0, crop.1, &dev)?)?,
                    ),
                };
                let mut next = 0;
                images
                    .iter()
                    .map(|i| match (i, &features) {
                        (Some(TeacherImage::Pixels(_)), Some(f)) => {
                            next += 1;
                            Ok(Some(f.narrow(0, next - 1, 1)?))
                        }
                        _ => Ok(None),
                    })
                    .collect()
            }
            Model::World(samples) => images
                .iter()
                .map(|i| match i {
                    Some(TeacherImage::Sample(id)) => samples
                        .teacher_feature(*id)
                        .map(|f| Tensor::from_slice(f, (1, f.len()), &dev))
                        .transpose()
                        .map_err(Into::into),
                    _ => Ok(None),
                })
                .collect(),
        }
    }

    /// The teacher's ranking of `prompts` (the label set `labels` names) for an image's
    /// `feature`, or a note saying why there is none.
    pub fn answer(
        &mut self,
        feature: Option<&Tensor>,
        labels: &Labels,
        prompts: impl FnOnce() -> anyhow::Result<DatasetPrompts>,
    ) -> anyhow::Result<TeacherAnswer> {
        let teacher = self.name.clone();
        let Some(feature) = feature else {
            return Ok(TeacherAnswer {
                teacher,
                ranked: None,
                note: Some(
                    "the world's analytic teacher knows the world's sample images only (it reads \
                     the attributes an image was drawn with, not pixels)"
                        .to_string(),
                ),
            });
        };
        let prompts = prompts()?;
        let classes = match self.class_embeddings(labels, &prompts) {
            Ok(c) => c,
            Err(e) => {
                return Ok(TeacherAnswer {
                    teacher,
                    ranked: None,
                    note: Some(format!("the teacher cannot embed these labels: {e:#}")),
                })
            }
        };
        let probs = ranked_probabilities(feature, &classes)?;
        let ranked = probs[0]
            .iter()
            .map(|&(c, p)| Ranked {
                label: prompts.classes[c][0].clone(),
                probability: p,
            })
            .collect();
        Ok(TeacherAnswer {
            teacher,
            ranked: Some(ranked),
            note: None,
        })
    }

    fn class_embeddings(
        &mut self,
        labels: &Labels,
        prompts: &DatasetPrompts,
    ) -> anyhow::Result<Tensor> {
        if let Some(hit) = self.cache.get(labels) {
            return Ok(hit.clone());
        }
        let classes = match &self.model {
            Model::Clip { clip, .. } => class_embeddings(prompts, |t| clip.text_features(t))?,
            Model::World(samples) => {
                class_embeddings(prompts, |t| samples.world().teacher().text_features(t))?
            }
        };
        if self.cache.len() >= LABEL_CACHE {
            self.cache.clear();
        }
        self.cache.insert(labels.clone(), classes.clone());
        Ok(classes)
    }
}
