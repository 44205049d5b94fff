//! spikeclip: SpikeCLIP in Rust, a spiking image and text encoder pair distilled from CLIP that
//! classifies images zero-shot from label names at a fraction of an ANN's energy.
//!
//! The modules follow the data's path: [`neuron`] and [`kernels`] (spiking neurons and the
//! hand-written ops) → [`model`] (SpikeCLIP's encoders and the ANN twin) → [`teacher`] and
//! [`data`] (CLIP, datasets, the built-in world, the teacher-feature cache) → [`train`] and
//! [`recipe`] (the training stages) → [`eval`], [`energy`] and [`experiments`] → [`cli`];
//! [`bench`] times the hot paths and [`plot`] draws the reports.

pub mod bench;
pub mod cli;
pub mod data;
pub mod energy;
pub mod eval;
pub mod experiments;
pub mod kernels;
pub mod model;
pub mod neuron;
pub mod ops;
pub mod plot;
pub mod recipe;
pub mod teacher;
pub mod train;

/// README's examples compile and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
