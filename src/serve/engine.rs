//! The model side of the service: a loaded checkpoint on the batching queue's thread, answering
//! classify and embed jobs a batch at a time.
//!
//! Images of one batch go through the image encoder together (spike-driven for a spiking
//! checkpoint, as `classify` runs it), with the LIF monitors tapping each input's own spikes, so
//! every answer reports its own image's firing rates, energy and raster, not the batch's
//! average. Label sets are turned into class embeddings once and cached.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::card::ModelInfo;
use super::page::Samples;
use super::queue::{BatchConfig, Batcher, Startup};
use super::teacher::{Teacher, TeacherAnswer, TeacherChoice, TeacherImage, TeacherView};
use crate::data::prompts::{DatasetPrompts, PromptSet};
use crate::energy::{EncoderEnergy, EncoderOps, EnergyConstants, FiringRates};
use crate::neuron::SampleSpikes;
use crate::recipe::classifier::{ranked_probabilities, Inference, LoadedStudent};
use crate::teacher::ModelSpec;

/// Neurons per layer in a response's raster.
pub const RASTER_NEURONS: usize = 48;
/// Label sets whose class embeddings are kept.
const LABEL_CACHE: usize = 64;

/// What the service runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub checkpoint: PathBuf,
    /// Run a spiking image encoder on its dense path instead of the spike-driven one.
    pub dense: bool,
    /// Label names used when a request names none (none: the world's classes for a world
    /// checkpoint).
    pub default_labels: Vec<String>,
    /// The dataset of `prompts` used when a request names no labels, instead of
    /// `default_labels`.
    pub default_prompt_set: Option<String>,
    /// Prompt sets requests may name.
    pub prompts: Option<PromptSet>,
    pub constants: EnergyConstants,
    pub batch: BatchConfig,
    /// `--teacher`: the CLIP whose ranking each answer shows beside the student's (none: the
    /// world's analytic teacher for a world-trained checkpoint, see [`TeacherChoice`]).
    pub teacher: Option<ModelSpec>,
    /// Where the model runs; uploads are decoded and prepared on the CPU.
    pub device: Device,
}

/// Where a request's labels come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Labels {
    /// The server's default label set.
    Default,
    Names(Vec<String>),
    /// A dataset of the server's prompts file.
    PromptSet(String),
}

/// A unit of work for the model thread.
#[derive(Debug)]
pub enum Job {
    Classify {
        /// `[1, 3, 32, 32]`.
        image: Tensor,
        /// The image as the server's teacher reads it, when it has one.
        teacher_image: Option<TeacherImage>,
        labels: Labels,
        raster: bool,
    },
    EmbedImage {
        image: Tensor,
    },
    EmbedText {
        texts: Vec<String>,
    },
}

/// A label and its probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    pub label: String,
    pub probability: f32,
}

/// A LIF layer's activity for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerActivity {
    pub layer: String,
    pub firing_rate: f64,
    pub per_step_rates: Vec<f64>,
}

/// Spike trains of a few neurons of one layer for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRaster {
    pub layer: String,
    /// Indices into the layer's neurons (per time step) of the rows below.
    pub neurons: Vec<usize>,
    /// `[neuron][step]`, 1 where it fired.
    pub spikes: Vec<Vec<u8>>,
}

/// The image encoder's energy for this image against its ANN twin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InferenceEnergy {
    pub snn_mj: f64,
    pub ann_mj: f64,
    pub reduction_rate: f64,
    pub snn_sops: f64,
    pub snn_macs: f64,
    pub ann_macs: f64,
    pub precision: String,
}

/// What a classify job returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Classification {
    pub ranked: Vec<Ranked>,
    /// `spike-driven` or `dense`.
    pub image_path: &'static str,
    /// Per LIF layer of the image encoder; empty for a network without spikes.
    pub firing_rates: Vec<LayerActivity>,
    pub energy: Option<InferenceEnergy>,
    /// Present when asked for.
    pub raster: Option<Vec<LayerRaster>>,
    /// Whether the label set's class embeddings came from the cache.
    pub cached_labels: bool,
    /// The teacher's ranking of the same labels, when the server has a teacher.
    pub teacher: Option<TeacherAnswer>,
}

/// A job's answer, or why the job's input was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Classified(Box<Classification>),
    Features(Vec<Vec<f32>>),
    Rejected(String),
    Failed(String),
}

/// The service's handle on the model thread.
pub type Engine = Batcher<Job, Answer>;

/// What the model thread reports once it is ready: the model card, and how the handlers
/// prepare an upload for the teacher, when there is one.
pub struct Ready {
    pub info: ModelInfo,
    pub teacher: Option<TeacherView>,
}

