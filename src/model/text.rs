//! The spiking text encoder: CLIP's token and position embeddings for 20 tokens, flattened and
//! repeated over T steps, then LIF -> Linear -> LIF -> Linear and a TDW readout. A plain MLP on
//! purpose: the paper found it distils CLIP's text space as well as a spiking transformer.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::SpikeClipConfig;
use super::readout::Readout;
use super::spikingformer::NamedLif;
use crate::energy::{Op, OpInput};
use crate::neuron::{LifConfig, MultiStepLif};

/// CLIP's token and position embeddings of a fixed-length token sequence, flattened.
///
/// The tables live at `clip_embedding.{token,position}_embedding.weight`, the authors' names, so
/// CLIP's can be copied in before training.
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    token: Embedding,
    position: Tensor,
    context_length: usize,
}

impl TokenEmbedding {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig) -> Result<Self> {
        let c = &cfg.text;
        if c.context_length > c.max_positions {
            candle_core::bail!(
                "text encoder: context_length {} exceeds max_positions {}",
                c.context_length,
                c.max_positions
            )
        }
        let emb = vb.pp("clip_embedding");
        Ok(Self {
            token: candle_nn::embedding(c.vocab_size, c.width, emb.pp("token_embedding"))?,
            position: emb.pp("position_embedding").get_with_hints(
                (c.max_positions, c.width),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            )?,
            context_length: c.context_length,
        })
    }

    /// Token ids `[B, L]` to `[B, L * width]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let l = self.context_length;
        if ids.rank() != 2 || ids.dim(1)? != l {
            candle_core::bail!(
                "text encoder: token ids must be [B, {l}], got {:?}",
                ids.shape()
            )
        }
        self.token
            .forward(ids)?
            .broadcast_add(&self.position.narrow(0, 0, l)?)?
            .flatten_from(1)
    }
}

#[derive(Debug, Clone)]
pub struct TextEncoder {
    embedding: TokenEmbedding,
    lif1: NamedLif,
    fc1: Linear,
    lif2: NamedLif,
    fc2: Linear,
    readout: Readout,
    cfg: SpikeClipConfig,
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig) -> Result<Self> {
        let c = &cfg.text;
        let flat = c.context_length * c.width;
        Ok(Self {
            embedding: TokenEmbedding::new(vb.clone(), cfg)?,
            lif1: NamedLif {
                name: "lif1".into(),
                lif: MultiStepLif::new(LifConfig::default()),
            },
            fc1: candle_nn::linear(flat, c.hidden, vb.pp("fc1"))?,
            lif2: NamedLif {
                name: "lif2".into(),
                lif: MultiStepLif::new(LifConfig::default()),
            },
            fc2: candle_nn::linear(c.hidden, cfg.out_dim, vb.pp("fc2"))?,
            readout: Readout::new(cfg.readout, cfg.time_steps, vb.clone())?,
            cfg: cfg.clone(),
        })
    }

    /// Text features `[B, out_dim]` of token ids `[B, L]`.
    pub fn forward(&self, ids: &Tensor, _train: bool) -> Result<Tensor> {
        let e = self.embedding.forward(ids)?;
        let (b, f) = e.dims2()?;
        let t = self.cfg.time_steps;
        let x = e.unsqueeze(0)?.broadcast_as((t, b, f))?.contiguous()?;
        let h = self.fc1.forward(&self.lif1.forward(&x)?)?;
        let o = self.fc2.forward(&self.lif2.forward(&h)?)?;
        self.readout.forward(&o)
    }

    pub fn lif_layers(&self) -> Vec<&NamedLif> {
        vec![&self.lif1, &self.lif2]
    }

    /// The encoder's compute for energy accounting: SNN ops and the ANN twin's.
    pub fn ops(&self) -> (Vec<Op>, Vec<Op>) {
        let c = &self.cfg.text;
        let snn = vec![
            Op::linear(
                "fc1",
                1,
                (c.context_length * c.width, c.hidden),
                OpInput::Spikes("lif1".into()),
            ),
            Op::linear(
                "fc2",
                1,
                (c.hidden, self.cfg.out_dim),
                OpInput::Spikes("lif2".into()),
            ),
        ];
        let ann = snn.iter().map(Op::as_ann).collect();
        (snn, ann)
    }
}
