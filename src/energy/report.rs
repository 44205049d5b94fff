//! The energy report: per-layer tables for each encoder, SNN against its ANN twin, written as
//! text, `energy.json` and PNG plots, with the counting rules stated next to the numbers.

use super::account::{reduction_rate, Mode, NetworkEnergy};
use super::constants::EnergyConstants;
use super::monitors::{FiringRates, MonitorSet};
use super::ops::Op;
use crate::plot::{self, Labels, Raster};
use anyhow::Context;
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// What an encoder reports about itself: its ops as a spiking network and as its ANN twin, and
/// the monitors of the LIF layers its ops name, which have counted an evaluation pass.
#[derive(Debug, Clone)]
pub struct EncoderOps {
    pub name: String,
    pub snn: Vec<Op>,
    pub ann: Vec<Op>,
    pub monitors: MonitorSet,
}

/// A LIF layer's measured activity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRate {
    pub name: String,
    pub firing_rate: f64,
    pub per_step_rates: Vec<f64>,
}

/// One encoder's accounting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EncoderEnergy {
    pub name: String,
    pub snn: NetworkEnergy,
    pub ann: NetworkEnergy,
    pub reduction_rate: f64,
    /// Every monitored LIF layer, in monitoring order.
    pub firing_rates: Vec<LayerRate>,
}

/// Everything `energy.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnergyReport {
    pub constants: EnergyConstants,
    pub time_steps: usize,
    pub samples: usize,
    pub encoders: Vec<EncoderEnergy>,
    pub notes: Vec<String>,
}

/// What the report is made from; the encoders' monitors have counted a forward pass over
/// `samples` inputs.
#[derive(Debug, Clone)]
pub struct ReportInputs<'a> {
    pub encoders: &'a [EncoderOps],
    pub time_steps: usize,
    pub samples: usize,
    pub constants: EnergyConstants,
    /// Layers' spikes for one input, for the raster plot (none: no raster).
    pub rasters: Vec<Raster>,
}

/// The counting rules, stated in the report so a reader can check the numbers.
pub const NOTES: [&str; 4] = [
    "Energy counts arithmetic only: E = E_MAC x MACs + E_AC x SOPs. Memory access and data \
     movement are not counted (weights, activations, membrane potentials), as the paper's \
     limitations section states; on real hardware they are a large share of the energy.",
    "An op fed by real values that are the same at every time step (pixels, embeddings, a mean \
     over T) is computed once: its FLOPs count as MACs. An op fed by the spikes of a LIF layer \
     costs SOPs = firing rate of that layer x T x FLOPs (FLOPs per sample per time step, a MAC \
     counted as one FLOP).",
    "Spiking self-attention (Spikingformer's rule): Q (K^T V) between spike tensors costs, per \
     block, T x H x N x d^2 x (fr_q + min(fr_k, fr_v)) SOPs; the reported input firing rate is \
     fr_q + min(fr_k, fr_v).",
    "The ANN twin runs the same ops once per sample, every one a MAC; reduction rate = \
     1 - E_SNN / E_ANN.",
];

impl EnergyReport {
    pub fn build(inputs: &ReportInputs) -> anyhow::Result<Self> {
        anyhow::ensure!(
            inputs.time_steps > 0,
            "energy report: time steps must be >= 1"
        );
        let encoders = inputs
            .encoders
            .iter()
            .map(|e| {
                EncoderEnergy::account(
                    e,
                    &e.monitors.counts(),
                    inputs.time_steps,
                    &inputs.constants,
                )
                .with_context(|| format!("energy of the {} encoder", e.name))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            constants: inputs.constants.clone(),
            time_steps: inputs.time_steps,
            samples: inputs.samples,
            encoders,
            notes: NOTES.iter().map(|n| n.to_string()).collect(),
        })
    }

