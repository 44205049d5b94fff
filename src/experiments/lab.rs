//! The trainings the experiments share, on the built-in world: one recipe run per model,
//! snapshots of its weights after each stage so variants branch from them, and zero-shot
//! scores of any label set from image features computed once per model.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};

use super::weights::Snapshot;
use crate::data::prompts::DatasetPrompts;
use crate::data::world::{Split, World, DATASET, PROMPT_TEMPLATES};
use crate::data::ImageFeatureSet;
use crate::eval::zeroshot::{class_embeddings, TopK};
use crate::model::config::ReadoutKind;
use crate::model::{ScratchClip, SpikeClip};
use crate::recipe::demo::DemoConfig;
use crate::recipe::{
    distill_image, distill_text, finetune, student_class_embeddings, FinetuneTargets, Student,
};
use crate::teacher::TextTeacher;
use crate::train::loss::{cosine_logits, DualLossConfig};
use crate::train::stage::{StageConfig, StageRun};

/// Batch size of feature extraction (no gradients).
const EVAL_BATCH: usize = 256;

/// Which student a recipe run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// SpikeCLIP with the given readout.
    Spiking(ReadoutKind),
    /// ScratchCLIP, the ANN twin.
    Ann,
}

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

/// The world, the sizes and where trainings write their checkpoints.
pub struct Lab {
    pub demo: DemoConfig,
    pub world: World,
    pub out: PathBuf,
    pub progress: bool,
    pub device: Device,
    /// The world's labels with its templates.
    pub prompts: DatasetPrompts,
    pub teacher_classes: Tensor,
}

impl Lab {
    pub fn new(demo: DemoConfig, out: &Path, progress: bool) -> anyhow::Result<Self> {
        let world = World::new(demo.world.clone());
        let prompts = World::prompts().datasets[DATASET].clone();
        let teacher_classes = class_embeddings(&prompts, |t| world.teacher().text_features(t))?;
        Ok(Self {
            demo,
            world,
            out: out.to_path_buf(),
            progress,
            device: Device::Cpu,
            prompts,
            teacher_classes,
        })
    }

    /// The world's templates around other label names.
    pub fn label_prompts(names: impl IntoIterator<Item = String>) -> DatasetPrompts {
        DatasetPrompts {
            classes: names.into_iter().map(|n| vec![n]).collect(),
            templates: PROMPT_TEMPLATES.iter().map(|t| t.to_string()).collect(),
        }
    }

    pub fn build(&self, arch: Arch) -> anyhow::Result<Box<dyn Student>> {
        let seed = self.demo.world.seed;
        Ok(match arch {
            Arch::Spiking(readout) => {
                let mut cfg = self.demo.model.clone();
                cfg.readout = readout;
                Box::new(SpikeClip::new(&cfg, seed, &self.device)?)
            }
            Arch::Ann => Box::new(ScratchClip::new(&self.demo.model, seed, &self.device)?),
        })
    }

    fn run<'a>(
        &self,
        student: &'a dyn Student,
        name: &'a str,
        dir: &'a Path,
        config: &'a StageConfig,
    ) -> StageRun<'a> {
        StageRun {
            name,
            out_dir: dir,
            varmap: student.varmap(),
            config,
            resume: false,
            show_progress: self.progress,
        }
    }

    /// Text distillation on D-text.
    pub fn distill_text(&self, student: &dyn Student, name: &str) -> anyhow::Result<()> {
        let dir = self.out.join(name);
        let run = self.run(student, "distill_text", &dir, &self.demo.pretrain);
        distill_text(student, &self.world.dtext(), run, &self.device, None)
            .with_context(|| format!("{name}: text distillation"))?;
        Ok(())
    }

    /// Image distillation on `images` (the pre-training split unless Figure 6 varies it).
    pub fn distill_image(
        &self,
        student: &dyn Student,
        images: &dyn ImageFeatureSet,
        name: &str,
    ) -> anyhow::Result<()> {
        let dir = self.out.join(name);
        let run = self.run(student, "distill_image", &dir, &self.demo.pretrain);
        distill_image(student, images, run, &self.device, None)
            .with_context(|| format!("{name}: image distillation"))?;
        Ok(())
    }

    /// Dual-loss fine-tuning of the image encoder on the training split with KL weight
    /// `lambda`, against the student's current text encoder.
    pub fn finetune(&self, student: &dyn Student, lambda: f64, name: &str) -> anyhow::Result<()> {
        let dir = self.out.join(name);
        // Fine-tuning learns the labels of its own data: the seen pairs.
        let train_prompts = World::split_prompts(Split::Train);
        let targets = FinetuneTargets {
            student_classes: self.class_embeddings(student, &train_prompts)?,
            teacher_classes: class_embeddings(&train_prompts, |t| {
                self.world.teacher().text_features(t)
            })?,
            teacher_logit_scale: self.demo.teacher_logit_scale,
        };
        let loss = DualLossConfig {
            lambda,
            ..self.demo.dual_loss.clone()
        };
        let run = self.run(student, "finetune", &dir, &self.demo.finetune);
        let train = self.world.images(Split::Train);
        finetune(student, &train, &targets, &loss, run, &self.device, None)
            .with_context(|| format!("{name}: fine-tuning (lambda {lambda})"))?;
        Ok(())
    }

    /// Pre-training (text, then image distillation) and, when asked, fine-tuning with the
    /// default lambda, keeping the weights at each point.
    pub fn recipe(&self, arch: Arch, name: &str, fine_tune: bool) -> anyhow::Result<Trained> {
        let student = self.build(arch)?;
        let init = Snapshot::take(student.as_ref())?;
        self.distill_text(student.as_ref(), name)?;
        self.distill_image(student.as_ref(), &self.world.images(Split::Pretrain), name)?;
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

    /// Prompt-ensembled class embeddings from the student's text encoder.
    pub fn class_embeddings(
        &self,
        student: &dyn Student,
        prompts: &DatasetPrompts,
    ) -> anyhow::Result<Tensor> {
        student_class_embeddings(
            student,
            self.world.tokenizer(),
            prompts,
            self.world.config().max_len,
            &self.device,
        )
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
