//! Energy of a trained spiking student: firing rates recorded over an evaluation pass of both
//! towers, turned into the per-layer report of [`crate::energy`].

use std::path::Path;

use candle_core::{Device, Tensor};

use super::student::Student;
use crate::data::prompts::DatasetPrompts;
use crate::energy::{sample_raster, write_report, EnergyConstants, EnergyReport, ReportInputs};
use crate::teacher::Tokenize;

/// Neurons shown per layer in the spike raster.
const RASTER_NEURONS: usize = 256;

/// Runs the student on `images` `[B, 3, 32, 32]` and token ids `texts` `[N, L]` with its
/// monitors on, then writes the energy report (table, `energy.json`, plots) to `dir`. `None`
/// for a student without spikes.
pub fn measure_energy(
    student: &dyn Student,
    images: &Tensor,
    texts: &Tensor,
    constants: EnergyConstants,
    dir: &Path,
) -> anyhow::Result<Option<EnergyReport>> {
    let Some(encoders) = student.energy_ops() else {
        return Ok(None);
    };
    for enc in &encoders {
        // Each encoder's monitors see only its own layers, so both towers run under each.
        enc.monitors.record(|| {
            student.image_features(images, false)?;
            student.text_features(texts, false)?;
            Ok(())
        })?;
    }
    let rasters = match student.layer_spikes(&images.narrow(0, 0, 1)?) {
        Some(layers) => layers?
            .iter()
            .map(|(name, spikes)| sample_raster(name, spikes, RASTER_NEURONS))
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    let report = write_report(
        &ReportInputs {
            encoders: &encoders,
            time_steps: student.time_steps(),
            samples: images.dim(0)?,
            constants,
            rasters,
        },
        dir,
    )?;
    Ok(Some(report))
}

/// Token ids `[N, len]` of up to `limit` prompt sentences, class by class: the text side of an
/// energy measurement.
pub fn prompt_token_ids(
    prompts: &DatasetPrompts,
    tokenizer: &dyn Tokenize,
    len: usize,
    limit: usize,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let sentences: Vec<String> = (0..prompts.classes.len())
        .flat_map(|c| prompts.class_sentences(c))
        .take(limit.max(1))
        .collect();
    let ids = tokenizer.encode(&sentences, len)?;
    Ok(Tensor::from_vec(
        ids.concat(),
        (sentences.len(), len),
        device,
    )?)
}
