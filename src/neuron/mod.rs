//! Spiking neurons, the surrogate gradients that train them and the monitors that count their
//! spikes, kept apart as SpikingJelly keeps them.

pub mod lif;
mod lif_kernel;
pub mod monitor;
pub mod surrogate;

pub use lif::{LifConfig, MultiStepLif};
pub use monitor::{SampleSpikes, SpikeCounts, SpikeMonitor};
pub use surrogate::Surrogate;
