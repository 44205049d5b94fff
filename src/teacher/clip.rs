//! OpenAI CLIP in candle, sized by Hugging Face's `config.json` so ViT-B/16, B/32 and L/14 all
//! load (candle-transformers' CLIP has presets only). Inference only: the teacher is frozen.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{
    conv2d_no_bias, embedding, layer_norm, linear, linear_no_bias, Conv2dConfig, Embedding,
    LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;

use super::tokenizer::ClipTokenizer;
use super::{ImageTeacher, TextTeacher, Tokenize};

/// `config.json` of a transformers `CLIPModel`; absent fields take transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

fn default_projection() -> usize {
    512
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a CLIP config.json", path.display()))
    }

    /// ViT-B/16, the paper's teacher (for benchmarks with random weights).
    pub fn vit_b16() -> Self {
        let vision_config = VisionConfig {
            patch_size: 16,
            ..Default::default()
        };
        Self {
            text_config: TextConfig::default(),
            vision_config,
            projection_dim: 512,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
        }
    }
}

/// Sizes one transformer tower needs; text and vision towers share the layer code.
#[derive(Debug, Clone, Copy)]
struct TowerShape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    act: Activation,
    eps: f64,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, s: &TowerShape) -> Result<Self> {
        let l = |n: &str| linear(s.hidden, s.hidden, vb.pp(n));
        Ok(Self {
            q: l("q_proj")?,
            k: l("k_proj")?,
            v: l("v_proj")?,
            out: l("out_proj")?,
            heads: s.heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(x)? * (d as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            scores = scores.broadcast_add(m)?;
        }
        let attn = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
        self.out.forward(&y)
    }
}

struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn new(vb: VarBuilder, s: &TowerShape) -> Result<Self> {
        Ok(Self {
            ln1: layer_norm(s.hidden, s.eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), s)?,
            ln2: layer_norm(s.hidden, s.eps, vb.pp("layer_norm2"))?,
            fc1: linear(s.hidden, s.intermediate, vb.pp("mlp.fc1"))?,
            fc2: linear(s.intermediate, s.hidden, vb.pp("mlp.fc2"))?,
            act: s.act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let m = self
            .fc2
            .forward(&self.act.apply(&self.fc1.forward(&self.ln2.forward(&x)?)?)?)?;
        x + m
    }
}

struct Encoder(Vec<Layer>);

impl Encoder {
    fn new(vb: VarBuilder, s: &TowerShape) -> Result<Self> {
        let layers = (0..s.layers)
            .map(|i| Layer::new(vb.pp(format!("layers.{i}")), s))
            .collect::<Result<_>>()?;
        Ok(Self(layers))
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.0
            .iter()
            .try_fold(x.clone(), |x, l| l.forward(&x, mask))
    }
}

/// The causal text tower, pooled at the first end-of-text token.
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_ln: LayerNorm,
}

impl ClipTextTransformer {
    pub fn new(vb: VarBuilder, c: &TextConfig) -> Result<Self> {
        let shape = TowerShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: emb.get(
                (c.max_position_embeddings, c.hidden_size),
                "position_embedding.weight",
            )?,
            encoder: Encoder::new(vb.pp("encoder"), &shape)?,
            final_ln: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?,
        })
    }

    /// Pooled `[B, hidden]` at the first `end_id` of each row of `ids` `[B, L]` u32.
    pub fn forward(&self, ids: &Tensor, end_id: u32) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let max = self.position_embedding.dim(0)?;
        if n > max {
            bail!("{n} tokens, the text tower takes at most {max}");
        }
        let x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.i(..n)?)?;
        let causal: Vec<f32> = (0..n * n)
            .map(|i| if i % n > i / n { f32::NEG_INFINITY } else { 0. })
            .collect();
        let mask = Tensor::from_vec(causal, (n, n), ids.device())?.to_dtype(x.dtype())?;
        let h = self
            .final_ln
            .forward(&self.encoder.forward(&x, Some(&mask))?)?;
        let rows = ids.to_vec2::<u32>()?;
        let ends: Vec<u32> = rows
            .iter()
            .map(|r| r.iter().position(|&t| t == end_id).unwrap_or(n - 1) as u32)
            .collect();
        let flat_index = Tensor::from_vec(
            ends.iter()
                .enumerate()
                .map(|(i, &e)| i as u32 * n as u32 + e)
                .collect::<Vec<_>>(),
            b,
            ids.device(),
        )?;
        Ok(h.reshape((b * n, ()))?.index_select(&flat_index, 0)?)
    }
}

/// The ViT image tower, pooled at the class token.
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: candle_nn::Conv2d,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    encoder: Encoder,
    post_ln: LayerNorm,
    image_size: usize,
}

