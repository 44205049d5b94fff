//! spikeclip: SpikeCLIP in Rust, a spiking image and text encoder pair distilled from CLIP that
//! classifies images zero-shot from label names at a fraction of an ANN's energy.
//!
//! The modules follow the data's path: [`neuron`] (spiking neurons and their kernels) →
//! [`teacher`] and [`data`] → [`cli`]; [`bench`] times the hot paths.

pub mod bench;
pub mod cli;
pub mod data;
pub mod energy;
pub mod eval;
pub mod experiments;
pub mod kernels;
pub mod model;
pub mod neuron;
pub mod plot;
pub mod recipe;
pub mod teacher;
pub mod train;

/// README's examples compile and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
