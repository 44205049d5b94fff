//! The Spikingformer block: spiking self-attention and a spiking MLP over `[T, B, N, C]` tokens,
//! with residuals on the real-valued stream. The blocks know nothing of images, so the image
//! encoder runs them over its 8x8 tokens and the spiking transformer text encoder over its
//! word tokens.
//!
//! Every forward reads the [`Pass`] it runs: dense (training or eval), or spike-driven with
//! the spike-fed layers replaced by their BatchNorm-folded twins of [`crate::kernels::spikes`].

use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::LinearBn;
use super::summary::Layer;
use crate::energy::{Op, OpInput};
use crate::kernels::attention::Attention;
use crate::kernels::spikes::{spike_attention, SpikeBits, SpikeLayer};
use crate::neuron::{LifConfig, MultiStepLif};
use crate::ops::{Ops, Then};

/// A LIF layer with its name, for monitors and energy accounting.
#[derive(Debug, Clone)]
pub struct NamedLif {
    pub name: String,
    pub lif: MultiStepLif,
}

impl NamedLif {
    pub fn new(name: impl Into<String>, cfg: LifConfig) -> Self {
        Self {
            name: name.into(),
            lif: MultiStepLif::new(cfg),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lif.forward(x)
    }
}

/// Which computation a forward pass runs; `W` holds the folded layers of the part it reaches.
#[derive(Debug)]
pub(super) enum Pass<'a, W> {
    /// Dense f32 layers, BatchNorm in training or eval mode.
    Dense { train: bool },
    /// Eval mode with the spike-fed layers replaced by their folded, spike-driven twins.
    Sparse(&'a W),
}

impl<W> Clone for Pass<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for Pass<'_, W> {}

impl<'a, W> Pass<'a, W> {
    pub(super) fn train(self) -> bool {
        matches!(self, Pass::Dense { train: true })
    }

    /// `t` cut from the autograd graph unless training: the weights are variables, so without
    /// cuts every intermediate of an inference pass would stay alive until its output is dropped
    /// (several GB at the paper's size).
    pub(super) fn cut(self, t: Tensor) -> Tensor {
        if self.train() {
            t
        } else {
            t.detach()
        }
    }

    /// The same pass over a part of the model.
    pub(super) fn map<V>(self, part: impl FnOnce(&'a W) -> &'a V) -> Pass<'a, V> {
        match self {
            Pass::Dense { train } => Pass::Dense { train },
            Pass::Sparse(w) => Pass::Sparse(part(w)),
        }
    }
}

/// Spikes `[..., C]` on their way into linear layers: the dense pass keeps the LIF's input and
/// fuses the LIF into the layers it feeds, the sparse one packs the spikes once for all of them.
enum Fed<'a, W> {
    Dense {
        lif: &'a NamedLif,
        x: Tensor,
        train: bool,
    },
    Sparse {
        bits: SpikeBits,
        folded: &'a W,
        device: Device,
    },
}

impl<'a, W> Fed<'a, W> {
    /// The spikes of `lif` on `x`.
    fn new(lif: &'a NamedLif, x: &Tensor, pass: Pass<'a, W>) -> Result<Self> {
        Ok(match pass {
            Pass::Dense { train } => Fed::Dense {
                lif,
                x: x.clone(),
                train,
            },
            Pass::Sparse(folded) => Fed::Sparse {
                bits: lif.lif.forward_bits(x)?,
                folded,
                device: x.device().clone(),
            },
        })
    }

    /// `layer` applied to the spikes, then the spikes of `next` on its output; the sparse pass
    /// never writes that output whole (see [`SpikeLayer::linear_fired`]).
    fn then(
        &self,
        layer: &LinearBn,
        twin: impl FnOnce(&W) -> &SpikeLayer,
        next: &'a NamedLif,
    ) -> Result<Self> {
        Ok(match self {
            Fed::Dense { train, .. } => Fed::Dense {
                lif: next,
                x: self.linear(layer, twin)?,
                train: *train,
            },
            Fed::Sparse {
                bits,
                folded,
                device,
            } => Fed::Sparse {
                bits: twin(folded).linear_fired(bits, &next.lif, 1)?,
                folded,
                device: device.clone(),
            },
        })
    }

