//! The world's splits behind the data traits, generated batch by batch so nothing is stored.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::concepts::Concept;
use super::render::SIDE;
use super::{Split, World};
use crate::data::{ImageBatch, ImageFeatureSet, TextBatch, TextFeatureSet};
use crate::teacher::{TextTeacher, Tokenize};

/// CLIP's input normalisation, so students see world images as they see real ones.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

fn check_indices(indices: &[usize], len: usize, what: &str) -> anyhow::Result<()> {
    if let Some(bad) = indices.iter().find(|&&i| i >= len) {
        anyhow::bail!("{what}: index {bad} out of range (the set has {len} items)");
    }
    Ok(())
}

/// One image split with the analytic teacher's features.
pub struct WorldImages {
    world: World,
    split: Split,
    classes: Vec<Concept>,
    class_names: Vec<String>,
}

impl WorldImages {
    /// Labels index the split's own label set ([`Split::classes`]); the pre-training split is
    /// unlabelled: it has no class names and its batches no labels.
    pub fn new(world: World, split: Split) -> Self {
        let classes = split.classes();
        Self {
            world,
            split,
            class_names: classes.iter().map(|c| c.name()).collect(),
            classes,
        }
    }

    pub fn split(&self) -> Split {
        self.split
    }
}

impl ImageFeatureSet for WorldImages {
    fn len(&self) -> usize {
        self.world.split_len(self.split)
    }

    fn class_names(&self) -> &[String] {
        &self.class_names
    }

    fn batch(&self, indices: &[usize], device: &Device) -> anyhow::Result<ImageBatch> {
        check_indices(
            indices,
            self.len(),
            &format!("world split {:?}", self.split),
        )?;
        let plane = SIDE * SIDE;
        // Images are independent: render them in parallel, then concatenate in order.
        let items: Vec<(Vec<f32>, Vec<f32>, Option<usize>)> = indices
            .par_iter()
            .map(|&i| {
                let sample = self.world.sample(self.split, i);
                let mut image = sample.render();
                for (c, channel) in image.chunks_mut(plane).enumerate() {
                    channel
                        .iter_mut()
                        .for_each(|v| *v = (*v - CLIP_MEAN[c]) / CLIP_STD[c]);
                }
                let feature = self.world.image_feature(self.split, i, &sample);
                let label = self.classes.iter().position(|c| *c == sample.concept);
                (image, feature, label)
            })
            .collect();
        let pixels: Vec<f32> = items.iter().flat_map(|it| it.0.iter().copied()).collect();
        let teacher: Vec<f32> = items.iter().flat_map(|it| it.1.iter().copied()).collect();
        // Every labelled split's images show one of its classes; the pre-training split has none.
        let labels = items
            .iter()
            .filter_map(|it| it.2.map(|l| l as u32))
            .collect();
        let n = indices.len();
        Ok(ImageBatch {
            inputs: Tensor::from_vec(pixels, (n, 3, SIDE, SIDE), device)?,
            teacher: Tensor::from_vec(teacher, (n, self.world.cfg.embed_dim), device)?,
            labels,
        })
    }
}

/// D-text: captions of every concept (unseen pairs included) with teacher features.
pub struct WorldText {
    world: World,
}

impl WorldText {
    pub fn new(world: World) -> Self {
        Self { world }
    }
}

impl TextFeatureSet for WorldText {
    fn len(&self) -> usize {
        self.world.cfg.dtext_sentences
    }

    fn batch(&self, indices: &[usize], device: &Device) -> anyhow::Result<TextBatch> {
        check_indices(indices, self.len(), "world D-text")?;
        let texts: Vec<String> = indices
            .iter()
            .map(|&i| self.world.dtext_sentence(i))
            .collect();
        let max_len = self.world.cfg.max_len;
        let ids: Vec<u32> = self.world.tokenizer().encode(&texts, max_len)?.concat();
        Ok(TextBatch {
            token_ids: Tensor::from_vec(ids, (texts.len(), max_len), device)?,
            teacher: self
                .world
                .teacher()
                .text_features(&texts)?
                .to_device(device)?,
        })
    }
}
