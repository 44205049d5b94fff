//! Copies of a student's weights, so that fine-tuning variants branch from one pre-training
//! instead of repeating it.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::recipe::Student;
use crate::train::checkpoint::named_vars;

/// Every weight of a student (buffers included), copied out of its VarMap.
#[derive(Debug, Clone)]
pub struct Snapshot(BTreeMap<String, Tensor>);

impl Snapshot {
    pub fn take(student: &dyn Student) -> anyhow::Result<Self> {
        // `Var::set` writes in place, so the copy must own its storage.
        let weights = named_vars(student.varmap())
            .into_iter()
            .map(|(name, var)| Ok((name, var.as_tensor().copy()?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self(weights))
    }

    /// Writes back the weights whose names start with `prefix` (`""` for all).
    pub fn restore(&self, student: &dyn Student, prefix: &str) -> anyhow::Result<()> {
        for (name, var) in named_vars(student.varmap()) {
            if !name.starts_with(prefix) {
                continue;
            }
            let saved = self.0.get(&name).ok_or_else(|| {
                anyhow::anyhow!("the snapshot has no weight {name}: another architecture?")
            })?;
            var.set(saved)?;
        }
        Ok(())
    }

    /// Whether the student's weights under `prefix` equal this snapshot's exactly.
    pub fn matches(&self, student: &dyn Student, prefix: &str) -> anyhow::Result<bool> {
        for (name, var) in named_vars(student.varmap()) {
            if !name.starts_with(prefix) {
                continue;
            }
            let Some(saved) = self.0.get(&name) else {
                return Ok(false);
            };
            let diff = (var.as_tensor() - saved)?.abs()?.max_all()?;
            if diff.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? != 0.0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