    /// `layer` applied to the spikes: itself when dense, its folded twin `twin(folded)` when
    /// sparse.
    fn linear(&self, layer: &LinearBn, twin: impl FnOnce(&W) -> &SpikeLayer) -> Result<Tensor> {
        match self {
            Fed::Dense { lif, x, train } => LinearBn::forward_lif(&[layer], &lif.lif, x, *train),
            Fed::Sparse {
                bits,
                folded,
                device,
            } => twin(folded).linear(bits, device),
        }
    }
}

/// Spiking self-attention's layers with BatchNorm folded in.
#[derive(Debug, Clone)]
struct FoldedAttention {
    q: SpikeLayer,
    k: SpikeLayer,
    v: SpikeLayer,
    proj: SpikeLayer,
}

/// Spiking self-attention's scale of `q k^T v`.
const ATTENTION_SCALE: f64 = 0.125;

/// Spiking self-attention: q, k, v from spikes, `(q k^T) v * 0.125` without softmax.
#[derive(Debug, Clone)]
struct SpikingSelfAttention {
    input: NamedLif,
    q: LinearBn,
    k: LinearBn,
    v: LinearBn,
    q_lif: NamedLif,
    k_lif: NamedLif,
    v_lif: NamedLif,
    attn_lif: NamedLif,
    proj: LinearBn,
    heads: usize,
    ops: Ops,
}

impl SpikingSelfAttention {
    fn new(vb: &VarBuilder, prefix: &str, (dim, heads): (usize, usize), ops: Ops) -> Result<Self> {
        let qkv = |n: &str| {
            LinearBn::new(
                vb,
                (dim, dim),
                false,
                (&format!("{n}_conv"), &format!("{n}_bn")),
                ops,
            )
        };
        let lif = |n: &str, cfg| NamedLif::new(format!("{prefix}.{n}"), cfg);
        Ok(Self {
            input: lif("in_lif", LifConfig::default()),
            q: qkv("q")?,
            k: qkv("k")?,
            v: qkv("v")?,
            q_lif: lif("q_lif", LifConfig::default()),
            k_lif: lif("k_lif", LifConfig::default()),
            v_lif: lif("v_lif", LifConfig::default()),
            attn_lif: lif("attn_lif", LifConfig::attention()),
            proj: LinearBn::new(vb, (dim, dim), true, ("proj_conv", "proj_bn"), ops)?,
            heads,
            ops,
        })
    }

    fn folded(&self) -> Result<FoldedAttention> {
        Ok(FoldedAttention {
            q: self.q.folded()?,
            k: self.k.folded()?,
            v: self.v.folded()?,
            proj: self.proj.folded()?,
        })
    }

    /// The attention core's settings.
    fn core(&self, key_mask: Option<&Tensor>) -> Attention {
        Attention {
            lifs: [&self.q_lif, &self.k_lif, &self.v_lif].map(|l| l.lif.clone()),
            heads: self.heads,
            scale: ATTENTION_SCALE,
            key_mask: key_mask.cloned(),
        }
    }

    /// `x + SSA(x)` for `x [T, B, N, C]`, the residual added here so that training can leave
    /// the projection's normalised output out of what it keeps. `key_mask` (`[B, N]`, 1 for
    /// tokens, 0 for padding) takes padding out of attention (see [`Attention::key_mask`]).
    fn forward(
        &self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        pass: Pass<FoldedAttention>,
    ) -> Result<Tensor> {
        let core = self.core(key_mask);
        let layers = [&self.q, &self.k, &self.v];
        let y = match pass {
            // In training the fused ops recompute the normalised q, k, v in backward.
            Pass::Dense { train: true } => {
                LinearBn::forward_lif_then(&layers, &self.input.lif, x, Then::Attention(&core))?
            }
            Pass::Dense { train: false } => {
                let qkv = LinearBn::forward_lif(&layers, &self.input.lif, x, false)?;
                self.ops.attention(&core, &qkv)?
            }
            Pass::Sparse(w) => {
                if key_mask.is_some() {
                    candle_core::bail!("spike-driven attention takes no key mask")
                }
                let (t, b, n, c) = x.dims4()?;
                let s = self.input.lif.forward_bits(x)?;
                // q, k, v straight to the spikes of their LIFs, `[T, B, N, H, d]`, then heads
                // first on the bits, `[T, B, H, N, d]`.
                let heads = |layer: &SpikeLayer, lif: &NamedLif| {
                    layer.linear_fired(&s, &lif.lif, self.heads)?.heads_first()
                };
                // Integer counts, exactly the dense product.
                let product = spike_attention(
                    &heads(&w.q, &self.q_lif)?,
                    &heads(&w.k, &self.k_lif)?,
                    &heads(&w.v, &self.v_lif)?,
                )?
                .to_dtype(candle_core::DType::F32)?
                .to_device(x.device())?;
                core.merge(&(product * ATTENTION_SCALE)?, (t, b, n, c))?
            }
        };
        if pass.train() {
            return self.proj.add_lif_to(x, &self.attn_lif.lif, &y);
        }
        x + Fed::new(&self.attn_lif, &y, pass)?.linear(&self.proj, |w| &w.proj)?
    }

