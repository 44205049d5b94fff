//! SpikeCLIP's encoders. So far only their configurations and parameter budgets exist; the
//! layers themselves are still to be written (see issue 3).

pub mod config;
