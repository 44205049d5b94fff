//! Bicubic resizing that reproduces Pillow's `Image.resize(size, BICUBIC)` on 8-bit RGB bit for
//! bit, because transformers' PIL-backend CLIP processor resizes with it and a CLIP teacher's
//! features move by ~1e-2 when its input moves by one 8-bit step here and there.
//!
//! Pillow convolves separably, width first, and keeps the intermediate image 8-bit: each pass
//! rounds and clamps to 0..=255. When shrinking it stretches the kernel by the scale factor (an
//! antialiasing low-pass), so a 300-pixel row shrunk to 48 reads ~25 source pixels per output.
//! Weights are computed in f64, normalised to sum to one, then applied in 22-bit fixed point;
//! each of these steps is mirrored here operation for operation, since rounding the weights
//! differently moves a few outputs by one.

use image::RgbImage;

/// Fractional bits of the fixed-point weights: an 8-bit sample times a weight, summed over a
/// kernel whose negative lobes push partial sums past one, stays inside an i32.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const ONE: f64 = (1u32 << PRECISION_BITS) as f64;
/// Keys' cubic convolution parameter of Pillow's BICUBIC. The `image` crate's CatmullRom has
/// the same kernel but not Pillow's windows and rounding, which moved features by ~6e-3.
const A: f64 = -0.5;
/// Half-width of the unstretched kernel, in source pixels.
const SUPPORT: f64 = 2.0;

fn cubic(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The source samples one output sample reads, and their fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// One `Taps` per output position along an axis of `in_size` resized to `out_size`.
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let stretch = scale.max(1.0);
    let support = SUPPORT * stretch;
    let inv_stretch = 1.0 / stretch;
    (0..out_size)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // Truncation toward zero, as C's `(int)`, of the rounded window ends.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (first..end)
                .map(|i| cubic((i as f64 - center + 0.5) * inv_stretch))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    // Rounded half away from zero, then truncated, as Pillow does.
                    if w < 0.0 {
                        (-0.5 + w * ONE) as i32
                    } else {
                        (0.5 + w * ONE) as i32
                    }
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

/// Fixed-point sum (with its rounding half-unit already added) back to a clamped 8-bit value.
fn to_u8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Convolves the samples at `at(i)` (source index -> byte) with `taps`.
fn convolve(taps: &Taps, at: impl Fn(usize) -> u8) -> u8 {
    let mut sum = 1i32 << (PRECISION_BITS - 1);
    for (k, &w) in taps.weights.iter().enumerate() {
        sum += at(taps.first + k) as i32 * w;
    }
    to_u8(sum)
}

fn horizontal(img: &RgbImage, width: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height());
    let taps = taps(w, width as usize);
    let src = img.as_raw();
    let mut out = RgbImage::new(width, h);
    for (y, row) in out.rows_mut().enumerate() {
        let line = &src[y * w * 3..(y + 1) * w * 3];
        for (t, px) in taps.iter().zip(row) {
            for c in 0..3 {
                px[c] = convolve(t, |i| line[i * 3 + c]);
            }
        }
    }
    out
}

fn vertical(img: &RgbImage, height: u32) -> RgbImage {
    let (w, h) = (img.width(), img.height() as usize);
    let taps = taps(h, height as usize);
    let src = img.as_raw();
    let stride = w as usize * 3;
    let mut out = RgbImage::new(w, height);
    for (t, row) in taps.iter().zip(out.rows_mut()) {
        for (x, px) in row.enumerate() {
            for c in 0..3 {
                px[c] = convolve(t, |i| src[i * stride + x * 3 + c]);
            }
        }
    }
    out
}

/// `img` resized to `width x height` exactly as Pillow's bicubic `Image.resize`; a pass whose
/// axis keeps its size is skipped, as Pillow skips it.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let wide = if width != img.width() {
        horizontal(img, width)
    } else {
        img.clone()
    };
    if height != img.height() {
        vertical(&wide, height)
    } else {
        wide
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_stretches_the_kernel_by_the_scale_factor() {
        // 300 -> 48 scales by 6.25: the window spans 2 * 2 * 6.25 source pixels.
        let t = taps(300, 48);
        assert_eq!(t[20].weights.len(), 25);
        // Enlarging keeps the four taps of the plain cubic kernel.
        assert!(taps(17, 32)[10..20].iter().all(|t| t.weights.len() == 4));
    }

    #[test]
    fn fixed_point_weights_sum_to_one_within_their_rounding() {
        for (from, to) in [(17, 32), (40, 75), (300, 48), (224, 32), (31, 32)] {
            for t in taps(from, to) {
                let sum: i32 = t.weights.iter().sum();
                let slack = t.weights.len() as i32;
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= slack,
                    "{from}->{to}: {sum}"
                );
            }
        }
    }

    #[test]
    fn overshoot_at_hard_edges_is_clamped() {
        // A black/white step: the cubic's negative lobes ring below 0 and above 255.
        let img = RgbImage::from_fn(8, 1, |x, _| image::Rgb([if x < 4 { 0 } else { 255 }; 3]));
        let out = resize(&img, 20, 1);
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(row[0], 0);
        assert_eq!(row[19], 255);
        assert!(row.windows(2).all(|w| w[0] <= w[1]), "{row:?}");
    }
}
