//! spikeclip: SpikeCLIP in Rust, a spiking image and text encoder pair distilled from CLIP that
//! classifies images zero-shot from label names at a fraction of an ANN's energy.
//!
//! The modules follow the data's path: [`neuron`] and [`kernels`] (spiking neurons and the
//! hand-written ops) → [`model`] (SpikeCLIP's encoders and the ANN twin) → [`teacher`] and
//! [`data`] (CLIP, datasets, the built-in world, the teacher-feature cache) → [`train`] and
//! [`recipe`] (the training stages) → [`eval`], [`energy`] and [`experiments`] → [`cli`];
//! [`bench`] times the hot paths, [`plot`] draws the reports and [`progress`] shows how far
//! long jobs are.

pub mod bench;
pub mod cli;
pub mod data;
pub mod dist;
pub mod energy;
pub mod eval;
pub mod experiments;
pub mod kernels;
pub mod model;
pub mod neuron;
pub mod ops;
pub mod plot;
pub mod progress;
pub mod recipe;
pub mod serve;
pub mod teacher;
pub mod train;

/// A file of the shared read-only test data, `../shared/data/NAME` beside the repository root
/// (the manifest's directory), for unit tests; a missing file fails the test naming it.
#[cfg(test)]
#[track_caller]
fn shared_test_data(name: &str) -> std::path::PathBuf {
    let path =
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")).join(name);
    assert!(
        path.is_file(),
        "missing shared test data {}: the tests need ../shared/data/{name} beside the \
         repository root",
        path.display()
    );
    path
}

/// README's examples compile and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
