//! Encoder configurations with named presets, so that the paper's model and the small model of
//! the built-in world are described by data (serde) rather than by code, and their parameter
//! budgets can be checked before anything is instantiated.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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

/// Spiking MLP text encoder over a fixed-length token window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub context_length: usize,
    /// Rows of the position table; CLIP has 77, of which only `context_length` are used.
    pub max_positions: usize,
    pub width: usize,
    pub hidden: usize,
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
                    vocab_size: 49408,
                    context_length: 20,
                    max_positions: 77,
                    width: 512,
                    hidden: 2048,
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
                    vocab_size: 1024,
                    context_length: 20,
                    max_positions: 20,
                    width: 64,
                    hidden: 256,
                },
            },
            other => bail!("unknown preset {other:?} (known: paper, tiny)"),
        })
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
        let hidden = d * c.mlp_ratio;
        let attn = 3 * (d * d + bn(d)) + (d * d + d + bn(d));
        let mlp = (d * hidden + hidden + bn(hidden)) + (hidden * d + d + bn(d));
        let head = d * self.out_dim + self.out_dim;
        tokenizer + c.depth * (attn + mlp) + self.readout.params(self.time_steps) + head
    }

    /// Trainable parameters of the spiking MLP text encoder, embeddings included.
    pub fn text_param_count(&self) -> usize {
        let c = &self.text;
        let flat = c.context_length * c.width;
        let embeddings = c.vocab_size * c.width + c.max_positions * c.width;
        let fc1 = flat * c.hidden + c.hidden;
        let fc2 = c.hidden * self.out_dim + self.out_dim;
        embeddings + fc1 + fc2 + self.readout.params(self.time_steps)
    }
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
    fn unknown_preset_is_an_error_naming_it() {
        let err = SpikeClipConfig::preset("huge").unwrap_err().to_string();
        assert!(err.contains("huge"), "{err}");
    }
}
