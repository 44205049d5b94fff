//! Checkpoints that survive a crash mid-write: everything needed to resume (weights, optimiser
//! moments, RNG, counters, best metric) goes into one safetensors file written to a temporary
//! name in the same directory, synced, then renamed over the old one, so a reader sees either
//! the previous checkpoint or the new one, never a torn mix.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::optim::Adam;
use super::rng::Rng;

/// Runs `write` on a temporary path next to `path`, syncs it and renames it onto `path`. If
/// `write` fails the temporary file is removed and `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp)
        .and_then(|()| {
            File::open(&tmp)?.sync_all()?;
            Ok(())
        })
        .and_then(|()| Ok(std::fs::rename(&tmp, path)?));
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err.context(format!("writing {}", path.display())));
    }
    // The rename itself is durable only once the directory entry is synced.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Everything but tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimiser steps completed.
    pub step: u64,
    /// Best validation metric so far (higher is better), if any was measured.
    pub best_metric: Option<f64>,
    pub rng: Rng,
}

impl TrainState {
    /// Records a validation metric (higher is better) and says whether it is a new best, in
    /// which case the caller keeps this epoch's checkpoint as the best one.
    pub fn record_metric(&mut self, metric: f64) -> bool {
        let better = metric.is_finite() && self.best_metric.is_none_or(|best| metric > best);
        if better {
            self.best_metric = Some(metric);
        }
        better
    }
}

const MODEL: &str = "model.";
const OPTIM: &str = "optim.";
const STATE: &str = "train_state_json";

/// The model's parameters by name, sorted so that every run sees them in the same order.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Writes the bundle atomically to `path`.
pub fn save(path: &Path, varmap: &VarMap, optim: &Adam, state: &TrainState) -> anyhow::Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in named_vars(varmap) {
        tensors.insert(format!("{MODEL}{name}"), var.as_tensor().clone());
    }
    for (name, t) in optim.state_tensors()? {
        tensors.insert(format!("{OPTIM}{name}"), t);
    }
    let json = serde_json::to_vec(state)?;
    let n = json.len();
    tensors.insert(STATE.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
    write_atomic_with(path, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })
}

/// A bundle read from disk, checked against nothing yet.
struct Bundle {
    source: String,
    state: TrainState,
    weights: HashMap<String, Tensor>,
    optim: HashMap<String, Tensor>,
}

fn read_bundle(path: &Path) -> anyhow::Result<Bundle> {
    let source = path.display().to_string();
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading checkpoint {source}"))?;
    let json = tensors.remove(STATE).with_context(|| {
        format!("checkpoint {source}: no `{STATE}` entry (not a training checkpoint)")
    })?;
    let state: TrainState = serde_json::from_slice(&json.to_dtype(DType::U8)?.to_vec1::<u8>()?)
        .with_context(|| format!("checkpoint {source}: corrupt training state"))?;
    let mut optim = HashMap::new();
    let mut weights = HashMap::new();
    for (key, t) in tensors {
        if let Some(rest) = key.strip_prefix(OPTIM) {
            optim.insert(rest.to_string(), t);
        } else if let Some(rest) = key.strip_prefix(MODEL) {
            weights.insert(rest.to_string(), t);
        } else {
            bail!("checkpoint {source}: unexpected entry `{key}`");
        }
    }
    Ok(Bundle {
        source,
        state,
        weights,
        optim,
    })
}

/// Pairs every parameter of `varmap` with its saved value, refusing missing, extra or
/// differently shaped parameters, so a checkpoint of another model or config is never
/// half-loaded.
fn match_weights(
    mut weights: HashMap<String, Tensor>,
    varmap: &VarMap,
    source: &str,
) -> anyhow::Result<Vec<(candle_core::Var, Tensor)>> {
    let mut matched = Vec::new();
    for (name, var) in named_vars(varmap) {
        let t = weights.remove(&name).with_context(|| {
            format!("checkpoint {source}: parameter `{name}` missing (a checkpoint of another model or config?)")
        })?;
        if t.dims() != var.dims() {
            bail!(
                "checkpoint {source}: parameter `{name}` has shape {:?}, the model expects {:?} (a checkpoint of another config?)",
                t.dims(),
                var.dims()
            );
        }
        matched.push((var, t));
    }
    if let Some(extra) = weights.keys().min() {
        bail!("checkpoint {source}: parameter `{extra}` is not in the model (a checkpoint of another config?)");
    }
    Ok(matched)
}

fn assign(matched: Vec<(candle_core::Var, Tensor)>) -> anyhow::Result<()> {
    for (var, t) in matched {
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Loads a bundle written by [`save`] into `varmap` and `optim` to resume training, checking
/// that it was saved for a model with exactly these parameter names and shapes.
pub fn load(path: &Path, varmap: &VarMap, optim: &mut Adam) -> anyhow::Result<TrainState> {
    let bundle = read_bundle(path)?;
    let matched = match_weights(bundle.weights, varmap, &bundle.source)?;
    optim.load_state_tensors(bundle.optim, &bundle.source)?;
    // Only now, after every check passed, are the weights overwritten.
    assign(matched)?;
    Ok(bundle.state)
}

/// Loads only the weights of a bundle (for evaluation, or to start the next stage from a
/// previous stage's result); returns the training state it was saved with.
pub fn load_weights(path: &Path, varmap: &VarMap) -> anyhow::Result<TrainState> {
    let bundle = read_bundle(path)?;
    assign(match_weights(bundle.weights, varmap, &bundle.source)?)?;
    Ok(bundle.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_improvements_become_the_best_metric() {
        let mut state = TrainState {
            epoch: 0,
            step: 0,
            best_metric: None,
            rng: Rng::new(0),
        };
        assert!(state.record_metric(0.3));
        assert!(!state.record_metric(0.2));
        assert!(!state.record_metric(f64::NAN));
        assert!(state.record_metric(0.5));
        assert_eq!(state.best_metric, Some(0.5));
    }
}
