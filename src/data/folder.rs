//! ImageFolder trees (one sub-folder per class, JPEG/PNG files), the layout in which
//! Caltech101, Flowers102, OxfordIIITPet and ImageNet are commonly kept. Most have no
//! official split, so one is drawn deterministically from a seed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// A scanned tree: class names are the sorted folder names, files are sorted within a class,
/// so labels and order do not depend on the file system.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolder {
    pub class_names: Vec<String>,
    pub items: Vec<(PathBuf, u32)>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

/// SplitMix64: a seeded, platform-independent ordering key for the split.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl ImageFolder {
    /// Lists the tree; a tree without class folders or without images is an error.
    pub fn scan(root: &Path) -> anyhow::Result<Self> {
        let mut class_names = Vec::new();
        let mut items = Vec::new();
        for class_dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let label = class_names.len() as u32;
            class_names.push(
                class_dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            for file in sorted_entries(&class_dir)?
                .into_iter()
                .filter(|p| is_image(p))
            {
                items.push((file, label));
            }
        }
        if items.is_empty() {
            bail!("{}: no class folders with JPEG/PNG images", root.display());
        }
        Ok(Self { class_names, items })
    }

    /// Splits each class so that `test_fraction` of its images (rounded) go to the test side,
    /// chosen by a seeded shuffle: the same seed always gives the same split, and every class
    /// appears on both sides in proportion.
    pub fn split(&self, seed: u64, test_fraction: f64) -> anyhow::Result<(Self, Self)> {
        if !(0.0..=1.0).contains(&test_fraction) {
            bail!("test fraction {test_fraction} is not in [0, 1]");
        }
        let empty = || Self {
            class_names: self.class_names.clone(),
            items: Vec::new(),
        };
        let (mut train, mut test) = (empty(), empty());
        for label in 0..self.class_names.len() as u32 {
            let mut class: Vec<(u64, &(PathBuf, u32))> = self
                .items
                .iter()
                .filter(|(_, l)| *l == label)
                .enumerate()
                .map(|(i, item)| {
                    (
                        splitmix64(seed ^ splitmix64(((label as u64) << 32) | i as u64)),
                        item,
                    )
                })
                .collect();
            class.sort_by_key(|(key, _)| *key);
            let n_test = (class.len() as f64 * test_fraction).round() as usize;
            for (i, (_, item)) in class.into_iter().enumerate() {
                let side = if i < n_test { &mut test } else { &mut train };
                side.items.push((*item).clone());
            }
        }
        Ok((train, test))
    }
}

/// Decodes the images as RGB, skipping unreadable ones with a warning that names each; the
/// number skipped is returned so callers can report it.
pub fn decode_rgb(items: &[(PathBuf, u32)]) -> (Vec<(image::RgbImage, u32)>, usize) {
    let mut decoded = Vec::with_capacity(items.len());
    let mut skipped = 0;
    for (path, label) in items {
        match image::open(path) {
            Ok(img) => decoded.push((img.to_rgb8(), *label)),
            Err(e) => {
                tracing::warn!("skipping unreadable image {}: {e}", path.display());
                skipped += 1;
            }
        }
    }
    (decoded, skipped)
}
