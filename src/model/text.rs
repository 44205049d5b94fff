//! The spiking text encoder: CLIP's token and position embeddings for 20 tokens, flattened and
//! held as the input of all T steps (direct encoding, the authors' repeat over T without the
//! copy), then LIF -> Linear -> LIF -> Linear and a TDW readout. A plain MLP on purpose: the
//! paper found it distils CLIP's text space as well as a spiking transformer ([`TextTower`]
//! selects that one instead, for the ablation).

use anyhow::{bail, Context};
use candle_core::{Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::block::NamedLif;
use super::config::{SpikeClipConfig, TextEncoderKind};
use super::readout::Readout;
use super::summary::Layer;
use super::text_transformer::TextTransformer;
use crate::energy::{Op, OpInput};
use crate::kernels::grad_slot::{GradSlot, SlotParam};
use crate::kernels::text_mlp::SlotLinear;
use crate::neuron::{LifConfig, MultiStepLif};
use crate::ops::Ops;

/// CLIP's token and position embeddings of a fixed-length token sequence, flattened.
///
/// The tables live at `clip_embedding.{token,position}_embedding.weight`, the authors' names, so
/// CLIP's can be copied in before training. Their gradients go to [`Self::grad_slots`], the
/// token table's as the rows a batch used (see [`crate::kernels::embedding::token_embedding`]),
/// when the fused ops run it.
#[derive(Debug, Clone)]
pub struct TokenEmbedding {
    token: SlotParam,
    position: SlotParam,
    context_length: usize,
    ops: Ops,
}

impl TokenEmbedding {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Self> {
        let c = &cfg.text;
        if c.context_length > c.max_positions {
            candle_core::bail!(
                "text encoder: context_length {} exceeds max_positions {}",
                c.context_length,
                c.max_positions
            )
        }
        let emb = vb.pp("clip_embedding");
        let token = candle_nn::embedding(c.vocab_size, c.width, emb.pp("token_embedding"))?;
        let position = emb.pp("position_embedding").get_with_hints(
            (c.max_positions, c.width),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        Ok(Self {
            token: SlotParam::new(token.embeddings().clone()),
            position: SlotParam::new(position),
            context_length: c.context_length,
            ops,
        })
    }

    /// `ids` unless they are not `[B, context_length]`.
    fn check<'a>(&self, ids: &'a Tensor) -> Result<&'a Tensor> {
        let l = self.context_length;
        if ids.rank() != 2 || ids.dim(1)? != l {
            candle_core::bail!(
                "text encoder: token ids must be [B, {l}], got {:?}",
                ids.shape()
            )
        }
        Ok(ids)
    }

    /// Token ids `[B, L]` to `[B, L * width]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.tokens(ids)?.flatten_from(1)
    }

    /// Token ids `[B, L]` to embedded tokens `[B, L, width]`.
    pub fn tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.ops
            .token_embedding(self.check(ids)?, &self.token, &self.position)
    }

    /// Where backward writes the tables' gradients.
    pub fn grad_slots(&self) -> Vec<GradSlot> {
        vec![self.token.grad().clone(), self.position.grad().clone()]
    }

    /// The layer-table row of the embeddings, whose output is `shape`.
    pub fn layer(&self, shape: Vec<usize>) -> Layer {
        let params = self.token.value().elem_count() + self.position.value().elem_count();
        Layer::new(
            "clip_embedding",
            "token + position embedding",
            shape,
            params,
        )
    }
}

/// Where every text tower keeps the two tables in a student's parameters.
const TOKEN_TABLE: &str = "text.clip_embedding.token_embedding.weight";
const POSITION_TABLE: &str = "text.clip_embedding.position_embedding.weight";

/// Starts a student's text encoder from CLIP's token and position tables (`[vocab, hidden]` and
/// `[positions, hidden]`), as the paper does: distillation then begins from CLIP's own token
/// geometry rather than from noise. The tables stay trainable. The student keeps CLIP's first
/// `max_positions` positions; vocabulary and width must be CLIP's.
pub fn copy_clip_embeddings(
    varmap: &VarMap,
    token: &Tensor,
    position: &Tensor,
) -> anyhow::Result<()> {
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("parameter map lock poisoned"))?;
    let table = |name: &str| {
        vars.get(name)
            .with_context(|| format!("the student has no parameter {name}"))
    };
    let student_token = table(TOKEN_TABLE)?;
    if student_token.dims() != token.dims() {
        bail!(
            "CLIP's token embedding is {:?} but the student's is {:?}: the student needs CLIP's \
             vocabulary and text.width equal to CLIP's text hidden size",
            token.dims(),
            student_token.dims()
        )
    }
    let student_position = table(POSITION_TABLE)?;
    let (rows, width) = student_position.dims2()?;
    let (clip_rows, clip_width) = position.dims2()?;
    if clip_width != width || clip_rows < rows {
        bail!(
            "CLIP's position embedding is {:?} but the student's is {:?}: the student needs \
             text.width equal to CLIP's and at most {clip_rows} positions",
            position.dims(),
            student_position.dims()
        )
    }
    student_token.set(token)?;
    student_position.set(&position.narrow(0, 0, rows)?.contiguous()?)?;
    Ok(())
}

