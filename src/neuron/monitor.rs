//! Spike monitors: firing rates for the energy report come from the training or evaluation
//! pass itself, counted inside the LIF kernel, rather than from a second instrumented run.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A shared spike counter for one LIF layer. Cloning shares the counts.
///
/// Counting is off until [`SpikeMonitor::enable`]; while off the kernel checks one flag per
/// call and does nothing else.
#[derive(Debug, Clone, Default)]
pub struct SpikeMonitor {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    enabled: AtomicBool,
    spikes: AtomicU64,
    /// Neuron-steps seen: every element of every input tensor.
    neuron_steps: AtomicU64,
    /// Spikes per time step, for per-step firing rates.
    per_step: Mutex<Vec<u64>>,
    /// Neuron-steps per time step.
    per_step_total: Mutex<Vec<u64>>,
    /// Per-input spikes, while a tap is set.
    tap: Mutex<Option<SampleTap>>,
}

/// One input's spikes in one layer over a pass of a batch: its own counts, and the spike
/// trains of a few evenly spaced neurons, so a service can report every answer's own firing
/// rates and raster although the inputs ran through the network together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleSpikes {
    pub counts: SpikeCounts,
    /// The raster's neurons, as indices into the input's neurons of one time step.
    pub raster_neurons: Vec<usize>,
    /// `[neuron][step]`: whether the raster's neuron fired at that step.
    pub raster: Vec<Vec<bool>>,
}

#[derive(Debug)]
struct SampleTap {
    raster_neurons: usize,
    samples: Vec<SampleSpikes>,
    /// A call whose neurons per step did not split evenly into the batch's inputs.
    mismatch: Option<usize>,
}

/// What a monitor has counted so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpikeCounts {
    pub spikes: u64,
    pub neuron_steps: u64,
    pub per_step_spikes: Vec<u64>,
    pub per_step_neuron_steps: Vec<u64>,
}

impl SpikeCounts {
    /// Spikes per neuron per time step, in [0, 1]; 0 when nothing was seen.
    pub fn firing_rate(&self) -> f64 {
        if self.neuron_steps == 0 {
            0.0
        } else {
            self.spikes as f64 / self.neuron_steps as f64
        }
    }

    /// Firing rate at each time step.
    pub fn per_step_rates(&self) -> Vec<f64> {
        self.per_step_spikes
            .iter()
            .zip(&self.per_step_neuron_steps)
            .map(|(&s, &n)| if n == 0 { 0.0 } else { s as f64 / n as f64 })
            .collect()
    }
}

impl SpikeMonitor {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn enable(&self) {
        self.inner.enabled.store(true, Ordering::Relaxed);
    }

    pub fn disable(&self) {
        self.inner.enabled.store(false, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Forgets every count (the enabled flag is kept).
    pub fn reset(&self) {
        self.inner.spikes.store(0, Ordering::Relaxed);
        self.inner.neuron_steps.store(0, Ordering::Relaxed);
        self.inner.per_step.lock().expect("monitor lock").clear();
        self.inner
            .per_step_total
            .lock()
            .expect("monitor lock")
            .clear();
    }

    /// Starts keeping per-input spikes for a pass over `samples` inputs, with up to
    /// `raster_neurons` neurons per input in the raster. Every step's neurons must be input-major
    /// (`[T, B, ...]`), as every layer of the encoders lays them out.
    pub fn tap_samples(&self, samples: usize, raster_neurons: usize) {
        *self.inner.tap.lock().expect("monitor lock") = Some(SampleTap {
            raster_neurons,
            samples: vec![SampleSpikes::default(); samples],
            mismatch: None,
        });
    }

    /// Ends the tap and returns its per-input spikes (none if no tap was set); an error if a
    /// recorded call's neurons did not split into the tap's inputs.
    pub fn take_samples(&self) -> Result<Vec<SampleSpikes>, String> {
        let Some(tap) = self.inner.tap.lock().expect("monitor lock").take() else {
            return Ok(Vec::new());
        };
        match tap.mismatch {
            Some(n) => Err(format!(
                "{n} neurons per step do not split into {} inputs",
                tap.samples.len()
            )),
            None => Ok(tap.samples),
        }
    }

    /// Whether a tap wants the spikes themselves, not only their counts.
    pub(crate) fn is_tapped(&self) -> bool {
        self.inner.tap.lock().expect("monitor lock").is_some()
    }

    /// Adds one call's spikes `[steps, neurons]` (0/1) to the tap's inputs.
    pub(crate) fn record_samples(&self, spikes: &[f32], steps: usize) {
        let mut guard = self.inner.tap.lock().expect("monitor lock");
        let Some(tap) = guard.as_mut() else { return };
        let neurons = spikes.len() / steps.max(1);
        let inputs = tap.samples.len();
        if inputs == 0 || !neurons.is_multiple_of(inputs) {
            tap.mismatch = Some(neurons);
            return;
        }
        let own = neurons / inputs;
        let stride = own.div_ceil(tap.raster_neurons.max(1)).max(1);
        for (b, sample) in tap.samples.iter_mut().enumerate() {
            let fresh = sample.raster.is_empty();
            if fresh {
                sample.raster_neurons = (0..own).step_by(stride).collect();
                sample.raster = vec![Vec::with_capacity(steps); sample.raster_neurons.len()];
            }
            let counts = &mut sample.counts;
            if counts.per_step_spikes.len() < steps {
                counts.per_step_spikes.resize(steps, 0);
                counts.per_step_neuron_steps.resize(steps, 0);
            }
            for t in 0..steps {
                let start = t * neurons + b * own;
                let block = &spikes[start..start + own];
                let fired = block.iter().filter(|&&s| s > 0.5).count() as u64;
                counts.spikes += fired;
                counts.neuron_steps += own as u64;
                counts.per_step_spikes[t] += fired;
                counts.per_step_neuron_steps[t] += own as u64;
                if fresh {
                    for (train, &i) in sample.raster.iter_mut().zip(&sample.raster_neurons) {
                        train.push(block[i] > 0.5);
                    }
                }
            }
        }
    }

    pub fn counts(&self) -> SpikeCounts {
        SpikeCounts {
            spikes: self.inner.spikes.load(Ordering::Relaxed),
            neuron_steps: self.inner.neuron_steps.load(Ordering::Relaxed),
            per_step_spikes: self.inner.per_step.lock().expect("monitor lock").clone(),
            per_step_neuron_steps: self
                .inner
                .per_step_total
                .lock()
                .expect("monitor lock")
                .clone(),
        }
    }

    /// Adds one forward call's counts: `per_step[t]` spikes at step t over `neurons` neurons.
    pub(crate) fn record(&self, per_step: &[u64], neurons: u64) {
        let total: u64 = per_step.iter().sum();
        self.inner.spikes.fetch_add(total, Ordering::Relaxed);
        self.inner
            .neuron_steps
            .fetch_add(neurons * per_step.len() as u64, Ordering::Relaxed);
        let mut steps = self.inner.per_step.lock().expect("monitor lock");
        let mut totals = self.inner.per_step_total.lock().expect("monitor lock");
        if steps.len() < per_step.len() {
            steps.resize(per_step.len(), 0);
            totals.resize(per_step.len(), 0);
        }
        for (t, &s) in per_step.iter().enumerate() {
            steps[t] += s;
            totals[t] += neurons;
        }
    }
}
