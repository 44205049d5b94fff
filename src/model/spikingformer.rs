//! The image encoder: a Spikingformer. A spiking convolutional tokenizer turns the image,
//! repeated over T steps (direct encoding), into 8x8 tokens; blocks of spiking self-attention
//! and spiking MLP refine them with residuals on the real-valued stream; a TDW readout and a
//! linear head map the mean token into CLIP's space.
//!
//! Tokens are kept channels-last, `[T, B, N, C]`, inside the blocks: every 1x1 convolution is
//! then a plain matrix product over rows.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::SpikeClipConfig;
use super::layers::{max_pool_3x3_s2, over_time, ConvBn, LinearBn};
use super::readout::Readout;
use crate::energy::{Op, OpInput};
use crate::neuron::{LifConfig, MultiStepLif};

/// A LIF layer with its name, for monitors and energy accounting.
#[derive(Debug, Clone)]
pub struct NamedLif {
    pub name: String,
    pub lif: MultiStepLif,
}

impl NamedLif {
    fn new(name: impl Into<String>, cfg: LifConfig) -> Self {
        Self {
            name: name.into(),
            lif: MultiStepLif::new(cfg),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lif.forward(x)
    }
}

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
}

impl SpikingSelfAttention {
    fn new(vb: &VarBuilder, prefix: &str, dim: usize, heads: usize) -> Result<Self> {
        let qkv = |n: &str| {
            LinearBn::new(
                vb,
                (dim, dim),
                false,
                (&format!("{n}_conv"), &format!("{n}_bn")),
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
            proj: LinearBn::new(vb, (dim, dim), true, ("proj_conv", "proj_bn"))?,
            heads,
        })
    }

    /// `[T, B, N, C]` to `[T, B, N, C]`.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (t, b, n, c) = x.dims4()?;
        let (h, d) = (self.heads, c / self.heads);
        let s = self.input.forward(x)?;
        // [T, B, N, C] -> [T * B * H, N, d]: candle's CPU matmul wants 3-D contiguous inputs.
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((t, b, n, h, d))?
                .transpose(2, 3)?
                .contiguous()?
                .reshape((t * b * h, n, d))
        };
        let q = split(self.q_lif.forward(&self.q.forward(&s, train)?)?)?;
        let k = split(self.k_lif.forward(&self.k.forward(&s, train)?)?)?;
        let v = split(self.v_lif.forward(&self.v.forward(&s, train)?)?)?;
        let attn = q.matmul(&k.t()?.contiguous()?)?;
        let y = (attn.matmul(&v)? * 0.125)?
            .reshape((t, b, h, n, d))?
            .transpose(2, 3)?
            .contiguous()?
            .reshape((t, b, n, c))?;
        self.proj.forward(&self.attn_lif.forward(&y)?, train)
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

/// Spiking MLP: LIF, 1x1 conv to `ratio * C` with BN, LIF, 1x1 conv back with BN.
#[derive(Debug, Clone)]
struct SpikingMlp {
    lif1: NamedLif,
    fc1: LinearBn,
    lif2: NamedLif,
    fc2: LinearBn,
}

impl SpikingMlp {
    fn new(vb: &VarBuilder, prefix: &str, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            lif1: NamedLif::new(format!("{prefix}.lif1"), LifConfig::default()),
            fc1: LinearBn::new(vb, (dim, hidden), true, ("mlp1_conv", "mlp1_bn"))?,
            lif2: NamedLif::new(format!("{prefix}.lif2"), LifConfig::default()),
            fc2: LinearBn::new(vb, (hidden, dim), true, ("mlp2_conv", "mlp2_bn"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.fc1.forward(&self.lif1.forward(x)?, train)?;
        self.fc2.forward(&self.lif2.forward(&h)?, train)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn: SpikingSelfAttention,
    mlp: SpikingMlp,
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
}

/// Channels of the tokenizer convs for embedding width `d`: 3 -> d/8 -> d/4 -> d/2 -> d -> d.
pub fn tokenizer_widths(in_channels: usize, d: usize) -> [usize; 6] {
    [in_channels, d / 8, d / 4, d / 2, d, d]
}

/// The five 3x3 conv + BN stages of the tokenizer, at the authors' names
/// (`patch_embed.block{i}_conv`, `patch_embed.block{i}_bn`); shared with the ANN twin.
pub fn tokenizer_convs(vb: &VarBuilder, cfg: &SpikeClipConfig) -> Result<Vec<ConvBn>> {
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
            )
        })
        .collect()
}

/// The tokenizer convs after which the feature map is max-pooled (halved).
const POOLED: [usize; 2] = [2, 3];

