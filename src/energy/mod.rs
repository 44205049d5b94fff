//! Energy accounting: how many multiply-accumulates and accumulates a forward pass costs, and
//! what that means in joules, for the spiking encoders and their ANN twins (paper appendix F).
//!
//! An encoder describes its compute as a list of [`Op`]s, its LIF layers' monitors are gathered
//! in a [`MonitorSet`] that records an evaluation pass, and [`write_report`] turns both into the
//! per-layer table, `energy.json` and plots.

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
