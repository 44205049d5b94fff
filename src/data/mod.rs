//! Data on its way to the student: labelled image sets and sentence sets, each paired with the
//! teacher's features, whether they come from the on-disk teacher cache or the built-in world.
//!
//! Training stages consume only these two traits, so the teacher runs once per dataset, never
//! once per epoch.

pub mod cache;
pub mod prefix;
pub mod prompts;
pub mod sources;
pub mod student_inputs;
pub mod world;

use candle_core::{Device, Tensor};

/// A batch of images with their teacher features.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// Student inputs: CLIP-normalised crops at 32x32, `[B, 3, 32, 32]` f32.
    pub inputs: Tensor,
    /// The teacher's image features before normalisation, `[B, D]` f32.
    pub teacher: Tensor,
    /// Class index of each image (empty for unlabelled distillation sets).
    pub labels: Vec<u32>,
}

/// Images with teacher features: a cached real dataset or a split of the built-in world.
pub trait ImageFeatureSet: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Class names in label order; empty when the set has no labels.
    fn class_names(&self) -> &[String];
    fn batch(&self, indices: &[usize], device: &Device) -> anyhow::Result<ImageBatch>;
}

/// A batch of sentences with their teacher features.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// Token ids for the student, `[B, L]` u32.
    pub token_ids: Tensor,
    /// The teacher's text features before normalisation, `[B, D]` f32.
    pub teacher: Tensor,
}

/// Sentences with teacher features, such as D-text.
pub trait TextFeatureSet: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn batch(&self, indices: &[usize], device: &Device) -> anyhow::Result<TextBatch>;
}