    fn params(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.proj]
            .iter()
            .map(|l| l.params())
            .sum()
    }

    fn lifs(&self) -> [&NamedLif; 5] {
        [
            &self.input,
            &self.q_lif,
            &self.k_lif,
            &self.v_lif,
            &self.attn_lif,
        ]
    }
}

/// The spiking MLP's layers with BatchNorm folded in.
#[derive(Debug, Clone)]
struct FoldedMlp {
    fc1: SpikeLayer,
    fc2: SpikeLayer,
}

/// Spiking MLP: LIF, 1x1 conv to `ratio * C` with BN, LIF, 1x1 conv back with BN.
#[derive(Debug, Clone)]
struct SpikingMlp {
    lif1: NamedLif,
    fc1: LinearBn,
    lif2: NamedLif,
    fc2: LinearBn,
}

impl SpikingMlp {
    fn new(vb: &VarBuilder, prefix: &str, (dim, hidden): (usize, usize), ops: Ops) -> Result<Self> {
        Ok(Self {
            lif1: NamedLif::new(format!("{prefix}.lif1"), LifConfig::default()),
            fc1: LinearBn::new(vb, (dim, hidden), true, ("mlp1_conv", "mlp1_bn"), ops)?,
            lif2: NamedLif::new(format!("{prefix}.lif2"), LifConfig::default()),
            fc2: LinearBn::new(vb, (hidden, dim), true, ("mlp2_conv", "mlp2_bn"), ops)?,
        })
    }

    fn params(&self) -> usize {
        self.fc1.params() + self.fc2.params()
    }

    fn folded(&self) -> Result<FoldedMlp> {
        Ok(FoldedMlp {
            fc1: self.fc1.folded()?,
            fc2: self.fc2.folded()?,
        })
    }

    /// `x + MLP(x)` for `x [T, B, N, C]`, the residual added here as in spiking self-attention.
    fn forward(&self, x: &Tensor, pass: Pass<FoldedMlp>) -> Result<Tensor> {
        if pass.train() {
            // The fused ops recompute the hidden layer's normalised output, four times the
            // block's width, in backward instead of keeping it for the second layer.
            let packed = self.fc2.packed()?;
            let then = Then::LifLinear(&self.lif2.lif, &packed);
            let y = LinearBn::forward_lif_then(&[&self.fc1], &self.lif1.lif, x, then)?;
            return self.fc2.add_to(x, &y);
        }
        let hidden = Fed::new(&self.lif1, x, pass)?.then(&self.fc1, |w| &w.fc1, &self.lif2)?;
        x + hidden.linear(&self.fc2, |w| &w.fc2)?
    }
}

/// One Spikingformer block over `[T, B, N, C]` tokens: `x + SSA(x)`, then `x + MLP(x)`, the
/// residuals on the real-valued stream. Parameters and LIF layers are named `block.{i}.*`.
#[derive(Debug, Clone)]
pub struct Block {
    attn: SpikingSelfAttention,
    mlp: SpikingMlp,
    name: String,
    dim: usize,
    mlp_ratio: usize,
}

impl Block {
    /// Block `i` of width `dim` with `heads` attention heads and an MLP `mlp_ratio` times as
    /// wide, its ops run by `ops`.
    pub fn new(
        vb: &VarBuilder,
        i: usize,
        (dim, heads, mlp_ratio): (usize, usize, usize),
        ops: Ops,
    ) -> Result<Self> {
        let name = format!("block.{i}");
        let bv = vb.pp(&name);
        let (attn, mlp) = (format!("{name}.attn"), format!("{name}.mlp"));
        Ok(Self {
            attn: SpikingSelfAttention::new(&bv.pp("attn"), &attn, (dim, heads), ops)?,
            mlp: SpikingMlp::new(&bv.pp("mlp"), &mlp, (dim, dim * mlp_ratio), ops)?,
            name,
            dim,
            mlp_ratio,
        })
    }

