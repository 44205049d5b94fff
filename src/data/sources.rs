//! Labelled image datasets read from disk as users have them: CIFAR-10/100 and STL-10 in their
//! binary releases, and ImageFolder trees. The teacher-feature cache walks a source once.
//!
//! Dataset SPEC syntax (one parser, [`DatasetSpec::parse`]):
//! `KIND:DIR[:SPLIT]`, KIND one of `cifar10`, `cifar100`, `stl10`, `folder`; SPLIT `train` or
//! `test` (default `test`). Folders have no split of their own: a seeded per-class split holds
//! out a fraction for `test`, set as `folder:DIR:test:0.2:SEED` (defaults 0.2 and 0).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;

use crate::teacher::preprocess::convert_rgb;
use crate::train::rng::Rng;

/// A labelled image collection; decoding may fail per item (a corrupt file in a folder).
pub trait ImageSource: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn class_names(&self) -> &[String];
    fn label(&self, index: usize) -> u32;
    /// The image, or an error naming the file and the problem.
    fn image(&self, index: usize) -> Result<RgbImage>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    Cifar10 {
        dir: PathBuf,
        split: Split,
    },
    Cifar100 {
        dir: PathBuf,
        split: Split,
    },
    Stl10 {
        dir: PathBuf,
        split: Split,
    },
    Folder {
        dir: PathBuf,
        split: Split,
        test_fraction: f64,
        seed: u64,
    },
}

impl DatasetSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        let parts: Vec<&str> = spec.split(':').collect();
        ensure!(
            parts.len() >= 2,
            "dataset {spec:?}: expected KIND:DIR[:SPLIT]"
        );
        let dir = PathBuf::from(parts[1]);
        let split = match parts.get(2).copied() {
            None | Some("test") => Split::Test,
            Some("train") => Split::Train,
            Some(other) => bail!("dataset {spec:?}: split {other:?} is neither train nor test"),
        };
        let extra = parts.get(3..).unwrap_or(&[]);
        let fixed = |s: Self| {
            ensure!(
                extra.is_empty(),
                "dataset {spec:?}: {} takes no options after the split",
                parts[0]
            );
            Ok(s)
        };
        match parts[0] {
            "cifar10" => fixed(Self::Cifar10 { dir, split }),
            "cifar100" => fixed(Self::Cifar100 { dir, split }),
            "stl10" => fixed(Self::Stl10 { dir, split }),
            "folder" => {
                ensure!(
                    extra.len() <= 2,
                    "dataset {spec:?}: folder:DIR:SPLIT:FRACTION:SEED at most"
                );
                let test_fraction = match extra.first() {
                    Some(f) => f
                        .parse()
                        .with_context(|| format!("dataset {spec:?}: bad test fraction {f:?}"))?,
                    None => 0.2,
                };
                ensure!(
                    (0.0..=1.0).contains(&test_fraction),
                    "dataset {spec:?}: test fraction outside [0, 1]"
                );
                let seed = match extra.get(1) {
                    Some(s) => s
                        .parse()
                        .with_context(|| format!("dataset {spec:?}: bad seed {s:?}"))?,
                    None => 0,
                };
                Ok(Self::Folder {
                    dir,
                    split,
                    test_fraction,
                    seed,
                })
            }
            kind => {
                bail!("dataset {spec:?}: unknown kind {kind:?} (cifar10, cifar100, stl10, folder)")
            }
        }
    }

    pub fn open(&self) -> Result<Box<dyn ImageSource>> {
        Ok(match self {
            Self::Cifar10 { dir, split } => Box::new(Cifar::open_10(dir, *split)?),
            Self::Cifar100 { dir, split } => Box::new(Cifar::open_100(dir, *split)?),
            Self::Stl10 { dir, split } => Box::new(Stl10::open(dir, *split)?),
            Self::Folder {
                dir,
                split,
                test_fraction,
                seed,
            } => Box::new(ImageFolder::open(dir, *split, *test_fraction, *seed)?),
        })
    }
}

/// Images held in memory as raw bytes, with the layout of their release.
struct RawImages {
    pixels: Vec<u8>,
    labels: Vec<u32>,
    class_names: Vec<String>,
    side: u32,
    /// STL-10 stores each channel column-major.
    column_major: bool,
}

