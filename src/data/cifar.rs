//! CIFAR-10 and CIFAR-100 in their binary versions, read natively so evaluation needs no
//! Python conversion step.
//!
//! A record is the label byte(s) then 3072 pixel bytes: the red 32x32 plane, then green,
//! then blue. CIFAR-100 records carry a coarse and a fine label; the fine one is used.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::RawImages;

/// Pixel bytes of one 32x32 RGB image.
const PIXELS: usize = 3 * 32 * 32;

/// Which CIFAR: decides the file names and the record layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred,
}

impl Cifar {
    fn label_bytes(self) -> usize {
        match self {
            Cifar::Ten => 1,
            Cifar::Hundred => 2,
        }
    }

    fn num_classes(self) -> u32 {
        match self {
            Cifar::Ten => 10,
            Cifar::Hundred => 100,
        }
    }

    /// The files of a split inside the extracted directory.
    pub fn files(self, dir: &Path, train: bool) -> Vec<PathBuf> {
        match (self, train) {
            (Cifar::Ten, true) => (1..=5)
                .map(|i| dir.join(format!("data_batch_{i}.bin")))
                .collect(),
            (Cifar::Ten, false) => vec![dir.join("test_batch.bin")],
            (Cifar::Hundred, true) => vec![dir.join("train.bin")],
            (Cifar::Hundred, false) => vec![dir.join("test.bin")],
        }
    }

    /// Reads a split; a missing file, a length that is not whole records, or a label out
    /// of range is an error naming the file.
    pub fn load(self, dir: &Path, train: bool) -> anyhow::Result<RawImages> {
        let mut images = RawImages {
            pixels: Vec::new(),
            height: 32,
            width: 32,
            labels: Vec::new(),
        };
        for file in self.files(dir, train) {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            self.parse_into(&bytes, &mut images)
                .with_context(|| format!("parsing CIFAR file {}", file.display()))?;
        }
        Ok(images)
    }

    fn parse_into(self, bytes: &[u8], images: &mut RawImages) -> anyhow::Result<()> {
        let record = self.label_bytes() + PIXELS;
        if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
            bail!(
                "{} bytes is not a whole number of {record}-byte records (truncated?)",
                bytes.len()
            );
        }
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            let label = u32::from(rec[self.label_bytes() - 1]);
            if label >= self.num_classes() {
                bail!("record {i}: label {label} is out of range (corrupt file?)");
            }
            images.labels.push(label);
            images.pixels.extend_from_slice(&rec[self.label_bytes()..]);
        }
        Ok(())
    }
}
