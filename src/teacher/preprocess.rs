//! CLIPImageProcessor's pipeline (RGB, shortest-edge bicubic resize, center crop, rescale,
//! normalise) and the student's 32x32 input derived from the teacher's crop.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use serde::Deserialize;

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// Side of the spiking student's input.
pub const STUDENT_SIZE: usize = 32;

/// The fields of `preprocessor_config.json` this pipeline honours.
#[derive(Debug, Clone, Deserialize)]
pub struct Preprocessor {
    #[serde(default = "default_size")]
    pub size: ShortestEdge,
    #[serde(default = "default_crop")]
    pub crop_size: CropSize,
    #[serde(default = "default_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "default_std")]
    pub image_std: [f32; 3],
}

#[derive(Debug, Clone, Deserialize)]
pub struct ShortestEdge {
    pub shortest_edge: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CropSize {
    pub height: u32,
    pub width: u32,
}

fn default_size() -> ShortestEdge {
    ShortestEdge { shortest_edge: 224 }
}
fn default_crop() -> CropSize {
    CropSize {
        height: 224,
        width: 224,
    }
}
fn default_mean() -> [f32; 3] {
    CLIP_MEAN
}
fn default_std() -> [f32; 3] {
    CLIP_STD
}

impl Preprocessor {
    /// CLIP's pipeline for a square input of side `size`.
    pub fn square(size: u32) -> Self {
        Self {
            size: ShortestEdge {
                shortest_edge: size,
            },
            crop_size: CropSize {
                height: size,
                width: size,
            },
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a CLIP preprocessor_config.json", path.display()))
    }

    /// `preprocessor_config.json` from a checkpoint directory, or CLIP's defaults for `size`.
    pub fn from_dir_or_square(dir: &Path, size: u32) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if path.exists() {
            Self::from_file(&path)
        } else {
            Ok(Self::square(size))
        }
    }

    /// Reads and preprocesses an image file; the error names the file.
    pub fn load(&self, path: &Path) -> Result<Vec<f32>> {
        let img =
            image::open(path).with_context(|| format!("{}: unreadable image", path.display()))?;
        Ok(self.pixels(&img))
    }

    /// CHW f32 values, `3 x crop height x crop width`.
    pub fn pixels(&self, img: &DynamicImage) -> Vec<f32> {
        self.pixels_rgb(&to_rgb(img))
    }

    pub fn pixels_rgb(&self, rgb: &RgbImage) -> Vec<f32> {
        let (w, h) = rgb.dimensions();
        let short = self.size.shortest_edge;
        let (nw, nh) = if w <= h {
            (short, (short as u64 * h as u64 / w as u64) as u32)
        } else {
            ((short as u64 * w as u64 / h as u64) as u32, short)
        };
        let resized = if (nw, nh) == (w, h) {
            rgb.clone()
        } else {
            image::imageops::resize(rgb, nw, nh, FilterType::CatmullRom)
        };
        let (cw, ch) = (self.crop_size.width, self.crop_size.height);
        let left = nw.saturating_sub(cw) / 2;
        let top = nh.saturating_sub(ch) / 2;
        let plane = (cw * ch) as usize;
        let mut out = vec![0f32; 3 * plane];
        for y in 0..ch.min(nh) {
            for x in 0..cw.min(nw) {
                let p = resized.get_pixel(left + x, top + y);
                for c in 0..3 {
                    let v = p[c] as f32 / 255.0;
                    out[c * plane + (y * cw + x) as usize] =
                        (v - self.image_mean[c]) / self.image_std[c];
                }
            }
        }
        out
    }
}

/// Grayscale replicated; transparency composited over white, as transformers' `convert_rgb`.
fn to_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y);
        let alpha = p[3] as f32 / 255.0;
        image::Rgb(std::array::from_fn(|c| {
            (p[c] as f32 * alpha + 255.0 * (1.0 - alpha)).round() as u8
        }))
    })
}

/// `[B, C, H, W]` -> `[B, C, size, size]`, bilinear without antialiasing, matching
/// `F.interpolate(mode="bilinear", align_corners=False)` (the authors' student input).
pub fn student_input(pixels: &Tensor, size: usize) -> Result<Tensor> {
    let (b, c, h, w) = pixels.dims4()?;
    let taps = |from: usize| -> Vec<(usize, usize, f32)> {
        let scale = from as f32 / size as f32;
        (0..size)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(from - 1);
                let i1 = (i0 + 1).min(from - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h), taps(w));
    let data = pixels
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(b * c * size * size);
    for plane in data.chunks(h * w) {
        for &(y0, y1, fy) in &ty {
            for &(x0, x1, fx) in &tx {
                let at = |y: usize, x: usize| plane[y * w + x];
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                out.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, c, size, size), pixels.device())?)
}

/// Stacks per-image CHW vectors into `[B, 3, H, W]`.
pub fn batch(
    images: Vec<Vec<f32>>,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let n = images.len();
    Ok(Tensor::from_vec(
        images.concat(),
        (n, 3, height, width),
        device,
    )?)
}
