//! The spiking-transformer text encoder the paper compares its MLP with (Table 5): CLIP's token
//! and position embeddings repeated over T steps, Spikingformer blocks (the image encoder's)
//! over the word tokens with padding masked out of attention, a mean over the real tokens, a
//! linear map to CLIP's space and the readout over T.
//!
//! Padding rule: both tokenizers (CLIP's BPE and the built-in world's) end every row with the
//! end token, padding included, and truncate so that it stays last. So a row's last id is its
//! end token, and every position after that id's first occurrence is padding; the end token
//! itself counts as real, as CLIP pools its feature. No tokenizer needs to be known.
//!
//! Padding cannot reach the real tokens: linear layers, BatchNorm in eval mode and LIF act per
//! token, and attention sees zero keys at padding. In train mode BatchNorm's batch statistics
//! do include padding tokens.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::block::{Block, NamedLif};
use super::config::SpikeClipConfig;
use super::readout::Readout;
use super::summary::{linear_params, Layer};
use super::text::TokenEmbedding;
use crate::energy::{Op, OpInput};
use crate::kernels::grad_slot::GradSlot;
use crate::ops::Ops;

/// `[B, L]` with 1 for real tokens and 0 for padding (the module doc's rule), as f32.
pub fn token_mask(ids: &Tensor) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
    let (b, l) = ids.dims2()?;
    let mut mask = Vec::with_capacity(b * l);
    for row in &rows {
        let Some(end) = row.last() else {
            candle_core::bail!("text encoder: empty token rows")
        };
        let first_end = row.iter().position(|id| id == end).unwrap_or(l - 1);
        mask.extend((0..l).map(|i| if i <= first_end { 1f32 } else { 0f32 }));
    }
    Tensor::from_vec(mask, (b, l), ids.device())
}

#[derive(Debug, Clone)]
pub struct TextTransformer {
    embedding: TokenEmbedding,
    blocks: Vec<Block>,
    head: Linear,
    readout: Readout,
    cfg: SpikeClipConfig,
}

impl TextTransformer {
    /// Weights under `clip_embedding.*`, `block.{i}.*` (the image blocks' names), `proj.*` and
    /// the readout's.
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Self> {
        let c = &cfg.text;
        if c.num_heads == 0 || !c.width.is_multiple_of(c.num_heads) {
            candle_core::bail!(
                "text transformer: width {} must divide by num_heads {}",
                c.width,
                c.num_heads
            )
        }
        let blocks = (0..c.depth)
            .map(|i| Block::new(&vb, i, (c.width, c.num_heads, c.mlp_ratio), ops))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embedding: TokenEmbedding::new(vb.clone(), cfg, ops)?,
            blocks,
            head: candle_nn::linear(c.width, cfg.out_dim, vb.pp("proj"))?,
            readout: Readout::new(cfg.readout, cfg.time_steps, vb.clone())?,
            cfg: cfg.clone(),
        })
    }

    /// Text features `[B, out_dim]` of token ids `[B, L]`.
    pub fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let e = self.embedding.tokens(ids)?;
        let (b, l, w) = e.dims3()?;
        let mask = token_mask(ids)?;
        let t = self.cfg.time_steps;
        let mut x = e.unsqueeze(0)?.broadcast_as((t, b, l, w))?.contiguous()?;
        for block in &self.blocks {
            x = block.forward(&x, Some(&mask), train)?;
        }
        let m = mask.reshape((1, b, l, 1))?;
        let pooled = x.broadcast_mul(&m)?.sum(2)?.broadcast_div(&m.sum(2)?)?; // [T, B, W]
        self.readout.forward(&self.head.forward(&pooled)?)
    }

    /// Where backward writes the token table's gradient.
    pub fn grad_slots(&self) -> Vec<GradSlot> {
        self.embedding.grad_slots()
    }

    /// Every LIF layer, in forward order.
    pub fn lif_layers(&self) -> Vec<&NamedLif> {
        self.blocks.iter().flat_map(Block::lifs).collect()
    }

    /// The encoder's compute for energy accounting: SNN ops and the ANN twin's. Padding is
    /// counted as computed, as the dense kernels compute it.
    pub fn ops(&self) -> (Vec<Op>, Vec<Op>) {
        let c = &self.cfg.text;
        let (mut snn, mut ann) = (Vec::new(), Vec::new());
        for b in &self.blocks {
            let (bs, ba) = b.ops(c.context_length);
            snn.extend(bs);
            ann.extend(ba);
        }
        let head = Op::linear(
            "proj",
            1,
            (c.width, self.cfg.out_dim),
            OpInput::RealEveryStep,
        );
        ann.push(head.clone());
        snn.push(head);
        (snn, ann)
    }

    /// The layer table for one token window.
    pub fn layers(&self) -> Vec<Layer> {
        let (t, c) = (self.cfg.time_steps, &self.cfg.text);
        let mut rows = vec![self.embedding.layer(vec![t, c.context_length, c.width])];
        for b in &self.blocks {
            rows.extend(b.layers(t, c.context_length));
        }
        rows.push(Layer::new(
            "proj",
            "masked mean + linear",
            vec![t, self.cfg.out_dim],
            linear_params(&self.head),
        ));
        rows.push(self.readout.layer(self.cfg.out_dim));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn padding_is_everything_after_the_first_end_token() -> Result<()> {
        // World-style (end id 1) and CLIP-style (end id 49407) rows, one of them full.
        let ids = Tensor::from_vec(
            vec![
                0u32, 5, 1, 1, 1, 49406, 320, 49407, 49407, 49407, 0, 5, 6, 7, 1,
            ],
            (3, 5),
            &Device::Cpu,
        )?;
        let m: Vec<Vec<f32>> = token_mask(&ids)?.to_vec2()?;
        assert_eq!(
            m,
            vec![
                vec![1., 1., 1., 0., 0.],
                vec![1., 1., 1., 0., 0.],
                vec![1., 1., 1., 1., 1.]
            ]
        );
        Ok(())
    }
}
