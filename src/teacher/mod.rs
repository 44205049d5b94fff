//! Teachers: what the student learns to imitate. A real CLIP read from a local checkpoint, or
//! the built-in world's analytic teacher; training sees both through these traits.

use candle_core::Tensor;

pub mod clip;
mod pil_bicubic;
pub mod preprocess;
pub mod tokenizer;

/// Turns sentences into the token ids the text encoders read.
pub trait Tokenize: Send + Sync {
    fn vocab_size(&self) -> usize;
    /// One row of exactly `max_len` ids per text: truncated, and padded as the tokenizer pads.
    fn encode(&self, texts: &[String], max_len: usize) -> anyhow::Result<Vec<Vec<u32>>>;
}

/// The teacher's text tower, for D-text targets and zero-shot class embeddings.
pub trait TextTeacher: Send + Sync {
    fn embed_dim(&self) -> usize;
    /// Features before normalisation, `[N, embed_dim]` f32, on the CPU whatever device the
    /// teacher runs on: they are data (cached, compared, moved to a student's device by whoever
    /// needs them there).
    fn text_features(&self, texts: &[String]) -> anyhow::Result<Tensor>;
}

/// The teacher's image tower, which the feature cache runs once per dataset.
pub trait ImageTeacher: Send + Sync {
    /// Side of the square, CLIP-normalised input it reads.
    fn image_size(&self) -> usize;
    /// Features before normalisation, `[B, embed_dim]` f32 on the CPU, from pixels
    /// `[B, 3, S, S]` on any device (preprocessing runs on the CPU).
    fn image_features(&self, pixels: &Tensor) -> anyhow::Result<Tensor>;
}

/// Which model a command loads: `clip:DIR` (a Hugging Face CLIP directory). SpikeCLIP
/// checkpoints join as another variant.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    Clip(std::path::PathBuf),
}

impl ModelSpec {
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        match spec.split_once(':') {
            Some(("clip", dir)) if !dir.is_empty() => Ok(Self::Clip(dir.into())),
            _ => anyhow::bail!("model {spec:?}: expected clip:DIR"),
        }
    }
}
