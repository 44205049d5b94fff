//! Turns a list of ops and measured firing rates into MACs, SOPs and energy per layer, by the
//! convention of the Spikformer and Spikingformer appendices that SpikeCLIP's appendix F follows.

use super::constants::EnergyConstants;
use super::monitors::FiringRates;
use super::ops::{Op, OpInput, OpKind};
use anyhow::Context;
use serde::Serialize;

/// One row of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRow {
    pub name: String,
    pub kind: OpKind,
    pub output_shape: Vec<usize>,
    /// Firing rate of the spikes feeding the op; for attention, fr_q + min(fr_k, fr_v).
    pub input_firing_rate: Option<f64>,
    /// FLOPs per sample per time step.
    pub flops: u64,
    /// Multiply-accumulates per sample (all time steps).
    pub macs: f64,
    /// Synaptic operations (accumulates) per sample (all time steps).
    pub sops: f64,
    pub energy_mj: f64,
}

/// Column sums of a network's rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub flops: u64,
    pub macs: f64,
    pub sops: f64,
    pub energy_mj: f64,
}

/// A network's rows and their totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkEnergy {
    pub rows: Vec<LayerRow>,
    pub totals: Totals,
}

/// How the ops are run: as the spiking network over `time_steps` with measured rates, or as its
/// ANN twin, where every op is a MAC and there is no time axis.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    Snn {
        rates: &'a FiringRates,
        time_steps: usize,
    },
    Ann,
}

impl NetworkEnergy {
    /// Accounts every op; an op fed by a LIF layer without a monitor is an error naming both.
    pub fn account(ops: &[Op], mode: Mode, constants: &EnergyConstants) -> anyhow::Result<Self> {
        let rows = ops
            .iter()
            .map(|op| row(op, mode, constants))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let totals = rows.iter().fold(Totals::default(), |t, r| Totals {
            flops: t.flops + r.flops,
            macs: t.macs + r.macs,
            sops: t.sops + r.sops,
            energy_mj: t.energy_mj + r.energy_mj,
        });
        Ok(Self { rows, totals })
    }
}

/// 1 - E_SNN / E_ANN: the fraction of the ANN twin's energy the SNN saves.
pub fn reduction_rate(snn_mj: f64, ann_mj: f64) -> f64 {
    1.0 - snn_mj / ann_mj
}

fn row(op: &Op, mode: Mode, constants: &EnergyConstants) -> anyhow::Result<LayerRow> {
    let flops = op.flops as f64;
    let (input_firing_rate, macs, sops) = match mode {
        Mode::Ann => (None, flops, 0.0),
        Mode::Snn { rates, time_steps } => {
            let t = time_steps as f64;
            let rate = |layer: &str| {
                let counts = rates.get(layer).with_context(|| {
                    format!("op {:?}: no monitor for LIF layer {layer:?}", op.name)
                })?;
                anyhow::ensure!(
                    counts.per_step_spikes.len() == time_steps,
                    "op {:?}: LIF layer {layer:?} recorded {} time steps, expected {time_steps} \
                     (was the forward pass run inside MonitorSet::record?)",
                    op.name,
                    counts.per_step_spikes.len()
                );
                Ok(counts.firing_rate())
            };
            match &op.input {
                OpInput::Real => (None, flops, 0.0),
                OpInput::RealEveryStep => (None, flops * t, 0.0),
                OpInput::Spikes(layer) => {
                    let fr = rate(layer)?;
                    (Some(fr), 0.0, fr * t * flops)
                }
                OpInput::SpikeAttention { q, k, v } => {
                    let fr = rate(q)? + rate(k)?.min(rate(v)?);
                    // `flops` holds both products; the rule charges H x N x d^2 per unit rate.
                    (Some(fr), 0.0, t * (flops / 2.0) * fr)
                }
            }
        }
    };
    Ok(LayerRow {
        name: op.name.clone(),
        kind: op.kind,
        output_shape: op.output_shape.clone(),
        input_firing_rate,
        flops: op.flops,
        macs,
        sops,
        energy_mj: constants.energy_mj(macs, sops),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_inputs_cost_macs_once_or_at_every_step() {
        let ops = [
            Op::linear("static", 1, (2, 5), OpInput::Real),
            Op::linear("dynamic", 1, (2, 5), OpInput::RealEveryStep),
        ];
        let rates = FiringRates::new();
        let c = EnergyConstants::fp32();
        let snn = Mode::Snn {
            rates: &rates,
            time_steps: 4,
        };
        let snn = NetworkEnergy::account(&ops, snn, &c).unwrap();
        let macs: Vec<f64> = snn.rows.iter().map(|r| r.macs).collect();
        assert_eq!(macs, [10.0, 40.0]);
        assert_eq!(snn.totals.sops, 0.0);
        let ann = NetworkEnergy::account(&ops, Mode::Ann, &c).unwrap();
        assert_eq!(ann.totals.macs, 20.0);
    }
}
