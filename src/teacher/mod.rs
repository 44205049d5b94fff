//! Teachers: what the student learns to imitate. A real CLIP read from a local checkpoint, or
//! the built-in world's analytic teacher; training sees both through these traits.

use candle_core::Tensor;

/// Turns sentences into the token ids the text encoders read.
pub trait Tokenize: Send + Sync {
    fn vocab_size(&self) -> usize;
    /// One row of exactly `max_len` ids per text: truncated, and padded as the tokenizer pads.
    fn encode(&self, texts: &[String], max_len: usize) -> anyhow::Result<Vec<Vec<u32>>>;
}

/// The teacher's text tower, for D-text targets and zero-shot class embeddings.
pub trait TextTeacher: Send + Sync {
    fn embed_dim(&self) -> usize;
    /// Features before normalisation, `[N, embed_dim]` f32.
    fn text_features(&self, texts: &[String]) -> anyhow::Result<Tensor>;
}

pub mod tokenizer;
