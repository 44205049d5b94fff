//! OpenAI CLIP in candle, sized by the checkpoint's `config.json` so ViT-B/16, B/32 and L/14
//! all load (candle-transformers' CLIP has presets only). Inference only: it is the frozen teacher.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

/// One tower's sizes, as `text_config`/`vision_config` of config.json.
#[derive(Debug, Clone, Deserialize)]
pub struct TowerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub vocab_size: usize,
    #[serde(default)]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub image_size: usize,
    #[serde(default)]
    pub patch_size: usize,
}

fn default_eps() -> f64 {
    1e-5
}

/// config.json of a Hugging Face CLIPModel.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub text_config: TowerConfig,
    pub vision_config: TowerConfig,
    pub projection_dim: usize,
}

/// Pre-norm transformer layer with CLIP's quick-GELU MLP.
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln1: LayerNorm,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Layer {
    fn new(vb: VarBuilder, c: &TowerConfig) -> candle_core::Result<Self> {
        let (h, a) = (c.hidden_size, vb.pp("self_attn"));
        Ok(Self {
            q: linear(h, h, a.pp("q_proj"))?,
            k: linear(h, h, a.pp("k_proj"))?,
            v: linear(h, h, a.pp("v_proj"))?,
            out: linear(h, h, a.pp("out_proj"))?,
            ln1: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            ln2: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, n, h) = x.dims3()?;
        let hd = h / self.heads;
        let y = self.ln1.forward(x)?;
        let split = |t: Tensor| {
            t.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(self.q.forward(&y)?)? * (hd as f64).powf(-0.5))?;
        let (k, v) = (split(self.k.forward(&y)?)?, split(self.v.forward(&y)?)?);
        let mut att = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.matmul(&v)?;
        let att = att.transpose(1, 2)?.reshape((b, n, h))?;
        let x = (x + self.out.forward(&att)?)?;
        let y = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let y = (&y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?)?;
        x + self.fc2.forward(&y)?
    }
}

fn layers(vb: VarBuilder, c: &TowerConfig) -> candle_core::Result<Vec<Layer>> {
    (0..c.num_hidden_layers)
        .map(|i| Layer::new(vb.pp("encoder.layers").pp(i), c))
        .collect()
}

/// The full CLIP: both towers and their projections into the shared space.
pub struct Clip {
    token_embedding: Tensor,
    text_position: Tensor,
    text_layers: Vec<Layer>,
    final_ln: LayerNorm,
    text_projection: Linear,
    eos_token_id: Option<u32>,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    vision_position: Tensor,
    pre_ln: LayerNorm,
    vision_layers: Vec<Layer>,
    post_ln: LayerNorm,
    visual_projection: Linear,
    patch: usize,
}

impl Clip {
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> candle_core::Result<Self> {
        let (t, v) = (&cfg.text_config, &cfg.vision_config);
        let (tb, vvb) = (vb.pp("text_model"), vb.pp("vision_model"));
        let patches = (v.image_size / v.patch_size).pow(2);
        Ok(Self {
            token_embedding: tb.get(
                (t.vocab_size, t.hidden_size),
                "embeddings.token_embedding.weight",
            )?,
            text_position: tb.get(
                (t.max_position_embeddings, t.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            text_layers: layers(tb.clone(), t)?,
            final_ln: layer_norm(t.hidden_size, t.layer_norm_eps, tb.pp("final_layer_norm"))?,
            text_projection: linear_no_bias(
                t.hidden_size,
                cfg.projection_dim,
                vb.pp("text_projection"),
            )?,
            eos_token_id: t.eos_token_id,
            class_embedding: vvb.get(v.hidden_size, "embeddings.class_embedding")?,
            patch_embedding: vvb.get(
                (v.hidden_size, 3, v.patch_size, v.patch_size),
                "embeddings.patch_embedding.weight",
            )?,
            vision_position: vvb.get(
                (patches + 1, v.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            pre_ln: layer_norm(v.hidden_size, v.layer_norm_eps, vvb.pp("pre_layrnorm"))?,
            vision_layers: layers(vvb.clone(), v)?,
            post_ln: layer_norm(v.hidden_size, v.layer_norm_eps, vvb.pp("post_layernorm"))?,
            visual_projection: linear_no_bias(
                v.hidden_size,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
            patch: v.patch_size,
        })
    }

    /// Reads `config.json` and `model.safetensors` from a checkpoint directory.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: ClipConfig = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("mapping {}", weights.display()))?;
        Self::new(vb, &cfg)
            .with_context(|| format!("loading CLIP weights from {}", weights.display()))
    }

    /// CLIP's token embedding `[vocab, width]`, to initialise the student's text encoder.
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// CLIP's text position embedding `[77, width]`.
    pub fn position_embedding(&self) -> &Tensor {
        &self.text_position
    }

    /// `get_text_features`: pooled at the first end-of-text token (or the largest id, for
    /// legacy configs whose eos id is 2), projected, not normalised.
    pub fn text_features(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let mut x = self
            .token_embedding
            .embedding(&ids.flatten_all()?)?
            .reshape((b, n, ()))?;
        x = x.broadcast_add(&self.text_position.i(..n)?)?;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), ids.device())?;
        for layer in &self.text_layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        let x = self.final_ln.forward(&x)?;
        let rows = ids.to_vec2::<u32>()?;
        let pooled = rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let pos = match self.eos_token_id {
                    Some(eos) if eos != 2 => row.iter().position(|&t| t == eos).unwrap_or(0),
                    _ => (0..n)
                        .max_by_key(|&i| (row[i], std::cmp::Reverse(i)))
                        .unwrap_or(0),
                };
                x.i((r, pos))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.text_projection.forward(&Tensor::stack(&pooled, 0)?)
    }

    /// `get_image_features` of normalised pixels `[B, 3, S, S]`, not normalised.
    pub fn image_features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixels.dim(0)?;
        let x = pixels.conv2d(&self.patch_embedding, 0, self.patch, 1, 1)?;
        let x = x.flatten_from(2)?.transpose(1, 2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, ()))?
            .repeat((b, 1, 1))?;
        let mut x = Tensor::cat(&[cls, x], 1)?.broadcast_add(&self.vision_position)?;
        x = self.pre_ln.forward(&x)?;
        for layer in &self.vision_layers {
            x = layer.forward(&x, None)?;
        }
        let x = self.post_ln.forward(&x.i((.., 0))?)?;
        self.visual_projection.forward(&x)
    }
}

/// CLIP with its tokenizer: the teacher as training and the cache see it.
pub struct ClipTeacher {
    pub clip: Clip,
    pub tokenizer: super::tokenizer::ClipTokenizer,
    pub embed_dim: usize,
    pub device: Device,
}

impl super::TextTeacher for ClipTeacher {
    fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Texts are tokenized at CLIP's context length, 77.
    fn text_features(&self, texts: &[String]) -> anyhow::Result<Tensor> {
        use super::Tokenize;
        let ids = self.tokenizer.encode(texts, 77)?;
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.clip.text_features(&ids)?)
    }
}
