//! The trainings the experiments share, on the built-in world: one recipe run per model,
//! snapshots of its weights after each stage so variants branch from them, and zero-shot
//! scores of any label set from image features computed once per model.

use std::ops::Deref;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::weights::Snapshot;
use crate::data::prompts::DatasetPrompts;
use crate::data::world::{Split, World, DATASET};
use crate::data::ImageFeatureSet;
use crate::eval::zeroshot::{class_embeddings, TopK};
use crate::recipe::demo::DemoConfig;
pub use crate::recipe::world_recipe::Arch;
use crate::recipe::world_recipe::WorldRecipe;
use crate::recipe::Student;
use crate::teacher::TextTeacher;
use crate::train::loss::cosine_logits;

/// Batch size of feature extraction (no gradients).
const EVAL_BATCH: usize = 256;

/// One model through the recipe, with its weights at each point.
pub struct Trained {
    pub student: Box<dyn Student>,
    pub init: Snapshot,
    pub pretrained: Snapshot,
    /// After fine-tuning with the default lambda, when it was run.
    pub finetuned: Option<Snapshot>,
}

/// Image features of the test images: seen pairs, then unseen pairs.
pub struct Features {
    pub seen: (Tensor, Vec<u32>),
    pub unseen: (Tensor, Vec<u32>),
}

impl Features {
    /// Top-1 over seen pairs, unseen pairs, and both, against class embeddings `[C, D]`.
    pub fn top1(&self, classes: &Tensor) -> anyhow::Result<[f64; 3]> {
        let score = |(f, l): &(Tensor, Vec<u32>)| -> anyhow::Result<TopK> {
            TopK::from_logits(&cosine_logits(f, classes, None)?, l)
        };
        let (seen, unseen) = (score(&self.seen)?, score(&self.unseen)?);
        Ok([seen.top1(), unseen.top1(), seen.merge(unseen).top1()])
    }
}

/// The world's recipe plus what every experiment scores against.
pub struct Lab {
    pub recipe: WorldRecipe,
    /// The world's labels with its templates.
    pub prompts: DatasetPrompts,
    pub teacher_classes: Tensor,
}

/// The experiments train through the shared recipe: `lab.distill_text(..)`, `lab.world`.
impl Deref for Lab {
    type Target = WorldRecipe;

    fn deref(&self) -> &WorldRecipe {
        &self.recipe
    }
}

impl Lab {
    pub fn new(
        demo: DemoConfig,
        out: &Path,
        progress: bool,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let recipe = WorldRecipe::new(demo, out, progress, device);
        let prompts = World::prompts().datasets[DATASET].clone();
        let teacher_classes =
            class_embeddings(&prompts, |t| recipe.world.teacher().text_features(t))?;
        Ok(Self {
            recipe,
            prompts,
            teacher_classes,
        })
    }

    /// Pre-training (text, then image distillation) and, when asked, fine-tuning with the
    /// default lambda, keeping the weights at each point.
    ///
    /// `image`: pre-trained image weights to take instead of distilling them again, for a
    /// variant that differs only in its text tower (image distillation never sees the text
    /// tower, so it would end where these did).
    pub fn recipe(
        &self,
        arch: Arch,
        name: &str,
        fine_tune: bool,
        image: Option<&Snapshot>,
    ) -> anyhow::Result<Trained> {
        let student = self.build(arch)?;
        let init = Snapshot::take(student.as_ref())?;
        self.distill_text(student.as_ref(), name)?;
        match image {
            Some(weights) => weights.restore(student.as_ref(), "image.")?,
            None => {
                let images = self.world.images(Split::Pretrain);
                self.distill_image(student.as_ref(), &images, name)?;
            }
        }
        let pretrained = Snapshot::take(student.as_ref())?;
        let finetuned = if fine_tune {
            self.finetune(student.as_ref(), self.demo.dual_loss.lambda, name)?;
            Some(Snapshot::take(student.as_ref())?)
        } else {
            None
        };
        Ok(Trained {
            student,
            init,
            pretrained,
            finetuned,
        })
    }

    /// The student's image features of both test splits (eval mode), or the teacher's when
    /// `student` is `None`.
    pub fn features(&self, student: Option<&dyn Student>) -> anyhow::Result<Features> {
        let split = |s: Split| -> anyhow::Result<(Tensor, Vec<u32>)> {
            let set = self.world.images(s);
            let all: Vec<usize> = (0..set.len()).collect();
            let mut feats = Vec::new();
            let mut labels = Vec::new();
            for idx in all.chunks(EVAL_BATCH) {
                let batch = set.batch(idx, &self.device)?;
                feats.push(match student {
                    Some(st) => st.image_features(&batch.inputs, false)?,
                    None => batch.teacher,
                });
                labels.extend(batch.labels);
            }
            Ok((Tensor::cat(&feats, 0)?, labels))
        };
        Ok(Features {
            seen: split(Split::TestSeen)?,
            unseen: split(Split::TestUnseen)?,
        })
    }
}
