//! The paper's experiments as reusable pieces: label-set perturbations for the robustness study.

pub mod labels;
