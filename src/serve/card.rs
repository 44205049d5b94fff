//! `GET /v1/model`: what the service runs, so a client can tell one checkpoint from another
//! and knows which label sets it may ask for.

use std::path::Path;

use serde::Serialize;

use super::engine::EngineConfig;
use crate::data::prompts::DatasetPrompts;
use crate::model::checkpoint::{ModelKind, TokenizerSpec};
use crate::model::config::SpikeClipConfig;
use crate::recipe::classifier::LoadedStudent;
use crate::train::checkpoint::named_vars;

/// The model card.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub checkpoint: String,
    pub kind: &'static str,
    /// `paper` or `tiny` when the configuration is that preset's, else `custom`.
    pub preset: &'static str,
    pub config: SpikeClipConfig,
    pub parameters: Parameters,
    pub tokenizer: String,
    /// The image path requests run: `spike-driven` or `dense`.
    pub image_path: &'static str,
    /// Where the model runs: `cpu`, `cuda:0`.
    pub device: String,
    pub time_steps: usize,
    pub default_labels: Vec<String>,
    pub prompt_sets: Vec<String>,
    pub energy_precision: String,
    /// The teacher whose ranking answers show beside the student's, if any.
    pub teacher: Option<String>,
    /// The stages the checkpoint was trained through, with their scores, from the report of
    /// the `demo` run that wrote it; none for a checkpoint without one.
    pub training: Option<serde_json::Value>,
    pub batching: Batching,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parameters {
    pub image: usize,
    pub text: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Batching {
    pub window_ms: f64,
    pub max_batch: usize,
    pub queue_bound: usize,
}

impl ModelInfo {
    pub fn of(
        loaded: &LoadedStudent,
        config: &EngineConfig,
        default: &DatasetPrompts,
        image_path: &'static str,
        teacher: Option<&str>,
    ) -> Self {
        let count = |prefix: &str| {
            named_vars(loaded.student.varmap())
                .iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .map(|(_, v)| v.elem_count())
                .sum::<usize>()
        };
        let (image, text) = (count("image."), count("text."));
        let card = &loaded.card;
        let preset = ["paper", "tiny"]
            .into_iter()
            .find(|p| SpikeClipConfig::preset(p).is_ok_and(|c| c == card.config))
            .unwrap_or("custom");
        Self {
            checkpoint: config.checkpoint.display().to_string(),
            kind: match card.kind {
                ModelKind::SpikeClip => "SpikeCLIP (spiking)",
                ModelKind::ScratchClip => "ScratchCLIP (ANN twin)",
            },
            preset,
            config: card.config.clone(),
            parameters: Parameters {
                image,
                text,
                total: image + text,
            },
            tokenizer: match &card.tokenizer {
                TokenizerSpec::World => "the built-in world's word tokenizer".to_string(),
                TokenizerSpec::Clip { path } => format!("CLIP BPE ({})", path.display()),
            },
            image_path,
            device: crate::ops::device::name(&config.device),
            time_steps: loaded.student.time_steps(),
            default_labels: default.classes.iter().map(|c| c[0].clone()).collect(),
            prompt_sets: config
                .prompts
                .as_ref()
                .map(|p| p.datasets.keys().cloned().collect())
                .unwrap_or_default(),
            energy_precision: config.constants.preset.clone(),
            teacher: teacher.map(str::to_string),
            training: demo_stages(&config.checkpoint),
            batching: Batching {
                window_ms: config.batch.window.as_secs_f64() * 1e3,
                max_batch: config.batch.max_batch,
                queue_bound: config.batch.queue_bound,
            },
        }
    }
}

/// `report.json` beside a demo checkpoint holds its stages under the checkpoint's name.
fn demo_stages(checkpoint: &Path) -> Option<serde_json::Value> {
    let name = checkpoint.file_name()?.to_str()?;
    let report = std::fs::read_to_string(checkpoint.parent()?.join("report.json")).ok()?;
    let report: serde_json::Value = serde_json::from_str(&report).ok()?;
    report.get(name)?.get("stages").cloned()
}
