//! A description of a network's compute, independent of its weights: each encoder lists its
//! ops in a few lines, and the accounting turns them into MACs, SOPs and energy. Keeping this
//! apart from the model code lets the energy report describe any architecture, and the ANN twin
//! is just the same list with every input real-valued.

use serde::Serialize;

/// The operation behind a row of the report, for the reader; the counting rule depends on
/// [`OpInput`], not on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Conv,
    Linear,
    MatMul,
    /// The two products of spiking self-attention, Q (K^T V), counted by Spikingformer's rule.
    AttentionProduct,
}

/// What feeds an op, which decides whether it costs multiply-accumulates or accumulates only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpInput {
    /// A real-valued input that is the same at every time step (pixels, token embeddings, a
    /// mean over T): computed once per sample, FLOPs counted as MACs.
    Real,
    /// A real-valued input that changes with the time step: FLOPs x T counted as MACs.
    RealEveryStep,
    /// The spikes of the named LIF layer: SOPs = firing rate x T x FLOPs.
    Spikes(String),
    /// Spiking self-attention between the spikes of three LIF layers: SOPs =
    /// T x H x N x d^2 x (fr_q + min(fr_k, fr_v)).
    SpikeAttention { q: String, k: String, v: String },
}

/// One op of a network: FLOPs per sample per time step (a MAC counts as one FLOP, as in the
/// Spikformer and Spikingformer appendices) and the shape of its output for one sample and step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    pub name: String,
    pub kind: OpKind,
    pub flops: u64,
    pub output_shape: Vec<usize>,
    pub input: OpInput,
}

impl Op {
    /// A 2-d convolution producing `c_out x h_out x w_out` from `c_in` channels, `k x k` kernel.
    pub fn conv2d(
        name: impl Into<String>,
        (c_in, c_out, k): (usize, usize, usize),
        (h_out, w_out): (usize, usize),
        input: OpInput,
    ) -> Self {
        Self {
            name: name.into(),
            kind: OpKind::Conv,
            flops: (c_in * c_out * k * k * h_out * w_out) as u64,
            output_shape: vec![c_out, h_out, w_out],
            input,
        }
    }

    /// A linear layer applied to each of `tokens` vectors of width `d_in`.
    pub fn linear(
        name: impl Into<String>,
        tokens: usize,
        (d_in, d_out): (usize, usize),
        input: OpInput,
    ) -> Self {
        Self {
            name: name.into(),
            kind: OpKind::Linear,
            flops: (tokens * d_in * d_out) as u64,
            output_shape: vec![tokens, d_out],
            input,
        }
    }

    /// A batch of `batch` products of an `m x k` by a `k x n` matrix.
    pub fn matmul(
        name: impl Into<String>,
        batch: usize,
        (m, k, n): (usize, usize, usize),
        input: OpInput,
    ) -> Self {
        Self {
            name: name.into(),
            kind: OpKind::MatMul,
            flops: (batch * m * k * n) as u64,
            output_shape: vec![batch, m, n],
            input,
        }
    }

    /// Spiking self-attention Q (K^T V) over `heads` heads of `tokens` tokens and width
    /// `head_dim`: K^T V and Q (K^T V) are each `heads x tokens x head_dim^2` FLOPs.
    pub fn spike_attention(
        name: impl Into<String>,
        heads: usize,
        tokens: usize,
        head_dim: usize,
        (q, k, v): (&str, &str, &str),
    ) -> Self {
        Self {
            name: name.into(),
            kind: OpKind::AttentionProduct,
            flops: 2 * (heads * tokens * head_dim * head_dim) as u64,
            output_shape: vec![heads, tokens, head_dim],
            input: OpInput::SpikeAttention {
                q: q.to_string(),
                k: k.to_string(),
                v: v.to_string(),
            },
        }
    }

    /// Softmax attention softmax(Q K^T) V of an ANN: Q K^T and the product with V are each
    /// `heads x tokens^2 x head_dim` MACs, for an ANN twin that keeps the softmax.
    pub fn softmax_attention(
        name: impl Into<String>,
        heads: usize,
        tokens: usize,
        head_dim: usize,
    ) -> Self {
        Self {
            name: name.into(),
            kind: OpKind::AttentionProduct,
            flops: 2 * (heads * tokens * tokens * head_dim) as u64,
            output_shape: vec![heads, tokens, head_dim],
            input: OpInput::Real,
        }
    }

    /// The same op in an ANN twin that computes what the SNN computes (ReLU in place of LIF):
    /// identical FLOPs, fed by real values.
    pub fn as_ann(&self) -> Self {
        Self {
            input: OpInput::Real,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_flops_follow_the_textbook_formulas() {
        let conv = Op::conv2d("c", (3, 8, 3), (4, 5), OpInput::Real);
        assert_eq!(conv.flops, 3 * 8 * 9 * 4 * 5);
        assert_eq!(conv.output_shape, vec![8, 4, 5]);
        let fc = Op::linear("l", 7, (16, 32), OpInput::Real);
        assert_eq!(fc.flops, 7 * 16 * 32);
        let mm = Op::matmul("m", 2, (3, 4, 5), OpInput::Real);
        assert_eq!(mm.flops, 2 * 3 * 4 * 5);
        let att = Op::spike_attention("a", 8, 64, 48, ("q", "k", "v"));
        assert_eq!(att.flops, 2 * 8 * 64 * 48 * 48);
        assert_eq!(att.as_ann().input, OpInput::Real);
        let softmax = Op::softmax_attention("s", 8, 64, 48);
        assert_eq!(softmax.flops, 2 * 8 * 64 * 64 * 48);
    }
}
