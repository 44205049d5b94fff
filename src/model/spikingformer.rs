//! The image encoder: a Spikingformer. A spiking convolutional tokenizer turns the image,
//! repeated over T steps (direct encoding), into 8x8 tokens; the [`Block`]s of spiking
//! self-attention and spiking MLP refine them; a TDW readout and a linear head map the mean
//! token into CLIP's space.
//!
//! Tokens are kept channels-last, `[T, B, N, C]`, inside the blocks: every 1x1 convolution is
//! then a plain matrix product over rows.
//!
//! Inference can also run spike-driven ([`ImageEncoder::forward_sparse`]): every layer fed by a
//! LIF reads bit-packed spikes through the accumulate-only kernels of
//! [`crate::kernels::spikes`] with its BatchNorm folded in, and `q . k^T . v` is a popcount.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::block::{Block, FoldedBlock, NamedLif, Pass};
use super::config::SpikeClipConfig;
use super::layers::{max_pool_3x3_s2_channels_last, ConvBn};
use super::readout::Readout;
use super::summary::{linear_params, Layer};
use crate::energy::{Op, OpInput};
use crate::kernels::layout;
use crate::kernels::spikes::SpikeLayer;
use crate::neuron::LifConfig;
use crate::ops::Ops;

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
            let (folded, spikes) = (&w.convs[i - 1], bits.reshaped(flat)?);
            let lif = self.conv_lifs.get(i).map(|l| &l.lif);
            // Unpooled into a LIF, the conv's output goes straight to spikes.
            if let (Some(lif), false) = (lif, POOLED.contains(&i)) {
                bits = conv.forward_spikes_fired(folded, &spikes, t, lif)?;
                continue;
            }
            let z = conv.forward_spikes(folded, &spikes)?;
            let z = if POOLED.contains(&i) {
                max_pool_3x3_s2_channels_last(&z)?
            } else {
                z
            };
            let (_, h, wd, c) = z.dims4()?;
            match lif {
                Some(lif) => bits = lif.forward_bits(&z.reshape((t, b, h, wd, c))?)?,
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
                .map(Block::folded)
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
