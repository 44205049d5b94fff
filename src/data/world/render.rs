//! Drawing one 32x32 image from its sampled attributes: a coloured shape, jittered in place,
//! size and hue, over a tinted gradient background with pixel noise, so the student must
//! learn the concept rather than a fixed template of pixels.

use super::concepts::{Concept, COLOURS, SIZES};
use crate::train::rng::Rng;

pub const SIDE: usize = 32;

/// Everything random about one image; the image and its teacher feature are functions of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub concept: Concept,
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
}

impl Sample {
    pub fn draw(concept: Concept, rng: &mut Rng) -> Self {
        let size = rng.below(SIZES.len());
        let (radius, reach) = match size {
            0 => (rng.range(4.5, 6.5), 7.0),
            _ => (rng.range(9.0, 11.5), 3.5),
        };
        let base = COLOURS[concept.colour].1;
        let colour = base.map(|c| (c + rng.range(-0.08, 0.08) as f32).clamp(0.0, 1.0));
        let grey = rng.range(0.05, 0.55) as f32;
        let background = [(); 3].map(|_| (grey + rng.range(-0.08, 0.08) as f32).clamp(0.0, 1.0));
        Sample {
            concept,
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
        }
    }

    /// Whether pixel offset `(x, y)` from the shape's centre lies inside the shape.
    fn covers(&self, x: f32, y: f32) -> bool {
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
}
