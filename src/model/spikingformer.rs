//! The image encoder: a Spikingformer. A spiking convolutional tokenizer turns the image,
//! repeated over T steps (direct encoding), into 8x8 tokens; blocks of spiking self-attention
//! and spiking MLP refine them with residuals on the real-valued stream; a TDW readout and a
//! linear head map the mean token into CLIP's space.
//!
//! Tokens are kept channels-last, `[T, B, N, C]`, inside the blocks: every 1x1 convolution is
//! then a plain matrix product over rows. The blocks know nothing of images, so the spiking
//! transformer text encoder runs the same [`Block`] over its word tokens.
//!
//! Inference can also run spike-driven ([`ImageEncoder::forward_sparse`]): every layer fed by a
//! LIF reads bit-packed spikes through the accumulate-only kernels of
//! [`crate::kernels::spikes`] with its BatchNorm folded in, and `q . k^T . v` is a popcount.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::SpikeClipConfig;
use super::layers::{max_pool_3x3_s2_channels_last, ConvBn, LinearBn};
use super::readout::Readout;
use super::summary::{linear_params, Layer};
use crate::energy::{Op, OpInput};
use crate::kernels::attention::Attention;
use crate::kernels::layout;
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
enum Pass<'a, W> {
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
    fn train(self) -> bool {
        matches!(self, Pass::Dense { train: true })
    }

    /// `t` cut from the autograd graph unless training: the weights are variables, so without
    /// cuts every intermediate of an inference pass would stay alive until its output is dropped
    /// (several GB at the paper's size).
    fn cut(self, t: Tensor) -> Tensor {
        if self.train() {
            t
        } else {
            t.detach()
        }
    }

    /// The same pass over a part of the model.
    fn map<V>(self, part: impl FnOnce(&'a W) -> &'a V) -> Pass<'a, V> {
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
            Pass::Sparse(_) => {
                if key_mask.is_some() {
                    candle_core::bail!("spike-driven attention takes no key mask")
                }
                let (t, b, n, c) = x.dims4()?;
                let s = Fed::new(&self.input, x, pass)?;
                // Spikes straight to bits, heads split on the bits, `[T, B, H, N, d]`.
                let heads = |lif: &NamedLif, y: Tensor| {
                    let d = c / self.heads;
                    lif.lif
                        .forward_bits(&y.reshape((t, b, n, self.heads, d))?)?
                        .heads_first()
                };
                // Integer counts, exactly the dense product.
                let product = spike_attention(
                    &heads(&self.q_lif, s.linear(&self.q, |w| &w.q)?)?,
                    &heads(&self.k_lif, s.linear(&self.k, |w| &w.k)?)?,
                    &heads(&self.v_lif, s.linear(&self.v, |w| &w.v)?)?,
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
        let h = Fed::new(&self.lif1, x, pass)?.linear(&self.fc1, |w| &w.fc1)?;
        x + Fed::new(&self.lif2, &h, pass)?.linear(&self.fc2, |w| &w.fc2)?
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

    fn run(
        &self,
        x: &Tensor,
        key_mask: Option<&Tensor>,
        pass: Pass<FoldedBlock>,
    ) -> Result<Tensor> {
        let x = self.attn.forward(x, key_mask, pass.map(|w| &w.attn))?;
        Ok(pass.cut(self.mlp.forward(&x, pass.map(|w| &w.mlp))?))
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

#[derive(Debug, Clone)]
struct FoldedBlock {
    attn: FoldedAttention,
    mlp: FoldedMlp,
}

/// The spike-fed layers of an [`ImageEncoder`] with eval-mode BatchNorm folded in, prepared
/// once for [`ImageEncoder::forward_sparse`]. A snapshot: rebuild it after the weights or the
/// BatchNorm statistics change.
#[derive(Debug, Clone)]
pub struct SparseWeights {
    /// Tokenizer convs 1..5 (conv 0 sees the real-valued image).
    convs: Vec<SpikeLayer>,
    blocks: Vec<FoldedBlock>,
}

/// The Spikingformer image encoder.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    convs: Vec<ConvBn>,
    /// The LIF after each tokenizer conv but the last.
    conv_lifs: Vec<NamedLif>,
    blocks: Vec<Block>,
    readout: Readout,
    head: Linear,
    cfg: SpikeClipConfig,
    ops: Ops,
}

/// Channels of the tokenizer convs for embedding width `d`: 3 -> d/8 -> d/4 -> d/2 -> d -> d.
pub fn tokenizer_widths(in_channels: usize, d: usize) -> [usize; 6] {
    [in_channels, d / 8, d / 4, d / 2, d, d]
}

/// The five 3x3 conv + BN stages of the tokenizer, at the authors' names
/// (`patch_embed.block{i}_conv`, `patch_embed.block{i}_bn`); shared with the ANN twin.
pub fn tokenizer_convs(vb: &VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Vec<ConvBn>> {
    let c = &cfg.image;
    let widths = tokenizer_widths(c.in_channels, c.embed_dim);
    let pe = vb.pp("patch_embed");
    (0..5)
        .map(|i| {
            ConvBn::new(
                &pe,
                (widths[i], widths[i + 1], 3),
                false,
                (&format!("block{i}_conv"), &format!("block{i}_bn")),
                ops,
            )
        })
        .collect()
}

/// The tokenizer convs after which the feature map is max-pooled (halved).
const POOLED: [usize; 2] = [2, 3];

impl ImageEncoder {
    /// The encoder under `vb`, its ops run by `ops`.
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig, ops: Ops) -> Result<Self> {
        let c = &cfg.image;
        if !c.embed_dim.is_multiple_of(8) || !c.embed_dim.is_multiple_of(c.num_heads) {
            candle_core::bail!(
                "image encoder: embed_dim {} must divide by 8 and by num_heads {}",
                c.embed_dim,
                c.num_heads
            )
        }
        let convs = tokenizer_convs(&vb, cfg, ops)?;
        let conv_lifs = (0..4)
            .map(|i| NamedLif::new(format!("patch_embed.lif{}", i + 1), LifConfig::default()))
            .collect();
        let blocks = (0..c.depth)
            .map(|i| Block::new(&vb, i, (c.embed_dim, c.num_heads, c.mlp_ratio), ops))
            .collect::<Result<Vec<_>>>()?;
        let head = candle_nn::Linear::new(
            vb.pp("proj").get_with_hints(
                (cfg.out_dim, c.embed_dim),
                "weight",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            Some(
                vb.pp("proj")
                    .get_with_hints(cfg.out_dim, "bias", candle_nn::Init::Const(0.0))?,
            ),
        );
        Ok(Self {
            convs,
            conv_lifs,
            blocks,
            readout: Readout::new(cfg.readout, cfg.time_steps, vb.clone())?,
            head,
            cfg: cfg.clone(),
            ops,
        })
    }

    /// How this encoder's ops run.
    pub fn op_impl(&self) -> Ops {
        self.ops
    }

    /// The first conv's output repeated over T, `[T, B, C, H, W]`: the input is the same at every
    /// step, so the conv runs once, and BatchNorm sees the same statistics as over T copies.
    fn first_conv(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.over_time(&self.convs[0].forward(x, train)?)
    }

    /// `y` repeated over the T time steps, `[T, ...]`.
    fn over_time(&self, y: &Tensor) -> Result<Tensor> {
        let mut dims = vec![self.cfg.time_steps];
        dims.extend_from_slice(y.dims());
        layout::contiguous(&y.unsqueeze(0)?.broadcast_as(dims)?)
    }

    /// The tokenizer's LIF layers, each named, with its spikes `[T, B, C, H, W]` (eval mode).
    pub fn tokenizer_spikes(&self, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let mut y = self.first_conv(x, false)?.detach();
        let mut layers = Vec::new();
        for i in 1..self.convs.len() {
            let lif = &self.conv_lifs[i - 1];
            layers.push((lif.name.clone(), self.ops.lif(&lif.lif, &y)?.detach()));
            y = self.tokenizer_stage(i, &y, false)?.detach();
        }
        Ok(layers)
    }

    /// Tokenizer stage `i` (from 1): the spikes of LIF `i - 1` on `y` `[T, B, C, H, W]`
    /// through conv `i`, pooled where the tokenizer pools, `[T, B, C', H', W']`. All time
    /// steps at once, `[T * B, ...]`, as SpikingJelly's `SeqToANNContainer`.
    fn tokenizer_stage(&self, i: usize, y: &Tensor, train: bool) -> Result<Tensor> {
        let (conv, lif) = (&self.convs[i], &self.conv_lifs[i - 1].lif);
        let z = if POOLED.contains(&i) {
            conv.forward_lif_pooled(lif, y, train)?
        } else {
            conv.forward_lif(lif, y, train)?
        };
        let mut dims = y.dims()[..2].to_vec();
        dims.extend_from_slice(&z.dims()[1..]);
        z.reshape(dims)
    }

    /// Spike tokens `[T, B, N, C]` of images `[B, 3, H, W]`.
    fn tokens(&self, x: &Tensor, pass: Pass<SparseWeights>) -> Result<Tensor> {
        let train = match pass {
            Pass::Dense { train } => train,
            Pass::Sparse(w) => return self.sparse_tokens(x, w),
        };
        let mut y = pass.cut(self.first_conv(x, train)?);
        for i in 1..self.convs.len() {
            y = pass.cut(self.tokenizer_stage(i, &y, train)?);
        }
        // [T, B, C, H, W] -> [T, B, N, C]
        layout::contiguous(&y.flatten_from(3)?.transpose(2, 3)?)
    }

    /// [`Self::tokens`] spike-driven, channels-last throughout: the spike-fed convs read and
    /// write `[T * B, H, W, C]`, so the feature maps are never transposed and the tokens come
    /// out as a reshape.
    fn sparse_tokens(&self, x: &Tensor, w: &SparseWeights) -> Result<Tensor> {
        let (t, b) = (self.cfg.time_steps, x.dim(0)?);
        // The first conv's output is the input of every step: its LIF reads it held over the
        // steps, never copied T times.
        let first = layout::contiguous(&self.convs[0].forward(x, false)?.permute((0, 2, 3, 1))?)?;
        let mut bits = self.conv_lifs[0].lif.forward_bits_held(&first, t)?; // [T, B, H, W, C]
        for (i, conv) in self.convs.iter().enumerate().skip(1) {
            let flat = [t * b].iter().chain(&bits.shape()[2..]).copied().collect();
            let z = conv.forward_spikes(&w.convs[i - 1], &bits.reshaped(flat)?)?;
            let z = if POOLED.contains(&i) {
                max_pool_3x3_s2_channels_last(&z)?
            } else {
                z
            };
            let (_, h, wd, c) = z.dims4()?;
            match self.conv_lifs.get(i) {
                Some(lif) => bits = lif.lif.forward_bits(&z.reshape((t, b, h, wd, c))?)?,
                None => return z.reshape((t, b, h * wd, c)),
            }
        }
        candle_core::bail!("the image encoder has no spike-fed convolution")
    }

    /// Image features `[B, out_dim]` of CLIP-normalised images `[B, 3, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, Pass::Dense { train })
    }

    /// The spike-fed layers with the current eval-mode BatchNorm folded in.
    pub fn sparse_weights(&self) -> Result<SparseWeights> {
        Ok(SparseWeights {
            convs: self.convs[1..]
                .iter()
                .map(ConvBn::folded)
                .collect::<Result<_>>()?,
            blocks: self
                .blocks
                .iter()
                .map(|b| {
                    Ok(FoldedBlock {
                        attn: b.attn.folded()?,
                        mlp: b.mlp.folded()?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Eval-mode image features computed spike-driven: the same spikes as [`Self::forward`]
    /// with `train = false`, features equal up to float summation order, with work that
    /// scales with the firing rate. `weights` must come from this encoder's
    /// [`Self::sparse_weights`].
    pub fn forward_sparse(&self, x: &Tensor, weights: &SparseWeights) -> Result<Tensor> {
        if weights.convs.len() + 1 != self.convs.len() || weights.blocks.len() != self.blocks.len()
        {
            candle_core::bail!("forward_sparse: the weights were folded from another encoder")
        }
        self.run(x, Pass::Sparse(weights))
    }

    fn run(&self, x: &Tensor, pass: Pass<SparseWeights>) -> Result<Tensor> {
        let mut x = self.tokens(x, pass)?;
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.run(&x, None, pass.map(|w| &w.blocks[i]))?;
        }
        let pooled = x.mean(2)?; // [T, B, C]
        self.head.forward(&self.readout.forward(&pooled)?)
    }

    /// Every LIF layer, in forward order.
    pub fn lif_layers(&self) -> Vec<&NamedLif> {
        let mut all: Vec<&NamedLif> = self.conv_lifs.iter().collect();
        for b in &self.blocks {
            all.extend(b.lifs());
        }
        all
    }

    /// The layer table for one `side x side` image.
    pub fn layers(&self, side: usize) -> Vec<Layer> {
        let (t, d) = (self.cfg.time_steps, self.cfg.image.embed_dim);
        let mut s = side;
        let mut rows = Vec::new();
        for (i, conv) in self.convs.iter().enumerate() {
            let kind = if POOLED.contains(&i) {
                s /= 2;
                "conv3x3 + BN + max-pool"
            } else {
                "conv3x3 + BN"
            };
            rows.push(Layer::new(
                format!("patch_embed.block{i}"),
                kind,
                vec![t, conv.out_channels(), s, s],
                conv.params(),
            ));
        }
        for b in &self.blocks {
            rows.extend(b.layers(t, s * s));
        }
        rows.push(self.readout.layer(d));
        rows.push(Layer::new(
            "proj",
            "linear",
            vec![self.cfg.out_dim],
            linear_params(&self.head),
        ));
        rows
    }

    /// The encoder's compute for energy accounting (32x32 inputs): SNN ops and the ANN twin's.
    pub fn ops(&self, side: usize) -> (Vec<Op>, Vec<Op>) {
        let c = &self.cfg.image;
        let widths = tokenizer_widths(c.in_channels, c.embed_dim);
        let mut snn = Vec::new();
        let mut s = side;
        for i in 0..5 {
            let input = if i == 0 {
                OpInput::Real
            } else {
                OpInput::Spikes(format!("patch_embed.lif{i}"))
            };
            snn.push(Op::conv2d(
                format!("patch_embed.block{i}_conv"),
                (widths[i], widths[i + 1], 3),
                (s, s),
                input,
            ));
            if POOLED.contains(&i) {
                s /= 2;
            }
        }
        let n = s * s;
        let mut ann = snn.iter().map(Op::as_ann).collect::<Vec<_>>();
        for b in &self.blocks {
            let (bs, ba) = b.ops(n);
            snn.extend(bs);
            ann.extend(ba);
        }
        let head = Op::linear("proj", 1, (c.embed_dim, self.cfg.out_dim), OpInput::Real);
        ann.push(head.clone());
        snn.push(head);
        (snn, ann)
    }
}
