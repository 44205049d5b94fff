//! Energy accounting: how many multiply-accumulates and accumulates a forward pass costs, and
//! what that means in joules, for the spiking encoders and their ANN twins (paper appendix F).
//!
//! An encoder describes its compute as a list of [`Op`]s, its LIF layers' monitors are gathered
//! in a [`MonitorSet`] that records an evaluation pass, and [`write_report`] turns both into the
//! per-layer table, `energy.json` and plots.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use spikeclip::energy::{write_report, EncoderOps, EnergyConstants, MonitorSet, Op, OpInput,
//!     ReportInputs};
//! use spikeclip::neuron::{LifConfig, MultiStepLif};
//!
//! // A stem that sees pixels, a LIF layer, and a linear layer fed by its spikes.
//! let lif = MultiStepLif::new(LifConfig::default());
//! let mut monitors = MonitorSet::new();
//! monitors.push("stem.lif", &lif);
//! let snn = vec![
//!     Op::conv2d("stem.conv", (3, 8, 3), (32, 32), OpInput::Real),
//!     Op::linear("head", 1, (8 * 32 * 32, 10), OpInput::Spikes("stem.lif".into())),
//! ];
//! let ann = snn.iter().map(Op::as_ann).collect();
//! let encoders = [EncoderOps { name: "image".into(), snn, ann, monitors: monitors.clone() }];
//!
//! // Record an evaluation pass (T = 4 steps of 2 samples), then write the report.
//! let currents = Tensor::randn(0f32, 2.0, (4, 2, 8, 32, 32), &Device::Cpu)?;
//! monitors.record(|| Ok(lif.forward(&currents)?))?;
//! let inputs = ReportInputs {
//!     encoders: &encoders,
//!     time_steps: 4,
//!     samples: 2,
//!     constants: EnergyConstants::fp32(),
//!     rasters: Vec::new(),
//! };
//! let out = tempfile::tempdir()?;
//! let report = write_report(&inputs, out.path())?;
//! assert!(report.encoders[0].reduction_rate > 0.0);
//! print!("{}", report.table());
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod account;
pub mod constants;
pub mod monitors;
pub mod ops;
pub mod report;

pub use account::{reduction_rate, LayerRow, Mode, NetworkEnergy, Totals};
pub use constants::EnergyConstants;
pub use monitors::{FiringRates, MonitorSet};
pub use ops::{Op, OpInput, OpKind};
pub use report::{
    sample_raster, write_report, EncoderEnergy, EncoderOps, EnergyReport, ReportInputs,
};
