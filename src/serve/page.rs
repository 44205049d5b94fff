//! `GET /`: one self-contained page compiled into the binary (no build step, nothing fetched
//! from the network), and the sample images of the built-in world it offers to try.

use std::io::Cursor;

use crate::data::world::{Split, World, WorldConfig};

/// The page: HTML, CSS and script in one file.
pub const PAGE: &str = include_str!("page.html");

/// Seed of the world the samples are drawn from (any other than training's would do).
const SAMPLE_SEED: u64 = 2024;

/// Sample images as PNG bytes with captions, and what the world's analytic teacher sees in
/// them: that teacher reads an image's drawn attributes, not its pixels, so these are the only
/// uploads it can rank labels for.
pub struct Samples {
    world: World,
    images: Vec<SampleImage>,
}

struct SampleImage {
    caption: String,
    png: Vec<u8>,
    rgb: image::RgbImage,
    teacher_feature: Vec<f32>,
}

impl Samples {
    /// Four objects of seen colour-shape pairs and two of held-out pairs, each a different pair.
    pub fn of_world() -> anyhow::Result<Self> {
        let world = World::new(WorldConfig {
            seed: SAMPLE_SEED,
            ..Default::default()
        });
        let mut images = Vec::new();
        for (split, count, note) in [
            (Split::TestSeen, 4, "seen pair"),
            (Split::TestUnseen, 2, "held-out pair"),
        ] {
            let mut names = Vec::new();
            for i in 0..256 {
                if names.len() == count {
                    break;
                }
                let sample = world.sample(split, i);
                let name = sample.concept.name();
                if names.contains(&name) {
                    continue;
                }
                let rgb = sample.rgb_image();
                let mut png = Vec::new();
                rgb.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
                images.push(SampleImage {
                    caption: format!("{name} ({note})"),
                    png,
                    rgb,
                    teacher_feature: world.image_feature(split, i, &sample),
                });
                names.push(name);
            }
            anyhow::ensure!(
                names.len() == count,
                "too few distinct {note}s in the world"
            );
        }
        Ok(Self { world, images })
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    pub fn caption(&self, id: usize) -> Option<&str> {
        self.images.get(id).map(|s| s.caption.as_str())
    }

    pub fn png(&self, id: usize) -> Option<&[u8]> {
        self.images.get(id).map(|s| s.png.as_slice())
    }

    /// The world the samples were drawn from, whose analytic teacher describes them.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// The sample whose pixels `rgb` are, however it was re-encoded on the way.
    pub fn find(&self, rgb: &image::RgbImage) -> Option<usize> {
        self.images.iter().position(|s| &s.rgb == rgb)
    }

    /// The analytic teacher's (unnormalised) feature of sample `id`.
    pub fn teacher_feature(&self, id: usize) -> Option<&[f32]> {
        self.images.get(id).map(|s| s.teacher_feature.as_slice())
    }
}
