//! ScratchCLIP, the ANN twin SpikeCLIP is compared with: the same convolutional tokenizer with
//! ReLU in place of LIF, a standard transformer (LayerNorm, softmax attention, QuickGELU MLP) of
//! the same width, the same readout and head; and the same MLP text encoder with ReLU for LIF.
//! One time step: an ANN has nothing to integrate over time.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::config::SpikeClipConfig;
use super::layers::{max_pool_3x3_s2, ConvBn, LayerNorm};
use super::readout::Readout;
use super::spikingformer::tokenizer_convs;
use super::text::TokenEmbedding;
use crate::kernels::grad_slot::GradSlot;
use crate::ops::Ops;

/// `x * sigmoid(1.702 x)`, CLIP's activation.
fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

#[derive(Debug, Clone)]
struct TransformerBlock {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(dim, vb.pp("ln1"))?,
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("attn.qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("attn.proj"))?,
            ln2: LayerNorm::new(dim, vb.pp("ln2"))?,
            fc1: candle_nn::linear(dim, hidden, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(hidden, dim, vb.pp("mlp.fc2"))?,
            heads,
        })
    }

    /// `[B, N, C]` to `[B, N, C]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (h, d) = (self.heads, c / self.heads);
        let qkv = self
            .qkv
            .forward(&self.ln1.forward(x)?)?
            .reshape((b, n, 3, h, d))?
            .permute((2, 0, 3, 1, 4))?; // [3, B, H, N, d]
        let part = |i: usize| qkv.get(i)?.contiguous()?.reshape((b * h, n, d));
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        // The differentiable softmax: `softmax_last_dim` has no backward pass.
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let y = attn
            .matmul(&v)?
            .reshape((b, h, n, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, c))?;
        let x = (x + self.proj.forward(&y)?)?;
        let m = self
            .fc2
            .forward(&quick_gelu(&self.fc1.forward(&self.ln2.forward(&x)?)?)?)?;
        x + m
    }
}

/// ScratchCLIP's image encoder.
#[derive(Debug, Clone)]
pub struct ScratchImageEncoder {
    convs: Vec<ConvBn>,
    blocks: Vec<TransformerBlock>,
    readout: Readout,
    head: Linear,
    ops: Ops,
}

impl ScratchImageEncoder {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Self> {
        let c = &cfg.image;
        let convs = tokenizer_convs(&vb, cfg, ops)?;
        let blocks = (0..c.depth)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp(format!("block.{i}")),
                    c.embed_dim,
                    c.num_heads,
                    c.embed_dim * c.mlp_ratio,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            convs,
            blocks,
            readout: Readout::new(cfg.readout, 1, vb.clone())?,
            head: candle_nn::linear(c.embed_dim, cfg.out_dim, vb.pp("proj"))?,
            ops,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        for (i, conv) in self.convs.iter().enumerate() {
            if i > 0 {
                y = y.relu()?;
            }
            y = conv.forward(&y, train)?;
            if i == 2 || i == 3 {
                y = max_pool_3x3_s2(self.ops, &y)?;
            }
        }
        let mut tokens = y.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // [B, N, C]
        for b in &self.blocks {
            tokens = b.forward(&tokens)?;
        }
        let pooled = tokens.mean(1)?.unsqueeze(0)?; // one time step
        self.head.forward(&self.readout.forward(&pooled)?)
    }
}

/// ScratchCLIP's text encoder: SpikeCLIP's MLP with ReLU in place of LIF. It stays an MLP when
/// `text.kind` is `transformer`: the architecture ablation is about the spiking text tower.
#[derive(Debug, Clone)]
pub struct ScratchTextEncoder {
    embedding: TokenEmbedding,
    fc1: Linear,
    fc2: Linear,
    readout: Readout,
}

impl ScratchTextEncoder {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Self> {
        let c = &cfg.text;
        Ok(Self {
            embedding: TokenEmbedding::new(vb.clone(), cfg, ops)?,
            fc1: candle_nn::linear(c.context_length * c.width, c.hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(c.hidden, cfg.out_dim, vb.pp("fc2"))?,
            readout: Readout::new(cfg.readout, 1, vb.clone())?,
        })
    }

    /// Where backward writes the token table's gradient.
    pub fn grad_slots(&self) -> Vec<GradSlot> {
        self.embedding.grad_slots()
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let e = self.embedding.forward(ids)?;
        let h = self.fc1.forward(&e.relu()?)?;
        let o = self.fc2.forward(&h.relu()?)?;
        self.readout.forward(&o.unsqueeze(0)?)
    }
}
