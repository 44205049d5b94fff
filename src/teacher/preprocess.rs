//! CLIPImageProcessor's preprocessing in Rust, and the student's 32x32 input derived from it,
//! so that teacher and student see the pixels the reference pipeline would give them.

use image::{imageops::FilterType, DynamicImage, Rgb, RgbImage};

/// CLIP's per-channel normalisation (OpenAI's training statistics).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// The student's input side.
pub const STUDENT_SIDE: usize = 32;

/// Sizes and statistics of `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub shortest_edge: u32,
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// OpenAI CLIP's settings at a given resolution (224 for ViT-B/16).
    pub fn clip(side: u32) -> Self {
        Self {
            shortest_edge: side,
            crop: side,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// Resizes the shortest edge (bicubic), center-crops, rescales and normalises; grayscale
    /// is replicated and transparent images are composited onto white, as transformers'
    /// `convert_to_rgb` does. Returns `[3, crop, crop]` channel-major.
    pub fn pixels(&self, image: &DynamicImage) -> Vec<f32> {
        let rgb = on_white(image);
        let (w, h) = rgb.dimensions();
        let short = w.min(h);
        let scale = |long: u32| (self.shortest_edge as u64 * long as u64 / short as u64) as u32;
        let (nw, nh) = if w <= h {
            (self.shortest_edge, scale(h))
        } else {
            (scale(w), self.shortest_edge)
        };
        let resized = image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom);
        let c = self.crop;
        let (left, top) = (nw.saturating_sub(c) / 2, nh.saturating_sub(c) / 2);
        let mut out = vec![0f32; 3 * (c * c) as usize];
        for y in 0..c {
            for x in 0..c {
                let p = resized.get_pixel((left + x).min(nw - 1), (top + y).min(nh - 1));
                for ch in 0..3 {
                    let v = f32::from(p[ch]) / 255.0;
                    out[ch * (c * c) as usize + (y * c + x) as usize] =
                        (v - self.mean[ch]) / self.std[ch];
                }
            }
        }
        out
    }
}

/// Flattens an image to RGB, compositing any alpha channel over a white background.
fn on_white(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = u32::from(p[3]);
        Rgb(std::array::from_fn(|c| {
            ((u32::from(p[c]) * a + 255 * (255 - a) + 127) / 255) as u8
        }))
    })
}

/// Source taps of bilinear resampling without antialiasing (`align_corners=False`).
fn taps(src: usize, dst: usize) -> Vec<(usize, usize, f32)> {
    let scale = src as f32 / dst as f32;
    (0..dst)
        .map(|i| {
            let pos = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (pos.floor() as usize).min(src - 1);
            (i0, (i0 + 1).min(src - 1), pos - i0 as f32)
        })
        .collect()
}

/// The student's input: a normalised `[3, side, side]` crop resized to 32x32 bilinearly
/// without antialiasing, as the authors' `F.interpolate` does.
pub fn student_input(pixels: &[f32], side: usize) -> Vec<f32> {
    let t = taps(side, STUDENT_SIDE);
    let mut out = Vec::with_capacity(3 * STUDENT_SIDE * STUDENT_SIDE);
    for plane in pixels.chunks_exact(side * side) {
        for &(y0, y1, wy) in &t {
            for &(x0, x1, wx) in &t {
                let at = |y: usize, x: usize| plane[y * side + x];
                let top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
                let bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
                out.push(top * (1.0 - wy) + bottom * wy);
            }
        }
    }
    out
}
