//! The model side of the service: a loaded checkpoint on the batching queue's thread, answering
//! classify and embed jobs a batch at a time.
//!
//! Images of one batch go through the image encoder together (spike-driven for a spiking
//! checkpoint, as `classify` runs it), with the LIF monitors tapping each input's own spikes, so
//! every answer reports its own image's firing rates, energy and raster, not the batch's
//! average. Label sets are turned into class embeddings once and cached.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::card::ModelInfo;
use super::queue::{BatchConfig, Batcher, Startup};
use crate::data::prompts::{DatasetPrompts, PromptSet};
use crate::energy::{EncoderEnergy, EncoderOps, EnergyConstants, FiringRates};
use crate::neuron::SampleSpikes;
use crate::recipe::classifier::{ranked_probabilities, Inference, LoadedStudent};

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

/// Loads the checkpoint on a new model thread and returns the queue to it with the model card.
pub fn start(config: EngineConfig) -> anyhow::Result<(Engine, ModelInfo)> {
    Batcher::start(
        config.batch,
        move |startup: Startup<Job, Answer, ModelInfo>| {
            let loaded = LoadedStudent::open(&config.checkpoint, &config.device)?;
            let inference = loaded.for_inference(config.dense)?;
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
            };
            // Fails here, at startup, if the default labels cannot be embedded.
            model.class_embeddings(&Labels::Default)?;
            let info = ModelInfo::of(
                &loaded,
                &config,
                &model.default,
                model.inference.image_path(),
            );
            startup.serve(info, |jobs| model.run(jobs));
            Ok(())
        },
    )
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
        let features = match self.image_features(&images) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("{e:#}");
                return jobs.iter().map(|_| Answer::Failed(msg.clone())).collect();
            }
        };
        let mut next_image = 0;
        jobs.into_iter()
            .map(|job| {
                let answer = match job {
                    Job::EmbedText { texts } => self.text_features(&texts),
                    Job::EmbedImage { .. } => {
                        next_image += 1;
                        row(&features.0, next_image - 1).map(|f| Answer::Features(vec![f]))
                    }
                    Job::Classify { labels, raster, .. } => {
                        next_image += 1;
                        let spikes = features.1.get(next_image - 1);
                        self.classify(&features.0, next_image - 1, &labels, spikes, raster)
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

    fn classify(
        &mut self,
        features: &Tensor,
        index: usize,
        labels: &Labels,
        spikes: Option<&BTreeMap<String, SampleSpikes>>,
        raster: bool,
    ) -> anyhow::Result<Answer> {
        let cached_labels = self.cache.contains_key(labels);
        let (names, classes) = match self.class_embeddings(labels) {
            Ok(c) => c,
            Err(e) => return Ok(Answer::Rejected(format!("{e:#}"))),
        };
        let probs = ranked_probabilities(&features.narrow(0, index, 1)?, &classes)?;
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
        };
        if let (Some(ops), Some(spikes)) = (&self.image_ops, spikes) {
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
        let prompts = match labels {
            Labels::Default => self.default.clone(),
            Labels::Names(names) => self.loaded.prompts_for_labels(names)?,
            Labels::PromptSet(name) => self
                .config
                .prompts
                .as_ref()
                .and_then(|p| p.datasets.get(name))
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("unknown prompt set {name:?}"))?,
        };
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
