//! CLIPImageProcessor's pipeline as transformers' PIL backend runs it (RGB over white,
//! shortest-edge bicubic resize, center crop, rescale, normalise), and the student's 32x32 input
//! derived from the teacher's crop. Every 8-bit step equals transformers' (tests/preprocess_parity.rs),
//! so features of a CLIP teacher equal those of the Python pipeline on the same image file.

use std::borrow::Cow;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde::Deserialize;

use super::pil_bicubic;

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// Side of the spiking student's input.
pub const STUDENT_SIZE: usize = 32;
/// `PILImageResampling.BICUBIC`, the only filter implemented.
const BICUBIC: u32 = 3;

/// The fields of `preprocessor_config.json` this pipeline honours.
#[derive(Debug, Clone, Deserialize)]
pub struct Preprocessor {
    #[serde(default = "default_size")]
    pub size: ShortestEdge,
    #[serde(default = "default_crop")]
    pub crop_size: CropSize,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "default_std")]
    pub image_std: [f32; 3],
}

/// `{"shortest_edge": N}`, or a bare `N` as older configs (openai/clip-vit-*) write it, which
/// transformers reads as the shortest edge.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "EdgeSpec")]
pub struct ShortestEdge {
    pub shortest_edge: u32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EdgeSpec {
    Edge { shortest_edge: u32 },
    Bare(u32),
}

impl From<EdgeSpec> for ShortestEdge {
    fn from(spec: EdgeSpec) -> Self {
        let (EdgeSpec::Edge { shortest_edge } | EdgeSpec::Bare(shortest_edge)) = spec;
        Self { shortest_edge }
    }
}

/// `{"height": H, "width": W}`, or a bare `N` (older configs) for a square crop.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "CropSpec")]
pub struct CropSize {
    pub height: u32,
    pub width: u32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum CropSpec {
    Sides { height: u32, width: u32 },
    Bare(u32),
}

impl From<CropSpec> for CropSize {
    fn from(spec: CropSpec) -> Self {
        match spec {
            CropSpec::Sides { height, width } => Self { height, width },
            CropSpec::Bare(side) => Self {
                height: side,
                width: side,
            },
        }
    }
}

/// Switches of `preprocessor_config.json` this pipeline cannot follow: a file that turns a
/// step off or asks for another filter is refused, rather than silently preprocessed otherwise.
#[derive(Deserialize)]
struct Steps {
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_convert_rgb: bool,
    #[serde(default = "yes")]
    do_resize: bool,
    #[serde(default = "yes")]
    do_center_crop: bool,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "yes")]
    do_normalize: bool,
}

impl Steps {
    fn check(&self) -> Result<()> {
        if self.resample != BICUBIC {
            bail!(
                "resample {} is not supported (only 3, bicubic)",
                self.resample
            );
        }
        let off: Vec<&str> = [
            ("do_convert_rgb", self.do_convert_rgb),
            ("do_resize", self.do_resize),
            ("do_center_crop", self.do_center_crop),
            ("do_rescale", self.do_rescale),
            ("do_normalize", self.do_normalize),
        ]
        .into_iter()
        .filter(|(_, on)| !on)
        .map(|(name, _)| name)
        .collect();
        if !off.is_empty() {
            bail!("{} false is not supported", off.join(", "));
        }
        Ok(())
    }
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
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> [f32; 3] {
    CLIP_MEAN
}
fn default_std() -> [f32; 3] {
    CLIP_STD
}
fn bicubic() -> u32 {
    BICUBIC
}
fn yes() -> bool {
    true
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
            rescale_factor: default_rescale(),
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let not_clip = || format!("{}: not a CLIP preprocessor_config.json", path.display());
        serde_json::from_str::<Steps>(&text)
            .with_context(not_clip)?
            .check()
            .with_context(|| path.display().to_string())?;
        serde_json::from_str(&text).with_context(not_clip)
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
        self.pixels_rgb(&convert_rgb(img))
    }

    pub fn pixels_rgb(&self, rgb: &RgbImage) -> Vec<f32> {
        self.normalise(&self.crop(rgb))
    }

    /// The resized, center-cropped 8-bit image, planar (`3 x crop height x crop width`): what
    /// transformers rescales and normalises.
    pub fn crop(&self, rgb: &RgbImage) -> Vec<u8> {
        let (w, h) = rgb.dimensions();
        let (nw, nh) = self.resized_size(w, h);
        let resized = if (nw, nh) == (w, h) {
            Cow::Borrowed(rgb)
        } else {
            Cow::Owned(pil_bicubic::resize(rgb, nw, nh))
        };
        let (cw, ch) = (self.crop_size.width, self.crop_size.height);
        let (left, top) = (crop_offset(nw, cw), crop_offset(nh, ch));
        let plane = (cw * ch) as usize;
        let mut out = vec![0u8; 3 * plane];
        for y in 0..ch {
            let Some(sy) = source_index(top, y, nh) else {
                continue;
            };
            for x in 0..cw {
                let Some(sx) = source_index(left, x, nw) else {
                    continue;
                };
                let p = resized.get_pixel(sx, sy);
                for c in 0..3 {
                    out[c * plane + (y * cw + x) as usize] = p[c];
                }
            }
        }
        out
    }

    /// transformers' `get_resize_output_image_size` without `max_size`: the short side becomes
    /// `shortest_edge`, the long side `int(shortest_edge * long / short)`. In integers, as the
    /// float quotient of two small integers never rounds across an integer.
    fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        let short = self.size.shortest_edge as u64;
        let scaled = |long: u32, by: u32| (short * long as u64 / by as u64) as u32;
        match (w, h) {
            (0, _) | (_, 0) => (w, h),
            _ if w <= h => (short as u32, scaled(h, w)),
            _ => (scaled(w, h), short as u32),
        }
    }

    /// transformers' `rescale` (f64 product, then f32) and `normalize` (f32).
    fn normalise(&self, crop: &[u8]) -> Vec<f32> {
        let plane = crop.len() / 3;
        crop.iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = i / plane;
                ((v as f64 * self.rescale_factor) as f32 - self.image_mean[c]) / self.image_std[c]
            })
            .collect()
    }
}

/// Offset of a `crop`-long window in a `len`-long axis, as transformers' `center_crop`: floored,
/// so an odd surplus leaves its extra row (column) at the bottom (right). A crop longer than the
/// axis gets a negative offset: it pads with zeros, the extra row (column) at the top (left).
fn crop_offset(len: u32, crop: u32) -> i64 {
    (len as i64 - crop as i64).div_euclid(2)
}

/// The source index of crop position `i`, or `None` where the crop lies in the padding.
fn source_index(offset: i64, i: u32, len: u32) -> Option<u32> {
    u32::try_from(offset + i as i64).ok().filter(|&s| s < len)
}

/// Grey replicated; transparency (an alpha channel, or a PNG's transparent palette entry or grey
/// value, which the decoder turns into alpha) composited over white, as transformers'
/// `convert_to_rgb`: Pillow's `alpha_composite` on an opaque white background rounds
/// `(s * a + 255 * (255 - a)) / 255` to nearest (checked against Pillow for all 65536 pairs).
pub fn convert_rgb(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = p[3] as u32;
        image::Rgb(std::array::from_fn(|c| {
            ((p[c] as u32 * a + 255 * (255 - a) + 127) / 255) as u8
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