/// Loads the checkpoint (and its teacher) on a new model thread and returns the queue to it.
pub fn start(config: EngineConfig, samples: Arc<Samples>) -> anyhow::Result<(Engine, Ready)> {
    Batcher::start(config.batch, move |startup: Startup<Job, Answer, Ready>| {
        let loaded = LoadedStudent::open(&config.checkpoint, &config.device)?;
        let inference = loaded.for_inference(config.dense)?;
        let (teacher, view) =
            match TeacherChoice::resolve(config.teacher.as_ref(), &loaded.card.tokenizer) {
                Some(choice) => {
                    let (teacher, view) = Teacher::load(&choice, samples)?;
                    (Some(teacher), Some(view))
                }
                None => (None, None),
            };
        let default = match &config.default_prompt_set {
            Some(set) => config
                .prompts
                .as_ref()
                .and_then(|p| p.datasets.get(set))
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no prompt set {set:?} in the prompts file"))?,
            None => loaded.prompts_for_labels(&config.default_labels)?,
        };
        let mut model = Model {
            loaded: &loaded,
            image_ops: image_ops(&loaded),
            inference,
            default,
            config: &config,
            cache: HashMap::new(),
            teacher,
        };
        // Fails here, at startup, if the default labels cannot be embedded.
        model.class_embeddings(&Labels::Default)?;
        let info = ModelInfo::of(
            &loaded,
            &config,
            &model.default,
            model.inference.image_path(),
            model.teacher.as_ref().map(Teacher::name),
        );
        let ready = Ready {
            info,
            teacher: view,
        };
        startup.serve(ready, |jobs| model.run(jobs));
        Ok(())
    })
}

/// The image encoder's ops and monitors, for a spiking student.
fn image_ops(loaded: &LoadedStudent) -> Option<EncoderOps> {
    loaded
        .student
        .energy_ops()?
        .into_iter()
        .find(|e| e.name == "image")
}

struct Model<'a> {
    loaded: &'a LoadedStudent,
    inference: Inference<'a>,
    image_ops: Option<EncoderOps>,
    default: DatasetPrompts,
    config: &'a EngineConfig,
    /// Class names and unit class embeddings `[C, D]` per label set.
    cache: HashMap<Labels, (Vec<String>, Tensor)>,
    teacher: Option<Teacher>,
}

