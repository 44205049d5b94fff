//! The paper's experiments: label-set perturbations for the robustness study, the trainings
//! they share, and `spikeclip reproduce`'s suites (built-in world, real data) and report.

mod claims;
pub mod lab;
pub mod labels;
pub mod real_data;
pub mod report;
pub mod reproduce;
pub mod robustness;
pub mod subsets;
pub mod weights;
