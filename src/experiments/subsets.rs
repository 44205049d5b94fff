//! Image sets made of parts of others, for the pre-training set sizes and overlaps of the
//! paper's Figure 6.

use candle_core::{Device, Tensor};

use crate::data::{ImageBatch, ImageFeatureSet};

/// Chosen items of several image sets, in order: `(set, index)` pairs.
pub struct Mixture<'a> {
    sets: Vec<&'a dyn ImageFeatureSet>,
    items: Vec<(usize, usize)>,
}

impl<'a> Mixture<'a> {
    /// Items `range` of each set, one range per set, concatenated. The mixture is for
    /// distillation and unlabelled: its parts may label their images differently (or not at
    /// all), so labels are dropped.
    pub fn new(
        parts: Vec<(&'a dyn ImageFeatureSet, std::ops::Range<usize>)>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!parts.is_empty(), "a mixture needs at least one set");
        let mut items = Vec::new();
        for (s, (set, range)) in parts.iter().enumerate() {
            anyhow::ensure!(
                range.end <= set.len(),
                "items {range:?} of a set of {} images",
                set.len()
            );
            items.extend(range.clone().map(|i| (s, i)));
        }
        Ok(Self {
            sets: parts.into_iter().map(|p| p.0).collect(),
            items,
        })
    }
}

impl ImageFeatureSet for Mixture<'_> {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn class_names(&self) -> &[String] {
        &[]
    }

    /// Items of one set are fetched together (so the set can render them in parallel): the
    /// batch holds the requested items grouped by set, inputs and features aligned.
    fn batch(&self, indices: &[usize], device: &Device) -> anyhow::Result<ImageBatch> {
        let mut per_set = vec![Vec::new(); self.sets.len()];
        for &i in indices {
            let &(s, j) = self
                .items
                .get(i)
                .ok_or_else(|| anyhow::anyhow!("index {i} of a mixture of {}", self.len()))?;
            per_set[s].push(j);
        }
        let parts = per_set
            .iter()
            .zip(&self.sets)
            .filter(|(js, _)| !js.is_empty())
            .map(|(js, set)| set.batch(js, device))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cat = |f: fn(&ImageBatch) -> &Tensor| -> anyhow::Result<Tensor> {
            let ts: Vec<&Tensor> = parts.iter().map(f).collect();
            Ok(Tensor::cat(&ts, 0)?)
        };
        Ok(ImageBatch {
            inputs: cat(|b| &b.inputs)?,
            teacher: cat(|b| &b.teacher)?,
            labels: Vec::new(),
        })
    }
}
