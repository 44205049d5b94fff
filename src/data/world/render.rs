//! Drawing one 32x32 image from its sampled attributes: a coloured shape, jittered in place,
//! size and hue, over a tinted gradient background with pixel noise, so the student must
//! learn the concept rather than a fixed template of pixels. Pre-training also draws images
//! that show one attribute alone (a colour splash with no shape, a grey shape with no
//! colour), as a broad pre-training corpus shows concepts apart from one another.

use super::concepts::{Concept, COLOURS, SHAPES, SIZES};
use crate::train::rng::Rng;

pub const SIDE: usize = 32;

/// What an image shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A shape in a colour: the world's classes.
    Object,
    /// An irregular splash of the concept's colour; its shape is not shown.
    ColourSplash,
    /// The concept's shape in a neutral grey; its colour is not shown.
    GreyShape,
}

impl Subject {
    pub fn shows_colour(self) -> bool {
        self != Subject::GreyShape
    }

    pub fn shows_shape(self) -> bool {
        self != Subject::ColourSplash
    }
}

/// Discs `(x, y, radius)` whose union is a colour splash, around the splash's centre.
const SPLASH_DISCS: usize = 6;

/// Everything random about one image; the image and its teacher feature are functions of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub concept: Concept,
    pub subject: Subject,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Shape centre offset from the image centre, pixels.
    pub offset: [f32; 2],
    pub radius: f32,
    pub colour: [f32; 3],
    pub background: [f32; 3],
    /// Background brightness change across the image along x and y.
    pub gradient: [f32; 2],
    /// Seeds the pixel noise.
    pub noise_seed: u64,
    /// A splash's discs relative to its centre, `(x, y, radius)`; empty for other subjects.
    pub splash: Vec<[f32; 3]>,
}

impl Sample {
    pub fn draw(concept: Concept, subject: Subject, rng: &mut Rng) -> Self {
        let size = rng.below(SIZES.len());
        let (radius, reach) = match size {
            0 => (rng.range(4.5, 6.5), 7.0),
            _ => (rng.range(9.0, 11.5), 3.5),
        };
        let grey = rng.range(0.05, 0.55) as f32;
        let colour = match subject {
            // Far enough from the background's grey to stand out in brightness alone.
            Subject::GreyShape => [(grey + rng.range(0.3, 0.45) as f32).min(1.0); 3],
            _ => COLOURS[concept.colour]
                .1
                .map(|c| (c + rng.range(-0.08, 0.08) as f32).clamp(0.0, 1.0)),
        };
        let background = [(); 3].map(|_| (grey + rng.range(-0.08, 0.08) as f32).clamp(0.0, 1.0));
        let splash = match subject {
            Subject::ColourSplash => (0..SPLASH_DISCS)
                .map(|_| {
                    let r = radius * rng.range(0.25, 0.45);
                    let spread = radius * 0.8;
                    [
                        rng.range(-spread, spread) as f32,
                        rng.range(-spread, spread) as f32,
                        r as f32,
                    ]
                })
                .collect(),
            _ => Vec::new(),
        };
        Sample {
            concept,
            subject,
            size,
            offset: [
                rng.range(-reach, reach) as f32,
                rng.range(-reach, reach) as f32,
            ],
            radius: radius as f32,
            colour,
            background,
            gradient: [rng.range(-0.15, 0.15) as f32, rng.range(-0.15, 0.15) as f32],
            noise_seed: rng.next_u64(),
            splash,
        }
    }

    /// What the image shows, in words: "a large red circle", "a red splash", "a small grey
    /// circle".
    pub fn description(&self) -> String {
        let (colour, shape) = (COLOURS[self.concept.colour].0, SHAPES[self.concept.shape]);
        let size = SIZES[self.size];
        match self.subject {
            Subject::Object => format!("a {size} {colour} {shape}"),
            Subject::ColourSplash => format!("a {colour} splash"),
            Subject::GreyShape => format!("a {size} grey {shape}"),
        }
    }

    /// Whether pixel offset `(x, y)` from the subject's centre lies inside it.
    fn covers(&self, x: f32, y: f32) -> bool {
        if self.subject == Subject::ColourSplash {
            return self
                .splash
                .iter()
                .any(|[cx, cy, r]| (x - cx).powi(2) + (y - cy).powi(2) <= r * r);
        }
        let r = self.radius;
        match self.concept.shape {
            0 => x * x + y * y <= r * r,
            1 => x.abs() <= 0.8 * r && y.abs() <= 0.8 * r,
            // Upward triangle: apex at -r, base at +0.8r, widening linearly.
            2 => y >= -r && y <= 0.8 * r && x.abs() <= (y + r) / 1.8 * 0.9,
            _ => {
                let arm = r / 3.0;
                (x.abs() <= arm && y.abs() <= r) || (y.abs() <= arm && x.abs() <= r)
            }
        }
    }

    /// Pixels in `[0, 1]`, channel-major `[3, 32, 32]`.
    pub fn render(&self) -> Vec<f32> {
        let mut noise = Rng::new(self.noise_seed);
        let mut out = vec![0f32; 3 * SIDE * SIDE];
        let centre = (SIDE as f32 - 1.0) / 2.0;
        for y in 0..SIDE {
            for x in 0..SIDE {
                let (fx, fy) = (x as f32 - centre, y as f32 - centre);
                let inside = self.covers(fx - self.offset[0], fy - self.offset[1]);
                let shade = (self.gradient[0] * fx + self.gradient[1] * fy) / SIDE as f32;
                for c in 0..3 {
                    let base = match inside {
                        true => self.colour[c],
                        false => self.background[c] + shade,
                    };
                    let v = base + 0.04 * noise.normal() as f32;
                    out[c * SIDE * SIDE + y * SIDE + x] = v.clamp(0.0, 1.0);
                }
            }
        }
        out
    }

    /// The rendered image as 8-bit RGB, for writing to disk.
    pub fn rgb_image(&self) -> image::RgbImage {
        let pixels = self.render();
        let plane = SIDE * SIDE;
        image::RgbImage::from_fn(SIDE as u32, SIDE as u32, |x, y| {
            let at = y as usize * SIDE + x as usize;
            image::Rgb([0, 1, 2].map(|c| (pixels[c * plane + at] * 255.0).round() as u8))
        })
    }
}