impl RawImages {
    fn image(&self, index: usize) -> RgbImage {
        let s = self.side as usize;
        let plane = s * s;
        let px = &self.pixels[index * 3 * plane..(index + 1) * 3 * plane];
        RgbImage::from_fn(self.side, self.side, |x, y| {
            let at = if self.column_major {
                x as usize * s + y as usize
            } else {
                y as usize * s + x as usize
            };
            image::Rgb([px[at], px[plane + at], px[2 * plane + at]])
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn read_names(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    ensure!(!names.is_empty(), "{}: no class names", path.display());
    Ok(names)
}

/// CIFAR binary release: records of label byte(s) then 3x32x32 planar RGB.
pub struct Cifar(RawImages);

impl Cifar {
    pub fn open_10(dir: &Path, split: Split) -> Result<Self> {
        let files: Vec<String> = match split {
            Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            Split::Test => vec!["test_batch.bin".into()],
        };
        Self::open(dir, &files, 1, 0, &dir.join("batches.meta.txt"))
    }

    /// Fine labels (the second label byte of each record).
    pub fn open_100(dir: &Path, split: Split) -> Result<Self> {
        let file = match split {
            Split::Train => "train.bin",
            Split::Test => "test.bin",
        };
        Self::open(dir, &[file.into()], 2, 1, &dir.join("fine_label_names.txt"))
    }

    fn open(
        dir: &Path,
        files: &[String],
        label_bytes: usize,
        label_at: usize,
        names: &Path,
    ) -> Result<Self> {
        let class_names = read_names(names)?;
        let record = label_bytes + 3072;
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for f in files {
            let path = dir.join(f);
            let bytes = read(&path)?;
            ensure!(
                !bytes.is_empty() && bytes.len() % record == 0,
                "{}: {} bytes is not a whole number of {record}-byte records (truncated?)",
                path.display(),
                bytes.len()
            );
            for (i, r) in bytes.chunks(record).enumerate() {
                let label = r[label_at] as u32;
                ensure!(
                    (label as usize) < class_names.len(),
                    "{}: record {i} has label {label}, but {} names only {} classes",
                    path.display(),
                    names.display(),
                    class_names.len()
                );
                labels.push(label);
                pixels.extend_from_slice(&r[label_bytes..]);
            }
        }
        Ok(Self(RawImages {
            pixels,
            labels,
            class_names,
            side: 32,
            column_major: false,
        }))
    }
}

/// STL-10 binary release: `*_X.bin` 3x96x96 column-major, `*_y.bin` labels 1..=10.
pub struct Stl10(RawImages);

impl Stl10 {
    pub fn open(dir: &Path, split: Split) -> Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "test",
        };
        let class_names = read_names(&dir.join("class_names.txt"))?;
        let (xp, yp) = (
            dir.join(format!("{prefix}_X.bin")),
            dir.join(format!("{prefix}_y.bin")),
        );
        let pixels = read(&xp)?;
        let raw_labels = read(&yp)?;
        ensure!(!raw_labels.is_empty(), "{}: no labels", yp.display());
        let size = 3 * 96 * 96;
        ensure!(
            pixels.len() == raw_labels.len() * size,
            "{}: {} bytes, but the {} labels of {} need {} (truncated?)",
            xp.display(),
            pixels.len(),
            raw_labels.len(),
            yp.display(),
            raw_labels.len() * size
        );
        let labels = raw_labels
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                ensure!(
                    (1..=class_names.len()).contains(&(l as usize)),
                    "{}: label {i} is {l}, expected 1..={} (the classes of {})",
                    yp.display(),
                    class_names.len(),
                    dir.join("class_names.txt").display()
                );
                Ok(l as u32 - 1)
            })
            .collect::<Result<_>>()?;
        Ok(Self(RawImages {
            pixels,
            labels,
            class_names,
            side: 96,
            column_major: true,
        }))
    }
}

macro_rules! raw_source {
    ($t:ty) => {
        impl ImageSource for $t {
            fn len(&self) -> usize {
                self.0.labels.len()
            }
            fn class_names(&self) -> &[String] {
                &self.0.class_names
            }
            fn label(&self, index: usize) -> u32 {
                self.0.labels[index]
            }
            fn image(&self, index: usize) -> Result<RgbImage> {
                Ok(self.0.image(index))
            }
        }
    };
}
raw_source!(Cifar);
raw_source!(Stl10);

/// One sub-folder per class (sorted names), JPEG/PNG files inside; decoded on demand.
pub struct ImageFolder {
    class_names: Vec<String>,
    items: Vec<(PathBuf, u32)>,
}