impl Model<'_> {
    fn run(&mut self, jobs: Vec<Job>) -> Vec<Answer> {
        let images: Vec<Tensor> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Classify { image, .. } | Job::EmbedImage { image } => Some(image.clone()),
                Job::EmbedText { .. } => None,
            })
            .collect();
        let teacher_images: Vec<Option<&TeacherImage>> = jobs
            .iter()
            .map(|j| match j {
                Job::Classify { teacher_image, .. } => teacher_image.as_ref(),
                _ => None,
            })
            .collect();
        let features = self.image_features(&images).and_then(|f| {
            let teacher = match &self.teacher {
                Some(t) => t.image_features(&teacher_images)?,
                None => vec![None; jobs.len()],
            };
            Ok((f, teacher))
        });
        let ((features, spikes), teacher_features) = match features {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("{e:#}");
                return jobs.iter().map(|_| Answer::Failed(msg.clone())).collect();
            }
        };
        let mut next_image = 0;
        jobs.into_iter()
            .zip(teacher_features)
            .map(|(job, teacher_feature)| {
                let answer = match job {
                    Job::EmbedText { texts } => self.text_features(&texts),
                    Job::EmbedImage { .. } => {
                        next_image += 1;
                        row(&features, next_image - 1).map(|f| Answer::Features(vec![f]))
                    }
                    Job::Classify { labels, raster, .. } => {
                        next_image += 1;
                        let image = Image {
                            features: &features,
                            index: next_image - 1,
                            spikes: spikes.get(next_image - 1),
                            teacher: teacher_feature.as_ref(),
                        };
                        self.classify(image, &labels, raster)
                    }
                };
                answer.unwrap_or_else(|e| Answer::Failed(format!("{e:#}")))
            })
            .collect()
    }

    /// Features `[B, D]` of the batch's images, and each image's spikes per LIF layer when the
    /// image encoder spikes.
    fn image_features(
        &self,
        images: &[Tensor],
    ) -> anyhow::Result<(Tensor, Vec<BTreeMap<String, SampleSpikes>>)> {
        if images.is_empty() {
            return Ok((
                Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?,
                vec![],
            ));
        }
        let x = Tensor::cat(images, 0)?.to_device(&self.config.device)?;
        let student = self.inference.student();
        match &self.image_ops {
            Some(ops) => ops
                .monitors
                .record_samples(images.len(), RASTER_NEURONS, || {
                    Ok(student.image_features(&x, false)?)
                }),
            None => Ok((student.image_features(&x, false)?, vec![])),
        }
    }

    fn text_features(&self, texts: &[String]) -> anyhow::Result<Answer> {
        let len = self.loaded.card.config.text.context_length;
        let ids = self.loaded.tokenizer.encode(texts, len)?;
        let ids = Tensor::from_vec(ids.concat(), (texts.len(), len), &self.config.device)?;
        let feats = self.inference.student().text_features(&ids, false)?;
        Ok(Answer::Features(feats.to_vec2()?))
    }

    fn classify(&mut self, image: Image, labels: &Labels, raster: bool) -> anyhow::Result<Answer> {
        let cached_labels = self.cache.contains_key(labels);
        let (names, classes) = match self.class_embeddings(labels) {
            Ok(c) => c,
            Err(e) => return Ok(Answer::Rejected(format!("{e:#}"))),
        };
        let probs = ranked_probabilities(&image.features.narrow(0, image.index, 1)?, &classes)?;
        let ranked = probs[0]
            .iter()
            .map(|&(c, p)| Ranked {
                label: names[c].clone(),
                probability: p,
            })
            .collect();
        let mut out = Classification {
            ranked,
            image_path: self.inference.image_path(),
            firing_rates: Vec::new(),
            energy: None,
            raster: None,
            cached_labels,
            teacher: None,
        };
        if let Some(teacher) = self.teacher.as_mut() {
            let (default, prompts) = (&self.default, self.config.prompts.as_ref());
            let loaded = self.loaded;
            out.teacher = Some(teacher.answer(image.teacher, labels, || {
                label_prompts(labels, default, prompts, loaded)
            })?);
        }
        if let (Some(ops), Some(spikes)) = (&self.image_ops, image.spikes) {
            let counts: FiringRates = spikes
                .iter()
                .map(|(k, s)| (k.clone(), s.counts.clone()))
                .collect();
            let energy = EncoderEnergy::account(
                ops,
                &counts,
                self.loaded.student.time_steps(),
                &self.config.constants,
            )?;
            out.firing_rates = energy
                .firing_rates
                .iter()
                .map(|r| LayerActivity {
                    layer: r.name.clone(),
                    firing_rate: r.firing_rate,
                    per_step_rates: r.per_step_rates.clone(),
                })
                .collect();
            out.energy = Some(InferenceEnergy {
                snn_mj: energy.snn.totals.energy_mj,
                ann_mj: energy.ann.totals.energy_mj,
                reduction_rate: energy.reduction_rate,
                snn_sops: energy.snn.totals.sops,
                snn_macs: energy.snn.totals.macs,
                ann_macs: energy.ann.totals.macs,
                precision: self.config.constants.preset.clone(),
            });
            if raster {
                out.raster = Some(
                    ops.monitors
                        .names()
                        .filter_map(|name| spikes.get(name).map(|s| layer_raster(name, s)))
                        .collect(),
                );
            }
        }
        Ok(Answer::Classified(Box::new(out)))
    }

    /// The label set's class names and embeddings, from the cache when it has them.
    fn class_embeddings(&mut self, labels: &Labels) -> anyhow::Result<(Vec<String>, Tensor)> {
        if let Some(hit) = self.cache.get(labels) {
            return Ok(hit.clone());
        }
        let prompts = label_prompts(
            labels,
            &self.default,
            self.config.prompts.as_ref(),
            self.loaded,
        )?;
        let classes = self
            .loaded
            .class_embeddings(&prompts, &self.config.device)?;
        let names: Vec<String> = prompts.classes.iter().map(|c| c[0].clone()).collect();
        if self.cache.len() >= LABEL_CACHE {
            self.cache.clear();
        }
        self.cache
            .insert(labels.clone(), (names.clone(), classes.clone()));
        Ok((names, classes))
    }
}

/// One image of a batch: its row of the student's features, its spikes, the teacher's feature.
struct Image<'a> {
    features: &'a Tensor,
    index: usize,
    spikes: Option<&'a BTreeMap<String, SampleSpikes>>,
    teacher: Option<&'a Tensor>,
}

/// The prompts of the label set `labels` names.
fn label_prompts(
    labels: &Labels,
    default: &DatasetPrompts,
    prompts: Option<&PromptSet>,
    loaded: &LoadedStudent,
) -> anyhow::Result<DatasetPrompts> {
    match labels {
        Labels::Default => Ok(default.clone()),
        Labels::Names(names) => loaded.prompts_for_labels(names),
        Labels::PromptSet(name) => prompts
            .and_then(|p| p.datasets.get(name))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("unknown prompt set {name:?}")),
    }
}

fn row(features: &Tensor, index: usize) -> anyhow::Result<Vec<f32>> {
    Ok(features.get(index)?.to_vec1()?)
}

fn layer_raster(name: &str, spikes: &SampleSpikes) -> LayerRaster {
    LayerRaster {
        layer: name.to_string(),
        neurons: spikes.raster_neurons.clone(),
        spikes: spikes
            .raster
            .iter()
            .map(|train| train.iter().map(|&s| u8::from(s)).collect())
            .collect(),
    }
}