/// The encoder up to its readout runs as one op, [`Ops::text_mlp`], which when fused writes
/// every gradient of its parameters to their slots.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    embedding: TokenEmbedding,
    lif1: NamedLif,
    fc1: SlotLinear,
    lif2: NamedLif,
    fc2: SlotLinear,
    readout: Readout,
    cfg: SpikeClipConfig,
}

/// candle-nn's linear layer under `vb` (its names and initialisation) with slot-fed gradients.
fn slot_linear(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<SlotLinear> {
    let linear = candle_nn::linear(inputs, outputs, vb)?;
    match linear.bias() {
        Some(bias) => Ok(SlotLinear::new(linear.weight().clone(), bias.clone())),
        None => candle_core::bail!("text encoder: a linear layer without bias"),
    }
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Self> {
        let c = &cfg.text;
        let flat = c.context_length * c.width;
        Ok(Self {
            embedding: TokenEmbedding::new(vb.clone(), cfg, ops)?,
            lif1: NamedLif {
                name: "lif1".into(),
                lif: MultiStepLif::new(LifConfig::default()),
            },
            fc1: slot_linear(flat, c.hidden, vb.pp("fc1"))?,
            lif2: NamedLif {
                name: "lif2".into(),
                lif: MultiStepLif::new(LifConfig::default()),
            },
            fc2: slot_linear(c.hidden, cfg.out_dim, vb.pp("fc2"))?,
            readout: Readout::new(cfg.readout, cfg.time_steps, vb.clone())?,
            cfg: cfg.clone(),
        })
    }

    /// Text features `[B, out_dim]` of token ids `[B, L]`.
    pub fn forward(&self, ids: &Tensor, _train: bool) -> Result<Tensor> {
        let e = &self.embedding;
        let layers = [(&self.lif1.lif, &self.fc1), (&self.lif2.lif, &self.fc2)];
        let steps = self.cfg.time_steps;
        let o = e
            .ops
            .text_mlp(e.check(ids)?, (&e.token, &e.position), layers, steps)?;
        self.readout.forward(&o)
    }

    /// Where backward writes the gradients of every parameter but the readout's.
    pub fn grad_slots(&self) -> Vec<GradSlot> {
        let mut slots = self.embedding.grad_slots();
        slots.extend(self.fc1.grad_slots());
        slots.extend(self.fc2.grad_slots());
        slots
    }

    pub fn lif_layers(&self) -> Vec<&NamedLif> {
        vec![&self.lif1, &self.lif2]
    }

    /// The layer table for one token window.
    pub fn layers(&self) -> Vec<Layer> {
        let (t, c) = (self.cfg.time_steps, &self.cfg.text);
        vec![
            self.embedding.layer(vec![t, c.context_length * c.width]),
            Layer::new("fc1", "LIF + linear", vec![t, c.hidden], self.fc1.params()),
            Layer::new(
                "fc2",
                "LIF + linear",
                vec![t, self.cfg.out_dim],
                self.fc2.params(),
            ),
            self.readout.layer(self.cfg.out_dim),
        ]
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

/// SpikeCLIP's text tower, chosen by `text.kind`. Each encoder keeps its own parameter names
/// under `text.`, so MLP checkpoints and the authors' `.pth` import are unaffected.
#[derive(Debug, Clone)]
pub enum TextTower {
    Mlp(TextEncoder),
    Transformer(TextTransformer),
}

impl TextTower {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Self> {
        Ok(match cfg.text.kind {
            TextEncoderKind::Mlp => Self::Mlp(TextEncoder::new(vb, cfg, ops)?),
            TextEncoderKind::Transformer => Self::Transformer(TextTransformer::new(vb, cfg, ops)?),
        })
    }

    pub fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::Mlp(e) => e.forward(ids, train),
            Self::Transformer(e) => e.forward(ids, train),
        }
    }

    pub fn lif_layers(&self) -> Vec<&NamedLif> {
        match self {
            Self::Mlp(e) => e.lif_layers(),
            Self::Transformer(e) => e.lif_layers(),
        }
    }

    /// Where backward writes the gradients that bypass candle's `GradStore`.
    pub fn grad_slots(&self) -> Vec<GradSlot> {
        match self {
            Self::Mlp(e) => e.grad_slots(),
            Self::Transformer(e) => e.grad_slots(),
        }
    }

    pub fn ops(&self) -> (Vec<Op>, Vec<Op>) {
        match self {
            Self::Mlp(e) => e.ops(),
            Self::Transformer(e) => e.ops(),
        }
    }

    pub fn layers(&self) -> Vec<Layer> {
        match self {
            Self::Mlp(e) => e.layers(),
            Self::Transformer(e) => e.layers(),
        }
    }
}