impl ImageEncoder {
    pub fn new(vb: VarBuilder, cfg: &SpikeClipConfig) -> Result<Self> {
        let c = &cfg.image;
        if !c.embed_dim.is_multiple_of(8) || !c.embed_dim.is_multiple_of(c.num_heads) {
            candle_core::bail!(
                "image encoder: embed_dim {} must divide by 8 and by num_heads {}",
                c.embed_dim,
                c.num_heads
            )
        }
        let convs = tokenizer_convs(&vb, cfg)?;
        let conv_lifs = (0..4)
            .map(|i| NamedLif::new(format!("patch_embed.lif{}", i + 1), LifConfig::default()))
            .collect();
        let blocks = (0..c.depth)
            .map(|i| {
                let bv = vb.pp(format!("block.{i}"));
                Ok(Block {
                    attn: SpikingSelfAttention::new(
                        &bv.pp("attn"),
                        &format!("block.{i}.attn"),
                        c.embed_dim,
                        c.num_heads,
                    )?,
                    mlp: SpikingMlp::new(
                        &bv.pp("mlp"),
                        &format!("block.{i}.mlp"),
                        c.embed_dim,
                        c.embed_dim * c.mlp_ratio,
                    )?,
                })
            })
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
        })
    }

    /// The first conv's output repeated over T, `[T, B, C, H, W]`: the input is the same at every
    /// step, so the conv runs once, and BatchNorm sees the same statistics as over T copies.
    fn first_conv(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let first = self.convs[0].forward(x, train)?;
        let (b, c, h, w) = first.dims4()?;
        first
            .unsqueeze(0)?
            .broadcast_as((self.cfg.time_steps, b, c, h, w))?
            .contiguous()
    }

    /// The first LIF layer's name and spikes `[T, B, C, H, W]` (eval mode).
    pub fn first_layer_spikes(&self, x: &Tensor) -> Result<(String, Tensor)> {
        let lif = &self.conv_lifs[0];
        Ok((lif.name.clone(), lif.forward(&self.first_conv(x, false)?)?))
    }

    /// Spike tokens `[T, B, N, C]` of images `[B, 3, H, W]`.
    fn tokens(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = self.first_conv(x, train)?;
        for (i, conv) in self.convs.iter().enumerate().skip(1) {
            let spikes = self.conv_lifs[i - 1].forward(&y)?;
            y = over_time(&spikes, |s| {
                let z = conv.forward(s, train)?;
                if POOLED.contains(&i) {
                    max_pool_3x3_s2(&z)
                } else {
                    Ok(z)
                }
            })?;
        }
        // [T, B, C, H, W] -> [T, B, N, C]
        y.flatten_from(3)?.transpose(2, 3)?.contiguous()
    }

    /// Image features `[B, out_dim]` of CLIP-normalised images `[B, 3, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.tokens(x, train)?;
        for b in &self.blocks {
            x = (&x + b.attn.forward(&x, train)?)?;
            x = (&x + b.mlp.forward(&x, train)?)?;
        }
        let pooled = x.mean(2)?; // [T, B, C]
        self.head.forward(&self.readout.forward(&pooled)?)
    }

    /// Every LIF layer, in forward order.
    pub fn lif_layers(&self) -> Vec<&NamedLif> {
        let mut all: Vec<&NamedLif> = self.conv_lifs.iter().collect();
        for b in &self.blocks {
            all.extend(b.attn.lifs());
            all.push(&b.mlp.lif1);
            all.push(&b.mlp.lif2);
        }
        all
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
        let (n, d, h) = (s * s, c.embed_dim, c.num_heads);
        let mut ann = snn.iter().map(Op::as_ann).collect::<Vec<_>>();
        for i in 0..c.depth {
            let p = format!("block.{i}");
            let spikes = |l: &str| OpInput::Spikes(format!("{p}.{l}"));
            let mut block = vec![
                Op::linear(format!("{p}.attn.q_conv"), n, (d, d), spikes("attn.in_lif")),
                Op::linear(format!("{p}.attn.k_conv"), n, (d, d), spikes("attn.in_lif")),
                Op::linear(format!("{p}.attn.v_conv"), n, (d, d), spikes("attn.in_lif")),
            ];
            let attn_names = (
                format!("{p}.attn.q_lif"),
                format!("{p}.attn.k_lif"),
                format!("{p}.attn.v_lif"),
            );
            let product = Op::spike_attention(
                format!("{p}.attn.qkv"),
                h,
                n,
                d / h,
                (&attn_names.0, &attn_names.1, &attn_names.2),
            );
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
                    (d, d * c.mlp_ratio),
                    spikes("mlp.lif1"),
                ),
                Op::linear(
                    format!("{p}.mlp.mlp2_conv"),
                    n,
                    (d * c.mlp_ratio, d),
                    spikes("mlp.lif2"),
                ),
            ];
            ann.extend(block.iter().map(Op::as_ann));
            ann.push(Op::softmax_attention(
                format!("{p}.attn.softmax_qkv"),
                h,
                n,
                d / h,
            ));
            ann.extend(tail.iter().map(Op::as_ann));
            block.push(product);
            block.extend(tail);
            snn.extend(block);
        }
        let head = Op::linear("proj", 1, (d, self.cfg.out_dim), OpInput::Real);
        ann.push(head.clone());
        snn.push(head);
        (snn, ann)
    }
}