    /// `[T, B, N, C]` to `[T, B, N, C]`; `key_mask` (`[B, N]`, 1 for tokens, 0 for padding)
    /// takes padding out of attention.
    pub fn forward(&self, x: &Tensor, key_mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.run(x, key_mask, Pass::Dense { train })
    }

    /// The block under `pass`; [`Self::forward`] is its dense case.
    pub(super) fn run(
        &self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        pass: Pass<FoldedBlock>,
    ) -> Result<Tensor> {
        let x = self.attn.forward(x, key_mask, pass.map(|w| &w.attn))?;
        Ok(pass.cut(self.mlp.forward(&x, pass.map(|w| &w.mlp))?))
    }

    /// The spike-fed layers with the current eval-mode BatchNorm folded in.
    pub(super) fn folded(&self) -> Result<FoldedBlock> {
        Ok(FoldedBlock {
            attn: self.attn.folded()?,
            mlp: self.mlp.folded()?,
        })
    }

    /// The block's LIF layers, in forward order.
    pub fn lifs(&self) -> Vec<&NamedLif> {
        let mut all = self.attn.lifs().to_vec();
        all.extend([&self.mlp.lif1, &self.mlp.lif2]);
        all
    }

    /// The block's compute over `n` tokens: SNN ops and the ANN twin's, whose attention keeps
    /// the softmax.
    pub fn ops(&self, n: usize) -> (Vec<Op>, Vec<Op>) {
        let (p, d, heads, ratio) = (&self.name, self.dim, self.attn.heads, self.mlp_ratio);
        let spikes = |l: &str| OpInput::Spikes(format!("{p}.{l}"));
        let head_dim = d / heads;
        let mut snn = vec![
            Op::linear(format!("{p}.attn.q_conv"), n, (d, d), spikes("attn.in_lif")),
            Op::linear(format!("{p}.attn.k_conv"), n, (d, d), spikes("attn.in_lif")),
            Op::linear(format!("{p}.attn.v_conv"), n, (d, d), spikes("attn.in_lif")),
        ];
        let tail = vec![
            Op::linear(
                format!("{p}.attn.proj_conv"),
                n,
                (d, d),
                spikes("attn.attn_lif"),
            ),
            Op::linear(
                format!("{p}.mlp.mlp1_conv"),
                n,
                (d, d * ratio),
                spikes("mlp.lif1"),
            ),
            Op::linear(
                format!("{p}.mlp.mlp2_conv"),
                n,
                (d * ratio, d),
                spikes("mlp.lif2"),
            ),
        ];
        let mut ann: Vec<Op> = snn.iter().map(Op::as_ann).collect();
        ann.push(Op::softmax_attention(
            format!("{p}.attn.softmax_qkv"),
            heads,
            n,
            head_dim,
        ));
        ann.extend(tail.iter().map(Op::as_ann));
        let lif = |l: &str| format!("{p}.attn.{l}");
        snn.push(Op::spike_attention(
            format!("{p}.attn.qkv"),
            heads,
            n,
            head_dim,
            (&lif("q_lif"), &lif("k_lif"), &lif("v_lif")),
        ));
        snn.extend(tail);
        (snn, ann)
    }

    /// Layer-table rows of the block for one sample of `n` tokens over `t` steps.
    pub fn layers(&self, t: usize, n: usize) -> Vec<Layer> {
        let shape = vec![t, n, self.dim];
        vec![
            Layer::new(
                format!("{}.attn", self.name),
                "spiking self-attention",
                shape.clone(),
                self.attn.params(),
            ),
            Layer::new(
                format!("{}.mlp", self.name),
                "spiking MLP",
                shape,
                self.mlp.params(),
            ),
        ]
    }
}

/// A block's spike-fed layers with BatchNorm folded in.
#[derive(Debug, Clone)]
pub(super) struct FoldedBlock {
    attn: FoldedAttention,
    mlp: FoldedMlp,
}
