//! Encoder configurations with named presets, so that the paper's model and the small model of
//! the built-in world are described by data (serde) rather than by code, and their parameter
//! budgets can be checked before anything is instantiated.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the T time steps of the last layer are combined into one feature vector (paper's ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadoutKind {
    /// Learnable time-dependent weights, one per step.
    Tdw,
    /// Plain mean over T.
    Mean,
    /// Fixed weights in arithmetic progression.
    Ad,
    /// Fixed weights in geometric progression.
    Ar,
}

impl ReadoutKind {
    /// Only TDW's weights are trained; the fixed schemes add no parameters.
    fn params(self, time_steps: usize) -> usize {
        match self {
            ReadoutKind::Tdw => time_steps,
            _ => 0,
        }
    }
}

/// Spikingformer image encoder: conv tokenizer, `depth` spiking self-attention blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEncoderConfig {
    pub in_channels: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub mlp_ratio: usize,
    pub depth: usize,
}

/// Which text tower: the paper's spiking MLP, or the spiking transformer it is compared with
/// (Table 5's architecture ablation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextEncoderKind {
    #[default]
    Mlp,
    Transformer,
}

/// Text encoder over a fixed-length token window. `hidden` sizes the MLP; `depth`, `num_heads`
/// and `mlp_ratio` the transformer. Cards written before the transformer existed lack `kind` and
/// its sizes, hence the serde defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextEncoderConfig {
    #[serde(default)]
    pub kind: TextEncoderKind,
    pub vocab_size: usize,
    pub context_length: usize,
    /// Rows of the position table; CLIP has 77, of which only `context_length` are used.
    pub max_positions: usize,
    pub width: usize,
    pub hidden: usize,
    #[serde(default = "default_text_depth")]
    pub depth: usize,
    #[serde(default = "default_text_heads")]
    pub num_heads: usize,
    #[serde(default = "default_text_mlp_ratio")]
    pub mlp_ratio: usize,
}

fn default_text_depth() -> usize {
    2
}
fn default_text_heads() -> usize {
    4
}
fn default_text_mlp_ratio() -> usize {
    4
}

/// Both towers plus what they share: time steps, output dimension and readout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpikeClipConfig {
    pub time_steps: usize,
    pub out_dim: usize,
    pub readout: ReadoutKind,
    pub image: ImageEncoderConfig,
    pub text: TextEncoderConfig,
}

impl SpikeClipConfig {
    /// `paper`: the "4-384" model of the paper with CLIP's vocabulary. `tiny`: T 4, width 64,
    /// one block, small vocabulary, trainable in minutes on two cores for the built-in world.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "paper" => SpikeClipConfig {
                time_steps: 4,
                out_dim: 512,
                readout: ReadoutKind::Tdw,
                image: ImageEncoderConfig {
                    in_channels: 3,
                    embed_dim: 384,
                    num_heads: 8,
                    mlp_ratio: 4,
                    depth: 4,
                },
                text: TextEncoderConfig {
                    kind: TextEncoderKind::Mlp,
                    vocab_size: 49408,
                    context_length: 20,
                    max_positions: 77,
                    width: 512,
                    hidden: 2048,
                    depth: 4,
                    num_heads: 8,
                    mlp_ratio: 4,
                },
            },
            "tiny" => SpikeClipConfig {
                time_steps: 4,
                out_dim: 512,
                readout: ReadoutKind::Tdw,
                image: ImageEncoderConfig {
                    in_channels: 3,
                    embed_dim: 64,
                    num_heads: 4,
                    mlp_ratio: 4,
                    depth: 1,
                },
                text: TextEncoderConfig {
                    kind: TextEncoderKind::Mlp,
                    vocab_size: 1024,
                    context_length: 20,
                    max_positions: 20,
                    width: 64,
                    hidden: 256,
                    depth: 1,
                    num_heads: 4,
                    mlp_ratio: 4,
                },
            },
            other => bail!("unknown preset {other:?} (known: paper, tiny)"),
        })
    }

    /// This configuration with `KEY=VALUE` overrides applied to its JSON form, in order: KEY is
    /// a dotted path (`image.depth`, `text.kind`, `readout`), VALUE is parsed as JSON and taken
    /// as a string when it is not JSON (`readout=mean`).
    pub fn with_overrides(&self, sets: &[String]) -> Result<Self> {
        with_overrides(self, sets)
    }

    /// Trainable parameters of the image encoder (BN affine included, running statistics not).
    pub fn image_param_count(&self) -> usize {
        let c = &self.image;
        let d = c.embed_dim;
        let bn = |ch: usize| 2 * ch;
        let conv3 = |i: usize, o: usize| i * o * 9 + bn(o);
        // Tokenizer widths: d/8, d/4, d/2, d, d.
        let widths = [c.in_channels, d / 8, d / 4, d / 2, d, d];
        let tokenizer: usize = widths.windows(2).map(|w| conv3(w[0], w[1])).sum();
        let head = d * self.out_dim + self.out_dim;
        tokenizer
            + c.depth * spiking_block_params(d, c.mlp_ratio)
            + self.readout.params(self.time_steps)
            + head
    }

    /// Trainable parameters of the text encoder of either kind, embeddings included.
    pub fn text_param_count(&self) -> usize {
        let c = &self.text;
        let embeddings = c.vocab_size * c.width + c.max_positions * c.width;
        let body = match c.kind {
            TextEncoderKind::Mlp => {
                let fc1 = c.context_length * c.width * c.hidden + c.hidden;
                fc1 + c.hidden * self.out_dim + self.out_dim
            }
            TextEncoderKind::Transformer => {
                c.depth * spiking_block_params(c.width, c.mlp_ratio)
                    + c.width * self.out_dim
                    + self.out_dim
            }
        };
        embeddings + body + self.readout.params(self.time_steps)
    }
}

