//! Uploaded bytes to a student input, refusing what is not a whole image of a sane size before
//! any large allocation: the header's dimensions are checked before the pixels are decoded.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageReader, Limits};

use crate::recipe::classifier::{clip_pixels, student_inputs};

/// Most decoded pixels (width x height) of an upload.
pub const DEFAULT_MAX_PIXELS: u64 = 4096 * 4096;

/// The short side is resized to 224 first: beyond this ratio of the long side to the short one
/// the resized image alone would be a huge allocation.
const MAX_ASPECT: u64 = 16;

/// Why an upload is not an input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadImage {
    #[error(
        "no image in the request (send the bytes as the body or in the multipart field `image`)"
    )]
    Empty,
    #[error("not an image: the bytes are neither PNG nor JPEG")]
    NotAnImage,
    #[error("the image is {width}x{height}: more than {max} pixels")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("the image is {width}x{height}: sides more than {MAX_ASPECT}:1 apart")]
    TooNarrow { width: u32, height: u32 },
    #[error("the image could not be decoded (truncated or corrupt?): {0}")]
    Corrupt(String),
}

/// The student input `[1, 3, 32, 32]` of an uploaded PNG or JPEG.
pub fn student_input(bytes: &[u8], max_pixels: u64) -> Result<Tensor, BadImage> {
    student_input_of(&decode(bytes, max_pixels)?)
}

/// The student input `[1, 3, 32, 32]` of a decoded image.
pub fn student_input_of(image: &DynamicImage) -> Result<Tensor, BadImage> {
    student_inputs(vec![clip_pixels(image)], &Device::Cpu)
        .map_err(|e| BadImage::Corrupt(format!("{e:#}")))
}

/// An uploaded PNG or JPEG, decoded once its header has passed the size checks.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, BadImage> {
    if bytes.is_empty() {
        return Err(BadImage::Empty);
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| BadImage::Corrupt(e.to_string()))
    };
    let probe = reader()?;
    let Some(format) = probe.format() else {
        return Err(BadImage::NotAnImage);
    };
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(BadImage::NotAnImage);
    }
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| BadImage::Corrupt(e.to_string()))?;
    let (w, h) = (u64::from(width), u64::from(height));
    if w * h > max_pixels {
        return Err(BadImage::TooManyPixels {
            width,
            height,
            max: max_pixels,
        });
    }
    if w.max(h) > MAX_ASPECT * w.min(h) || w.min(h) == 0 {
        return Err(BadImage::TooNarrow { width, height });
    }
    let mut decoder = reader()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    decoder.limits(limits);
    decoder
        .decode()
        .map_err(|e| BadImage::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::from_pixel(width, height, image::Rgb([200, 30, 30]))
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn a_png_becomes_a_student_input_and_bad_uploads_say_why() {
        let x = student_input(&png(40, 30), DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(x.dims(), [1, 3, 32, 32]);
        assert!(matches!(student_input(b"", 100), Err(BadImage::Empty)));
        assert!(matches!(
            student_input(b"hello, not an image", 100),
            Err(BadImage::NotAnImage)
        ));
        let whole = png(40, 30);
        assert!(matches!(
            student_input(&whole[..whole.len() / 2], DEFAULT_MAX_PIXELS),
            Err(BadImage::Corrupt(_))
        ));
        assert!(matches!(
            student_input(&whole, 1000),
            Err(BadImage::TooManyPixels {
                width: 40,
                height: 30,
                ..
            })
        ));
        assert!(matches!(
            student_input(&png(400, 10), DEFAULT_MAX_PIXELS),
            Err(BadImage::TooNarrow { .. })
        ));
    }
}
