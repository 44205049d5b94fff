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