    /// The per-layer tables, totals and notes as plain text for the terminal.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let c = &self.constants;
        let _ = writeln!(
            s,
            "Energy per sample ({}: E_MAC {} pJ, E_AC {} pJ; T = {}, {} samples)",
            c.preset, c.e_mac_pj, c.e_ac_pj, self.time_steps, self.samples
        );
        for e in &self.encoders {
            for (label, net) in [("SNN", &e.snn), ("ANN twin", &e.ann)] {
                let _ = writeln!(s, "\n{} encoder, {label}", e.name);
                let _ = writeln!(
                    s,
                    "{:<32} {:<16} {:>8} {:>14} {:>14} {:>14} {:>12}",
                    "layer", "output", "in fr", "FLOPs", "MACs", "SOPs", "energy mJ"
                );
                for r in &net.rows {
                    let fr = r
                        .input_firing_rate
                        .map_or_else(|| "-".to_string(), |f| format!("{f:.4}"));
                    let shape = format!("{:?}", r.output_shape);
                    let _ = writeln!(
                        s,
                        "{:<32} {:<16} {:>8} {:>14} {:>14.0} {:>14.0} {:>12.4e}",
                        r.name, shape, fr, r.flops, r.macs, r.sops, r.energy_mj
                    );
                }
                let t = &net.totals;
                let _ = writeln!(
                    s,
                    "{:<32} {:<16} {:>8} {:>14} {:>14.0} {:>14.0} {:>12.4e}",
                    "total", "", "", t.flops, t.macs, t.sops, t.energy_mj
                );
            }
            let _ = writeln!(
                s,
                "\n{} encoder: SNN {:.4e} mJ vs ANN {:.4e} mJ, reduction {:.2}%",
                e.name,
                e.snn.totals.energy_mj,
                e.ann.totals.energy_mj,
                100.0 * e.reduction_rate
            );
        }
        let _ = writeln!(s, "\nNotes:");
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }
}

impl EncoderEnergy {
    /// The encoder's accounting at the firing rates `counts` (by LIF layer name): what its
    /// monitors counted, or the counts of one input of a batch.
    pub fn account(
        e: &EncoderOps,
        counts: &FiringRates,
        time_steps: usize,
        constants: &EnergyConstants,
    ) -> anyhow::Result<Self> {
        let snn = Mode::Snn {
            rates: counts,
            time_steps,
        };
        let snn = NetworkEnergy::account(&e.snn, snn, constants)?;
        let ann = NetworkEnergy::account(&e.ann, Mode::Ann, constants)?;
        let rates = e
            .monitors
            .names()
            .map(|name| {
                let c = counts
                    .get(name)
                    .with_context(|| format!("no spike counts for LIF layer {name}"))?;
                Ok(LayerRate {
                    name: name.to_string(),
                    firing_rate: c.firing_rate(),
                    per_step_rates: c.per_step_rates(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(EncoderEnergy {
            name: e.name.clone(),
            reduction_rate: reduction_rate(snn.totals.energy_mj, ann.totals.energy_mj),
            snn,
            ann,
            firing_rates: rates,
        })
    }
}

/// Builds the report and writes `energy.json`, `energy.txt`, `firing_rates.png` and, when a
/// rasters are given, `spike_raster.png` into `out_dir`; returns the report for printing.
pub fn write_report(inputs: &ReportInputs, out_dir: &Path) -> anyhow::Result<EnergyReport> {
    let report = EnergyReport::build(inputs)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let write = |name: &str, text: String| {
        let path = out_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("energy.json", serde_json::to_string_pretty(&report)?)?;
    write("energy.txt", report.table())?;
    let bars: Vec<(String, f64)> = report
        .encoders
        .iter()
        .flat_map(|e| {
            e.firing_rates
                .iter()
                .map(|r| (format!("{}.{}", e.name, r.name), r.firing_rate))
        })
        .collect();
    if !bars.is_empty() {
        plot::bar_plot(
            &out_dir.join("firing_rates.png"),
            Labels {
                title: "Firing rate per LIF layer",
                x: "firing rate (spikes / neuron / step)",
                y: "",
            },
            &bars,
        )?;
    }
    if !inputs.rasters.is_empty() {
        plot::raster_plot(
            &out_dir.join("spike_raster.png"),
            "Spikes per LIF layer for one input",
            &inputs.rasters,
        )?;
    }
    Ok(report)
}

/// Samples up to `max_neurons` evenly spaced neurons of the spikes `[T, ...]` of `layer` for
/// one input (a batch of one is part of the neuron axis); the firing rate is over them all.
pub fn sample_raster(layer: &str, spikes: &Tensor, max_neurons: usize) -> anyhow::Result<Raster> {
    anyhow::ensure!(
        spikes.rank() >= 2 && max_neurons > 0,
        "spike raster: need spikes [T, neurons...] and at least one neuron, got {:?}",
        spikes.shape()
    );
    let grid = spikes
        .flatten_from(1)?
        .to_dtype(DType::F32)?
        .t()?
        .to_vec2::<f32>()?;
    let stride = grid.len().div_ceil(max_neurons).max(1);
    let neurons: Vec<usize> = (0..grid.len()).step_by(stride).collect();
    let spikes = neurons
        .iter()
        .map(|&i| grid[i].iter().map(|&s| s > 0.5).collect())
        .collect();
    let fired = grid.iter().flatten().filter(|&&s| s > 0.5).count();
    Ok(Raster {
        layer: layer.to_string(),
        firing_rate: fired as f64 / grid.iter().map(Vec::len).sum::<usize>().max(1) as f64,
        neurons,
        spikes,
    })
}