impl ImageFolder {
    /// The split is per class: a seeded shuffle of each class's sorted files, the first
    /// `test_fraction` of it held out for `test`.
    pub fn open(dir: &Path, split: Split, test_fraction: f64, seed: u64) -> Result<Self> {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        ensure!(!classes.is_empty(), "{}: no class folders", dir.display());
        let mut items = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(class)
                .with_context(|| format!("listing {}", class.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_image_file(p))
                .collect();
            files.sort();
            Rng::new(seed).fork(label as u64).shuffle(&mut files);
            let held = (files.len() as f64 * test_fraction).round() as usize;
            let chosen = match split {
                Split::Test => &files[..held],
                Split::Train => &files[held..],
            };
            items.extend(chosen.iter().map(|p| (p.clone(), label as u32)));
        }
        let class_names = classes
            .iter()
            .map(|c| {
                c.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        Ok(Self { class_names, items })
    }
}

fn is_image_file(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png"))
}

impl ImageSource for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn label(&self, index: usize) -> u32 {
        self.items[index].1
    }
    /// Transparency over white, as CLIP's processor sees the file.
    fn image(&self, index: usize) -> Result<RgbImage> {
        let path = &self.items[index].0;
        Ok(convert_rgb(&image::open(path).with_context(|| {
            format!("{}: unreadable image", path.display())
        })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_syntax() {
        assert_eq!(
            DatasetSpec::parse("cifar10:/d:train").unwrap(),
            DatasetSpec::Cifar10 {
                dir: "/d".into(),
                split: Split::Train
            }
        );
        assert_eq!(
            DatasetSpec::parse("folder:/f:test:0.3:7").unwrap(),
            DatasetSpec::Folder {
                dir: "/f".into(),
                split: Split::Test,
                test_fraction: 0.3,
                seed: 7
            }
        );
        assert!(DatasetSpec::parse("cifar10:/d:val").is_err());
        assert!(DatasetSpec::parse("cifar10:/d:test:0.2").is_err());
        assert!(DatasetSpec::parse("mnist:/d").is_err());
        assert!(DatasetSpec::parse("folder:/f:test:2").is_err());
    }

    #[test]
    fn cifar100_reads_fine_labels_and_rejects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fine_label_names.txt"), "a\nb\nc\n").unwrap();
        let mut rec = vec![0u8, 2];
        rec.extend((0..3072).map(|i| (i % 251) as u8));
        std::fs::write(dir.path().join("test.bin"), &rec).unwrap();
        let c = Cifar::open_100(dir.path(), Split::Test).unwrap();
        assert_eq!((c.len(), c.label(0)), (1, 2));
        let img = c.image(0).unwrap();
        // Planar: green of pixel (x=1, y=0) is byte 1024 + 1.
        assert_eq!(img.get_pixel(1, 0)[1], (1025 % 251) as u8);
        std::fs::write(dir.path().join("test.bin"), &rec[..100]).unwrap();
        let err = format!(
            "{:#}",
            Cifar::open_100(dir.path(), Split::Test).err().unwrap()
        );
        assert!(
            err.contains("test.bin") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn stl10_is_column_major() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("class_names.txt"), "x\ny\n").unwrap();
        let mut px = vec![0u8; 3 * 96 * 96];
        px[5 * 96 + 2] = 200; // red channel, column 5, row 2
        std::fs::write(dir.path().join("test_X.bin"), &px).unwrap();
        std::fs::write(dir.path().join("test_y.bin"), [2u8]).unwrap();
        let s = Stl10::open(dir.path(), Split::Test).unwrap();
        assert_eq!(s.label(0), 1);
        assert_eq!(s.image(0).unwrap().get_pixel(5, 2)[0], 200);
        std::fs::write(dir.path().join("test_y.bin"), [11u8]).unwrap();
        assert!(Stl10::open(dir.path(), Split::Test).is_err());
    }

    #[test]
    fn folder_split_is_seeded_disjoint_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["cat", "dog"] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            for i in 0..10 {
                RgbImage::new(4, 4)
                    .save(dir.path().join(class).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        std::fs::write(dir.path().join("cat").join("broken.jpg"), b"nope").unwrap();
        let test = ImageFolder::open(dir.path(), Split::Test, 0.2, 3).unwrap();
        let train = ImageFolder::open(dir.path(), Split::Train, 0.2, 3).unwrap();
        assert_eq!(test.class_names(), ["cat", "dog"]);
        assert_eq!(test.len() + train.len(), 21);
        assert!(test.items.iter().all(|t| !train.items.contains(t)));
        let again = ImageFolder::open(dir.path(), Split::Test, 0.2, 3).unwrap();
        assert_eq!(test.items, again.items);
        let all = ImageFolder::open(dir.path(), Split::Train, 0.0, 0).unwrap();
        let broken = all
            .items
            .iter()
            .position(|(p, _)| p.ends_with("broken.jpg"))
            .unwrap();
        assert!(format!("{:#}", all.image(broken).err().unwrap()).contains("broken.jpg"));
    }

    #[test]
    fn folder_images_composite_transparency_over_white() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba([0, 0, 0, [0, 255][x as usize]]))
            .save(dir.path().join("a").join("0.png"))
            .unwrap();
        let img = ImageFolder::open(dir.path(), Split::Train, 0.0, 0)
            .unwrap()
            .image(0)
            .unwrap();
        assert_eq!(
            (img.get_pixel(0, 0).0, img.get_pixel(1, 0).0),
            ([255; 3], [0; 3])
        );
    }
}
