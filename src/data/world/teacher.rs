//! The analytic teacher: a perfect CLIP for the world. Every word has a fixed random direction
//! in a 512-d space; a caption means the weighted sum of its words' directions and an image
//! means the sum of its true attributes' directions plus nuisance from its background and
//! placement. Concept words dominate, so "a photo of a red circle." and an image of a red
//! circle point the same way, including for pairs never drawn in training. Text-only words of
//! the [`lexicon`](super::lexicon) weigh as much as the concept words of their kind; a synonym points close to its
//! word (as "crimson" is close to "red" for CLIP), an extra colour or shape its own way.

use std::collections::BTreeMap;

use anyhow::bail;
use candle_core::{Device, Tensor};

use super::concepts::{COLOURS, SHAPES, SIZES};
use super::lexicon::{self, EXTRA_COLOURS, EXTRA_SHAPES};
use super::render::Sample;
use super::tokenizer::words;
use crate::teacher::TextTeacher;
use crate::train::rng::Rng;

/// Weights of the class words. Students see colour long before shape at 32x32, and a student
/// that knows shape only weakly guesses it from colour, which fails on held-out pairs; a
/// teacher whose space weighs shape above colour (as CLIP's own is shape-biased) makes
/// distillation teach both (on held-out pairs, ScratchCLIP's features matched the wrong shapes
/// better than the true one with equal weights, and the true one with these).
const SHAPE_WEIGHT: f32 = 1.3;
const COLOUR_WEIGHT: f32 = 0.85;
/// Weight of a word that names no attribute ("a", "photo", ...): small, so templates shift
/// a caption's embedding a little, as real prompts do.
const FILLER_WEIGHT: f32 = 0.15;
const SIZE_WEIGHT: f32 = 0.5;
const NUISANCE_WEIGHT: f32 = 0.25;
/// Norm of the per-image random part of the image embedding.
const NOISE_NORM: f32 = 0.2;
/// Weight of a synonym's own random part against its word's direction: cosine 1/sqrt(1.36),
/// about 0.86, near enough to be the nearest label, far enough to need learning.
const SYNONYM_NOISE: f32 = 0.6;

#[derive(Debug, Clone)]
pub struct AnalyticTeacher {
    dim: usize,
    /// Unit direction and weight per word.
    words: BTreeMap<String, (Vec<f32>, f32)>,
    /// Directions of background brightness and horizontal and vertical placement.
    nuisance: [Vec<f32>; 3],
    noise_rng: Rng,
}

fn unit_direction(rng: &mut Rng, dim: usize) -> Vec<f32> {
    let v: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| (x / norm) as f32).collect()
}

fn add_scaled(acc: &mut [f32], v: &[f32], w: f32) {
    acc.iter_mut().zip(v).for_each(|(a, b)| *a += w * b);
}

impl AnalyticTeacher {
    /// Directions for every word of `vocabulary`, drawn from `rng`.
    pub fn new<'a>(vocabulary: impl IntoIterator<Item = &'a str>, dim: usize, rng: &Rng) -> Self {
        let mut draw = rng.fork(1);
        let mut sorted: Vec<&str> = vocabulary.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let lexicon: BTreeMap<&str, Option<&str>> = lexicon::words().collect();
        let mut words: BTreeMap<String, (Vec<f32>, f32)> = sorted
            .into_iter()
            .map(|w| {
                let weight = if COLOURS.iter().any(|c| c.0 == w) || EXTRA_COLOURS.contains(&w) {
                    COLOUR_WEIGHT
                } else if SHAPES.contains(&w) || EXTRA_SHAPES.contains(&w) {
                    SHAPE_WEIGHT
                } else if SIZES.contains(&w) {
                    SIZE_WEIGHT
                } else {
                    FILLER_WEIGHT
                };
                (w.to_string(), (unit_direction(&mut draw, dim), weight))
            })
            .collect();
        for (synonym, base) in lexicon.iter().filter_map(|(w, b)| Some((w, (*b)?))) {
            let (Some((base_dir, weight)), Some((own, _))) = (words.get(base), words.get(*synonym))
            else {
                continue;
            };
            // A synonym weighs as much as its word.
            let weight = *weight;
            let mut dir = base_dir.clone();
            add_scaled(&mut dir, own, SYNONYM_NOISE);
            let norm = dir.iter().map(|x| x * x).sum::<f32>().sqrt();
            dir.iter_mut().for_each(|x| *x /= norm);
            words.insert(synonym.to_string(), (dir, weight));
        }
        let nuisance = [(); 3].map(|_| unit_direction(&mut draw, dim));
        Self {
            dim,
            words,
            nuisance,
            noise_rng: rng.fork(2),
        }
    }

    /// The caption's meaning, or an error naming a word outside the world.
    pub fn text_embedding(&self, text: &str) -> anyhow::Result<Vec<f32>> {
        let mut acc = vec![0f32; self.dim];
        for w in words(text) {
            let Some((dir, weight)) = self.words.get(&w) else {
                bail!("the world's teacher does not know the word `{w}` (in {text:?})");
            };
            add_scaled(&mut acc, dir, *weight);
        }
        Ok(acc)
    }

    /// The image's meaning: the attributes it shows plus nuisance from background and placement and a
    /// per-image random part keyed by `key`, as a real encoder is never exactly invariant.
    pub fn image_embedding(&self, sample: &Sample, key: u64) -> Vec<f32> {
        let mut acc = vec![0f32; self.dim];
        let concept = sample.concept;
        let colour = sample
            .subject
            .shows_colour()
            .then_some(COLOURS[concept.colour].0);
        let shape = sample
            .subject
            .shows_shape()
            .then_some(SHAPES[concept.shape]);
        // A splash has no defined size; a shape's size is part of what it shows.
        let size = shape.map(|_| SIZES[sample.size]);
        for w in [colour, shape, size].into_iter().flatten() {
            let (dir, weight) = &self.words[w];
            add_scaled(&mut acc, dir, *weight);
        }
        let brightness = sample.background.iter().sum::<f32>() / 3.0 - 0.3;
        let factors = [
            brightness * 3.0,
            sample.offset[0] / 7.0,
            sample.offset[1] / 7.0,
        ];
        for (dir, f) in self.nuisance.iter().zip(factors) {
            add_scaled(&mut acc, dir, NUISANCE_WEIGHT * f);
        }
        let mut rng = self.noise_rng.fork(key);
        let scale = NOISE_NORM / (self.dim as f32).sqrt();
        acc.iter_mut()
            .for_each(|a| *a += scale * rng.normal() as f32);
        acc
    }
}

impl TextTeacher for AnalyticTeacher {
    fn embed_dim(&self) -> usize {
        self.dim
    }

    fn text_features(&self, texts: &[String]) -> anyhow::Result<Tensor> {
        let mut flat = Vec::with_capacity(texts.len() * self.dim);
        for t in texts {
            flat.extend(self.text_embedding(t)?);
        }
        Ok(Tensor::from_vec(
            flat,
            (texts.len(), self.dim),
            &Device::Cpu,
        )?)
    }
}