/// `value` with `KEY=VALUE` overrides applied to its JSON form, in order (see
/// [`SpikeClipConfig::with_overrides`]); any serde configuration takes them the same way.
pub fn with_overrides<T: Serialize + serde::de::DeserializeOwned>(
    value: &T,
    sets: &[String],
) -> Result<T> {
    let mut json = serde_json::to_value(value)?;
    for set in sets {
        let (key, raw) = set
            .split_once('=')
            .with_context(|| format!("override {set:?}: expected KEY=VALUE"))?;
        let parsed = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        let Some(slot) = key
            .split('.')
            .try_fold(&mut json, |node, part| node.get_mut(part))
        else {
            let mut known = Vec::new();
            leaf_paths(&serde_json::to_value(value)?, "", &mut known);
            bail!(
                "override {set:?}: unknown key {key:?} (known: {})",
                known.join(", ")
            );
        };
        let old = std::mem::replace(slot, parsed);
        if let Err(e) = serde_json::from_value::<T>(json.clone()) {
            bail!("override {set:?}: {key} takes a value like {old}, not {raw:?} ({e})");
        }
    }
    Ok(serde_json::from_value(json)?)
}

/// The dotted paths of every leaf of `v`, for error messages.
fn leaf_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_paths(child, &path, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

/// One Spikingformer block of width `d`: q, k, v (no bias) and the projection, each with BN,
/// then the two-layer MLP with BN.
fn spiking_block_params(d: usize, mlp_ratio: usize) -> usize {
    let bn = |ch: usize| 2 * ch;
    let hidden = d * mlp_ratio;
    let attn = 3 * (d * d + bn(d)) + (d * d + d + bn(d));
    let mlp = (d * hidden + hidden + bn(hidden)) + (hidden * d + d + bn(d));
    attn + mlp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_parameter_counts_match_the_paper() {
        let cfg = SpikeClipConfig::preset("paper").unwrap();
        assert_eq!(cfg.image_param_count(), 9_513_396);
        assert_eq!(cfg.text_param_count(), 47_358_980);
    }

    #[test]
    fn presets_round_trip_through_json() {
        for name in ["paper", "tiny"] {
            let cfg = SpikeClipConfig::preset(name).unwrap();
            let back: SpikeClipConfig =
                serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
            assert_eq!(back, cfg);
        }
    }

    #[test]
    fn overrides_set_dotted_keys_with_json_or_string_values() {
        let sets = ["image.depth=2", "text.kind=transformer", "readout=mean"].map(String::from);
        let cfg = SpikeClipConfig::preset("tiny")
            .unwrap()
            .with_overrides(&sets)
            .unwrap();
        assert_eq!(cfg.image.depth, 2);
        assert_eq!(cfg.text.kind, TextEncoderKind::Transformer);
        assert_eq!(cfg.readout, ReadoutKind::Mean);
        // Later overrides win.
        let sets = ["image.depth=2", "image.depth=3"].map(String::from);
        let cfg = SpikeClipConfig::preset("tiny")
            .unwrap()
            .with_overrides(&sets);
        assert_eq!(cfg.unwrap().image.depth, 3);
    }

    #[test]
    fn overrides_name_unknown_keys_and_wrong_types() {
        let tiny = SpikeClipConfig::preset("tiny").unwrap();
        let err = |set: &str| format!("{:#}", tiny.with_overrides(&[set.to_string()]).unwrap_err());
        let e = err("image.dept=2");
        assert!(
            e.contains("unknown key \"image.dept\"") && e.contains("image.depth"),
            "{e}"
        );
        let e = err("text.depth.x=2");
        assert!(e.contains("unknown key"), "{e}");
        let e = err("image.depth=two");
        assert!(e.contains("image.depth takes a value like 1"), "{e}");
        let e = err("text.kind=rnn");
        assert!(e.contains("text.kind") && e.contains("mlp"), "{e}");
        let e = err("readout");
        assert!(e.contains("KEY=VALUE"), "{e}");
    }

    #[test]
    fn cards_without_a_text_kind_load_as_the_mlp() {
        let mut json = serde_json::to_value(SpikeClipConfig::preset("tiny").unwrap()).unwrap();
        let text = json["text"].as_object_mut().unwrap();
        for key in ["kind", "depth", "num_heads", "mlp_ratio"] {
            text.remove(key);
        }
        let cfg: SpikeClipConfig = serde_json::from_value(json).unwrap();
        assert_eq!(cfg.text.kind, TextEncoderKind::Mlp);
    }

    #[test]
    fn unknown_preset_is_an_error_naming_it() {
        let err = SpikeClipConfig::preset("huge").unwrap_err().to_string();
        assert!(err.contains("huge"), "{err}");
    }
}
