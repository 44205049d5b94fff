//! Evaluation: zero-shot classification with prompt ensembling.

pub mod zeroshot;
