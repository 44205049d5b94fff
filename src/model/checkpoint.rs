//! Model checkpoints: the weights as safetensors plus `model.json` in the same directory, which
//! says which student, which configuration and which tokenizer, so a checkpoint is usable alone.
//!
//! Loading checks every tensor's name and shape against the model the card describes and
//! reports all mismatches in one error. Training checkpoints (`*_last.safetensors`,
//! `*_best.safetensors`, with their `model.` prefix and optimiser state) load the same way.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::config::SpikeClipConfig;
use super::{ScratchClip, SpikeClip};
use crate::data::world::{World, WorldConfig};
use crate::recipe::Student;
use crate::teacher::tokenizer::ClipTokenizer;
use crate::teacher::Tokenize;
use crate::train::checkpoint::{named_vars, write_atomic_with};

/// Which student a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    SpikeClip,
    ScratchClip,
}

/// How the student's text side turns sentences into ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenizerSpec {
    /// The built-in world's word-level tokenizer.
    World,
    /// CLIP's BPE from this file (`tokenizer.json` or `bpe_simple_vocab_16e6.txt.gz`).
    Clip { path: PathBuf },
}

impl TokenizerSpec {
    /// The tokenizer this spec names; an unreadable file is named in the error.
    pub fn open(&self) -> anyhow::Result<Box<dyn Tokenize>> {
        Ok(match self {
            TokenizerSpec::World => {
                Box::new(World::new(WorldConfig::default()).tokenizer().clone())
            }
            TokenizerSpec::Clip { path: p } => {
                let tok = if p.is_dir() {
                    ClipTokenizer::from_dir(p)
                } else if p.extension().is_some_and(|e| e == "gz") {
                    ClipTokenizer::from_bpe_gz(p)
                } else {
                    ClipTokenizer::from_tokenizer_json(p)
                };
                Box::new(tok.with_context(|| format!("loading the tokenizer {}", p.display()))?)
            }
        })
    }
}

/// `model.json`: what to build before the weights can be loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub kind: ModelKind,
    pub config: SpikeClipConfig,
    pub tokenizer: TokenizerSpec,
}

impl ModelCard {
    pub fn build(&self, device: &Device) -> anyhow::Result<Box<dyn Student>> {
        self.build_seeded(0, device)
    }

    /// A fresh student whose initial weights `seed` fixes.
    pub fn build_seeded(&self, seed: u64, device: &Device) -> anyhow::Result<Box<dyn Student>> {
        Ok(match self.kind {
            ModelKind::SpikeClip => Box::new(SpikeClip::new(&self.config, seed, device)?),
            ModelKind::ScratchClip => Box::new(ScratchClip::new(&self.config, seed, device)?),
        })
    }
}

const CARD: &str = "model.json";
const WEIGHTS: &str = "model.safetensors";
/// Prefix of the weights inside a training checkpoint.
const TRAINING_PREFIX: &str = "model.";

/// Writes `dir/model.safetensors` and `dir/model.json`, each atomically.
pub fn save(dir: &Path, student: &dyn Student, card: &ModelCard) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> = named_vars(student.varmap())
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let weights = dir.join(WEIGHTS);
    write_atomic_with(&weights, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })?;
    let json = serde_json::to_vec_pretty(card)?;
    write_atomic_with(&dir.join(CARD), |tmp| Ok(std::fs::write(tmp, &json)?))?;
    Ok(weights)
}

/// Loads a checkpoint: a directory holding `model.safetensors`, or any safetensors file whose
/// directory holds `model.json`.
pub fn load(path: &Path, device: &Device) -> anyhow::Result<(Box<dyn Student>, ModelCard)> {
    if !path.exists() {
        bail!(
            "checkpoint {}: no such directory or weights file (it does not exist)",
            path.display()
        );
    }
    let weights = if path.is_dir() {
        path.join(WEIGHTS)
    } else {
        path.to_path_buf()
    };
    let dir = weights.parent().unwrap_or(Path::new("."));
    let card_path = dir.join(CARD);
    let text = std::fs::read_to_string(&card_path).with_context(|| {
        format!(
            "reading {} (a checkpoint needs its model.json beside the weights)",
            card_path.display()
        )
    })?;
    let card: ModelCard = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid model card", card_path.display()))?;
    let student = card
        .build(device)
        .with_context(|| format!("{}: the model it describes", card_path.display()))?;
    load_weights(student.as_ref(), &weights)?;
    Ok((student, card))
}

/// Copies the tensors of `path` into the student's variables after checking that names and
/// shapes match exactly; every problem is listed in the one error.
pub fn load_weights(student: &dyn Student, path: &Path) -> anyhow::Result<()> {
    let mut stored = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading weights from {}", path.display()))?;
    if stored.keys().any(|k| k.starts_with(TRAINING_PREFIX)) {
        stored = stored
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(TRAINING_PREFIX).map(|n| (n.to_string(), v)))
            .collect();
    }
    assign(student.varmap(), "", stored, path)
}

/// Sets the variables of `varmap` under `prefix` from `tensors`, which must hold exactly those
/// names with exactly their shapes; every missing, unexpected or wrong-shaped tensor is listed
/// in one error naming `source`.
pub fn assign(
    varmap: &VarMap,
    prefix: &str,
    mut tensors: HashMap<String, Tensor>,
    source: &Path,
) -> anyhow::Result<()> {
    let mut vars = named_vars(varmap);
    vars.retain(|(name, _)| name.starts_with(prefix));
    let mut problems = Vec::new();
    for (name, var) in &vars {
        match tensors.get(name) {
            None => problems.push(format!("missing {name} {:?}", var.dims())),
            Some(t) if t.dims() != var.dims() => problems.push(format!(
                "{name}: file has {:?}, model expects {:?}",
                t.dims(),
                var.dims()
            )),
            Some(_) => {}
        }
    }
    let known: HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|k| format!("unexpected {k}")));
    if !problems.is_empty() {
        bail!(
            "{} does not fit the model ({} problems):\n  {}",
            source.display(),
            problems.len(),
            problems.join("\n  ")
        );
    }
    for (name, var) in vars {
        let t = tensors.remove(&name).expect("checked above");
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)
            .with_context(|| format!("{}: setting {name}", source.display()))?;
    }
    Ok(())
}
