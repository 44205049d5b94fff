//! Signs that a student's features do not depend on its input: an encoder whose first LIF
//! layer never fires hands a constant to every later layer, and class embeddings that are all
//! one vector tie every logit. Such a student still gets a zero-shot score (argmax's class 0 for
//! every image), so `train`, `eval` and `classify` warn, naming the encoder and the layer,
//! instead of letting that score pass for a result.

use candle_core::{DType, Device, Tensor};

use super::student::Student;
use crate::data::{ImageFeatureSet, TextFeatureSet};
use crate::energy::{FiringRates, MonitorSet};

/// Inputs per probe batch: enough that a live layer fires somewhere.
pub const PROBE_SIZE: usize = 16;

/// Inputs to run a student on: images `[B, 3, 32, 32]` for its image encoder, token ids
/// `[N, L]` for its text encoder. An encoder without inputs is not probed.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub images: Option<Tensor>,
    pub ids: Option<Tensor>,
}

impl Probe {
    /// The first [`PROBE_SIZE`] items of whichever sets are given.
    pub fn from_sets(
        images: Option<&dyn ImageFeatureSet>,
        texts: Option<&dyn TextFeatureSet>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let first = |len: usize| (0..len.min(PROBE_SIZE)).collect::<Vec<_>>();
        Ok(Self {
            images: images
                .filter(|s| !s.is_empty())
                .map(|s| s.batch(&first(s.len()), device).map(|b| b.inputs))
                .transpose()?,
            ids: texts
                .filter(|s| !s.is_empty())
                .map(|s| s.batch(&first(s.len()), device).map(|b| b.token_ids))
                .transpose()?,
        })
    }

    /// The probe's inputs for the encoder `name` ([`Student::energy_ops`] names them).
    fn input_of(&self, encoder: &str) -> Option<&Tensor> {
        match encoder {
            "image" => self.images.as_ref(),
            "text" => self.ids.as_ref(),
            _ => None,
        }
    }

    /// One warning per encoder of `student` whose first LIF layer fired no spike over this
    /// probe's inputs.
    pub fn silent_encoders(&self, student: &dyn Student) -> anyhow::Result<Vec<String>> {
        let encoders = student.energy_ops().unwrap_or_default();
        let probed: Vec<_> = encoders
            .iter()
            .filter_map(|e| Some((e, self.input_of(&e.name)?)))
            .collect();
        let sets: Vec<&MonitorSet> = probed.iter().map(|(e, _)| &e.monitors).collect();
        let counts = record_all(&sets, &mut || {
            if let Some(x) = &self.images {
                student.image_features(x, false)?;
            }
            if let Some(ids) = &self.ids {
                student.text_features(ids, false)?;
            }
            Ok(())
        })?;
        let mut warnings = Vec::new();
        for ((enc, input), counts) in probed.iter().zip(counts) {
            let Some(first) = enc.monitors.names().next() else {
                continue;
            };
            if counts.get(first).is_some_and(|c| c.spikes == 0) {
                warnings.push(format!(
                    "the {} encoder's first LIF layer {first} fired 0 % over {} inputs: its \
                     features do not depend on the input",
                    enc.name,
                    input.dim(0)?
                ));
            }
        }
        Ok(warnings)
    }

    /// [`Self::silent_encoders`], and [`tied_classes`] of `classes` when given.
    pub fn warnings(
        &self,
        student: &dyn Student,
        classes: Option<&Tensor>,
    ) -> anyhow::Result<Vec<String>> {
        let mut warnings = self.silent_encoders(student)?;
        if let Some(classes) = classes {
            warnings.extend(tied_classes(classes)?);
        }
        Ok(warnings)
    }
}

/// Runs `forward` with every monitor set counting, and returns each set's counts.
fn record_all(
    sets: &[&MonitorSet],
    forward: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<FiringRates>> {
    match sets.split_first() {
        None => {
            forward()?;
            Ok(Vec::new())
        }
        Some((set, rest)) => {
            let (mut inner, counts) = set.record(|| record_all(rest, forward))?;
            inner.insert(0, counts);
            Ok(inner)
        }
    }
}

/// A warning when the class embeddings `[C, D]` (C >= 2) are one vector repeated.
pub fn tied_classes(classes: &Tensor) -> anyhow::Result<Option<String>> {
    let rows = classes.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let Some((first, rest)) = rows.split_first() else {
        return Ok(None);
    };
    let tied = !rest.is_empty()
        && rest
            .iter()
            .all(|r| r.iter().zip(first).all(|(a, b)| (a - b).abs() <= 1e-6));
    Ok(tied.then(|| {
        format!(
            "all {} class embeddings are the same vector: the text encoder's features do not \
             depend on the label names, so every image ties on every class",
            rows.len()
        )
    }))
}

/// Logs each warning.
pub fn warn_each(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("{w}");
    }
}
