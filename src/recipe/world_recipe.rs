//! The recipe's stages on the built-in world, shared by `demo` and the experiments: one
//! place that knows which split each stage reads, which label set fine-tuning learns and
//! where each training writes its checkpoints.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};

use super::demo::DemoConfig;
use super::health::HealthProbe;
use super::stages::{distill_image, distill_text, finetune, student_class_embeddings};
use super::{FinetuneTargets, Student};
use crate::data::prompts::DatasetPrompts;
use crate::data::world::{Split, World};
use crate::data::ImageFeatureSet;
use crate::eval::zeroshot::class_embeddings;
use crate::model::config::{ReadoutKind, SpikeClipConfig, TextEncoderKind};
use crate::model::{ScratchClip, SpikeClip};
use crate::teacher::TextTeacher;
use crate::train::loss::DualLossConfig;
use crate::train::stage::{EpochRecord, StageConfig, StageObserver, StageRun};

/// Which student a recipe run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// SpikeCLIP with the given readout and text tower.
    Spiking {
        readout: ReadoutKind,
        text: TextEncoderKind,
    },
    /// ScratchCLIP, the ANN twin.
    Ann,
}

impl Arch {
    /// SpikeCLIP as `cfg` describes it.
    pub fn spiking(cfg: &SpikeClipConfig) -> Self {
        Self::Spiking {
            readout: cfg.readout,
            text: cfg.text.kind,
        }
    }
}

/// The world, the sizes and schedules, and where trainings write (`out/NAME/`).
pub struct WorldRecipe {
    pub demo: DemoConfig,
    pub world: World,
    pub out: PathBuf,
    pub progress: bool,
    pub device: Device,
}

impl WorldRecipe {
    pub fn new(demo: DemoConfig, out: &Path, progress: bool, device: &Device) -> Self {
        Self {
            world: World::new(demo.world.clone()),
            demo,
            out: out.to_path_buf(),
            progress,
            device: device.clone(),
        }
    }

    /// The demo's model configuration with `arch`'s variations.
    pub fn config(&self, arch: Arch) -> SpikeClipConfig {
        let mut cfg = self.demo.model.clone();
        if let Arch::Spiking { readout, text } = arch {
            cfg.readout = readout;
            cfg.text.kind = text;
        }
        cfg
    }

    /// A fresh student of `arch`, seeded by the world's seed.
    pub fn build(&self, arch: Arch) -> anyhow::Result<Box<dyn Student>> {
        let (cfg, seed) = (self.config(arch), self.demo.world.seed);
        Ok(match arch {
            Arch::Spiking { .. } => Box::new(SpikeClip::new(&cfg, seed, &self.device)?),
            Arch::Ann => Box::new(ScratchClip::new(&cfg, seed, &self.device)?),
        })
    }

    fn run<'a>(
        &'a self,
        student: &'a dyn Student,
        stage: &'a str,
        dir: &'a Path,
        config: &'a StageConfig,
    ) -> anyhow::Result<StageRun<'a>> {
        // The health log's probe, when the demo asks for one.
        let observer = match self.demo.health {
            true => Some(Box::new(HealthProbe::new(self, student, dir)?) as Box<dyn StageObserver>),
            false => None,
        };
        Ok(StageRun {
            name: stage,
            out_dir: dir,
            varmap: student.varmap(),
            config,
            resume: false,
            show_progress: self.progress,
            observer,
        })
    }

    /// Text distillation on D-text; the per-epoch losses.
    pub fn distill_text(
        &self,
        student: &dyn Student,
        name: &str,
    ) -> anyhow::Result<Vec<EpochRecord>> {
        let dir = self.out.join(name);
        let run = self.run(student, "distill_text", &dir, &self.demo.pretrain)?;
        Ok(
            distill_text(student, &self.world.dtext(), run, &self.device, None)
                .with_context(|| format!("{name}: text distillation"))?
                .epochs,
        )
    }

    /// Image distillation on `images` (the pre-training split unless an experiment varies it).
    pub fn distill_image(
        &self,
        student: &dyn Student,
        images: &dyn ImageFeatureSet,
        name: &str,
    ) -> anyhow::Result<Vec<EpochRecord>> {
        let dir = self.out.join(name);
        let run = self.run(student, "distill_image", &dir, &self.demo.pretrain)?;
        Ok(distill_image(student, images, run, &self.device, None)
            .with_context(|| format!("{name}: image distillation"))?
            .epochs)
    }

    /// Dual-loss fine-tuning of the image encoder on the training split with KL weight
    /// `lambda`, against the student's current text encoder.
    pub fn finetune(
        &self,
        student: &dyn Student,
        lambda: f64,
        name: &str,
    ) -> anyhow::Result<Vec<EpochRecord>> {
        let dir = self.out.join(name);
        // Fine-tuning learns the labels of its own data: the seen pairs. Scoring against all
        // pairs would push the held-out ones down.
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
        let run = self.run(student, "finetune", &dir, &self.demo.finetune)?;
        let train = self.world.images(Split::Train);
        Ok(
            finetune(student, &train, &targets, &loss, run, &self.device, None)
                .with_context(|| format!("{name}: fine-tuning (lambda {lambda})"))?
                .epochs,
        )
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
}
