//! Firing rates of named LIF layers, gathered from the monitors inside the LIF op during an
//! ordinary forward pass, so the report measures the very computation it describes.

use crate::neuron::{MultiStepLif, SampleSpikes, SpikeCounts, SpikeMonitor};
use std::collections::BTreeMap;

/// The monitors of a network's LIF layers under the names its ops refer to.
#[derive(Debug, Clone, Default)]
pub struct MonitorSet {
    monitors: Vec<(String, SpikeMonitor)>,
}

/// Spike counts per LIF layer name.
pub type FiringRates = BTreeMap<String, SpikeCounts>;

impl MonitorSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a layer's monitor (clones share the counts with the layer).
    pub fn push(&mut self, name: impl Into<String>, lif: &MultiStepLif) {
        self.monitors.push((name.into(), lif.monitor().clone()));
    }

    /// Runs `forward` with every monitor counting from zero, then switches them off again (also
    /// when `forward` fails) and returns its result with the counts.
    pub fn record<R>(
        &self,
        forward: impl FnOnce() -> anyhow::Result<R>,
    ) -> anyhow::Result<(R, FiringRates)> {
        for (_, m) in &self.monitors {
            m.reset();
            m.enable();
        }
        let out = forward();
        for (_, m) in &self.monitors {
            m.disable();
        }
        Ok((out?, self.counts()))
    }

    /// [`Self::record`] over a batch of `samples` inputs, keeping each input's own spikes:
    /// per input, every layer's [`SampleSpikes`] by name (rasters of up to `raster_neurons`
    /// neurons).
    pub fn record_samples<R>(
        &self,
        samples: usize,
        raster_neurons: usize,
        forward: impl FnOnce() -> anyhow::Result<R>,
    ) -> anyhow::Result<(R, Vec<BTreeMap<String, SampleSpikes>>)> {
        for (_, m) in &self.monitors {
            m.tap_samples(samples, raster_neurons);
        }
        let recorded = self.record(forward);
        let mut inputs = vec![BTreeMap::new(); samples];
        for (name, m) in &self.monitors {
            let layer = m
                .take_samples()
                .map_err(|e| anyhow::anyhow!("spikes of {name}: {e}"))?;
            for (input, spikes) in inputs.iter_mut().zip(layer) {
                input.insert(name.clone(), spikes);
            }
        }
        Ok((recorded?.0, inputs))
    }

    /// Layer names in the order they were added.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.monitors.iter().map(|(name, _)| name.as_str())
    }

    /// What the monitors have counted so far, by layer name.
    pub fn counts(&self) -> FiringRates {
        self.monitors
            .iter()
            .map(|(name, m)| (name.clone(), m.counts()))
            .collect()
    }
}