impl ClipVisionTransformer {
    pub fn new(vb: VarBuilder, c: &VisionConfig) -> Result<Self> {
        let shape = TowerShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let emb = vb.pp("embeddings");
        let patches = (c.image_size / c.patch_size).pow(2);
        let conv = Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        Ok(Self {
            class_embedding: emb.get(c.hidden_size, "class_embedding")?,
            patch_embedding: conv2d_no_bias(
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                conv,
                emb.pp("patch_embedding"),
            )?,
            position_embedding: emb
                .get((patches + 1, c.hidden_size), "position_embedding.weight")?,
            // The misspelling is transformers' own key.
            pre_ln: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            encoder: Encoder::new(vb.pp("encoder"), &shape)?,
            post_ln: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            image_size: c.image_size,
        })
    }

    /// Pooled `[B, hidden]` from CLIP-normalised pixels `[B, 3, S, S]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, hgt, wid) = pixels.dims4()?;
        if hgt != self.image_size || wid != self.image_size {
            bail!(
                "image {hgt}x{wid}, the vision tower takes {0}x{0}",
                self.image_size
            );
        }
        let patches = self
            .patch_embedding
            .forward(pixels)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let hidden = self.class_embedding.dim(0)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let h = self.encoder.forward(&self.pre_ln.forward(&x)?, None)?;
        Ok(self.post_ln.forward(&h.i((.., 0))?)?)
    }
}

/// Both towers and their projections into the shared embedding space.
pub struct ClipModel {
    pub text: ClipTextTransformer,
    pub vision: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    pub config: ClipConfig,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        Ok(Self {
            text: ClipTextTransformer::new(vb.pp("text_model"), &c.text_config)?,
            vision: ClipVisionTransformer::new(vb.pp("vision_model"), &c.vision_config)?,
            text_projection: linear_no_bias(
                c.text_config.hidden_size,
                c.projection_dim,
                vb.pp("text_projection"),
            )?,
            visual_projection: linear_no_bias(
                c.vision_config.hidden_size,
                c.projection_dim,
                vb.pp("visual_projection"),
            )?,
            config: c.clone(),
        })
    }

    /// `config.json` plus `model.safetensors` (or `pytorch_model.bin`) from a directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let st = dir.join("model.safetensors");
        let bin = dir.join("pytorch_model.bin");
        let (vb, file) = if st.exists() {
            // SAFETY: the checkpoint is read-only input and is not modified while mapped.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&st], DType::F32, device) }
                .with_context(|| format!("{}: not a safetensors file", st.display()))?;
            (vb, st)
        } else if bin.exists() {
            let vb = VarBuilder::from_pth(&bin, DType::F32, device)
                .with_context(|| format!("{}: not a PyTorch checkpoint", bin.display()))?;
            (vb, bin)
        } else {
            bail!(
                "{}: no model.safetensors nor pytorch_model.bin",
                dir.display()
            );
        };
        Self::new(vb, &config).with_context(|| {
            format!(
                "{}: weights do not fit {}",
                file.display(),
                dir.join("config.json").display()
            )
        })
    }

    /// As transformers' `get_text_features`: projected, not normalised.
    pub fn text_features(&self, ids: &Tensor, end_id: u32) -> Result<Tensor> {
        Ok(self
            .text_projection
            .forward(&self.text.forward(ids, end_id)?)?)
    }

    /// As transformers' `get_image_features`: projected, not normalised.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self
            .visual_projection
            .forward(&self.vision.forward(pixels)?)?)
    }

    /// `[vocab, hidden]`: to initialise a student's token embedding from CLIP's.
    pub fn token_embedding(&self) -> &Tensor {
        self.text.token_embedding.embeddings()
    }

    /// `[context, hidden]`: to initialise a student's position embedding from CLIP's.
    pub fn position_embedding(&self) -> &Tensor {
        &self.text.position_embedding
    }
}

/// A CLIP checkpoint directory as a teacher: model plus its tokenizer.
pub struct ClipTeacher {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
}

impl ClipTeacher {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self {
            model: ClipModel::load(dir, device)?,
            tokenizer: ClipTokenizer::from_dir(dir)?,
        })
    }

    /// Ids `[N, context]` u32 as CLIP's text tower reads them.
    pub fn token_ids(&self, texts: &[String]) -> Result<Tensor> {
        let context = self.model.config.text_config.max_position_embeddings;
        let rows = self.tokenizer.encode(texts, context)?;
        let device = self.model.token_embedding().device();
        Ok(Tensor::from_vec(
            rows.concat(),
            (texts.len(), context),
            device,
        )?)
    }
}

impl TextTeacher for ClipTeacher {
    fn embed_dim(&self) -> usize {
        self.model.config.projection_dim
    }

    fn text_features(&self, texts: &[String]) -> Result<Tensor> {
        Ok(self
            .model
            .text_features(&self.token_ids(texts)?, self.tokenizer.end_id())?
            .to_device(&Device::Cpu)?)
    }
}

impl ImageTeacher for ClipTeacher {
    fn image_size(&self) -> usize {
        self.model.config.vision_config.image_size
    }

    fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let device = self.model.token_embedding().device();
        Ok(self
            .model
            .image_features(&pixels.to_device(device)?)?
            .to_device(&Device::Cpu)?)
    }
}
