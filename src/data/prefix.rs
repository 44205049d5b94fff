//! The first items of a dataset, for short runs (`train --items N`: smoke tests, and checks
//! that several processes train as one).

use candle_core::Device;

use super::{ImageBatch, ImageFeatureSet, TextBatch, TextFeatureSet};

/// Items `0..len` of `set`.
pub struct Prefix<'a, S: ?Sized> {
    set: &'a S,
    len: usize,
}

impl<'a, S: ?Sized> Prefix<'a, S> {
    /// The first `limit` items of a set of `len` (all of them without a limit or beyond it).
    fn new(set: &'a S, len: usize, limit: Option<usize>) -> Self {
        Self {
            set,
            len: limit.map_or(len, |n| n.min(len)),
        }
    }

    fn check(&self, indices: &[usize]) -> anyhow::Result<()> {
        match indices.iter().find(|&&i| i >= self.len) {
            Some(i) => anyhow::bail!("item {i} of the first {} items", self.len),
            None => Ok(()),
        }
    }
}

/// The first `limit` images of `set`.
pub fn first_images<'a>(
    set: &'a (dyn ImageFeatureSet + 'a),
    limit: Option<usize>,
) -> Prefix<'a, dyn ImageFeatureSet + 'a> {
    Prefix::new(set, set.len(), limit)
}

/// The first `limit` sentences of `set`.
pub fn first_texts<'a>(
    set: &'a (dyn TextFeatureSet + 'a),
    limit: Option<usize>,
) -> Prefix<'a, dyn TextFeatureSet + 'a> {
    Prefix::new(set, set.len(), limit)
}

impl<'a> ImageFeatureSet for Prefix<'a, dyn ImageFeatureSet + 'a> {
    fn len(&self) -> usize {
        self.len
    }
    fn class_names(&self) -> &[String] {
        self.set.class_names()
    }
    fn batch(&self, indices: &[usize], device: &Device) -> anyhow::Result<ImageBatch> {
        self.check(indices)?;
        self.set.batch(indices, device)
    }
}

impl<'a> TextFeatureSet for Prefix<'a, dyn TextFeatureSet + 'a> {
    fn len(&self) -> usize {
        self.len
    }
    fn batch(&self, indices: &[usize], device: &Device) -> anyhow::Result<TextBatch> {
        self.check(indices)?;
        self.set.batch(indices, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::world::{Split, World, WorldConfig};

    #[test]
    fn the_first_items_are_the_sets_and_no_more() {
        let world = World::new(WorldConfig::default());
        let images = world.images(Split::Train);
        let first = first_images(&images, Some(5));
        assert_eq!(first.len(), 5);
        assert_eq!(first.class_names(), images.class_names());
        let (a, b) = (
            first.batch(&[4], &Device::Cpu).unwrap(),
            images.batch(&[4], &Device::Cpu).unwrap(),
        );
        assert_eq!(a.labels, b.labels);
        assert!(first.batch(&[5], &Device::Cpu).is_err());
        let texts = world.dtext();
        assert_eq!(first_texts(&texts, None).len(), texts.len());
        assert_eq!(first_texts(&texts, Some(usize::MAX)).len(), texts.len());
    }
}
