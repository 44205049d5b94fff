//! Padded 2-d max-pooling as our own op. candle's `max_pool2d` has no padding, refuses
//! backward when kernel != stride and returns wrong gradients when they are equal; this op
//! routes each output's gradient to the first maximum of its window, as PyTorch does.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{buffer, with_f32};

/// Window geometry of one pooling call on `[N, C, H, W]`.
#[derive(Debug, Clone, Copy)]
struct Pool {
    kernel: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

impl Pool {
    /// The in-image range of the window taps along an axis of `n` pixels for output `o`.
    #[inline(always)]
    fn taps(&self, o: usize, n: usize) -> std::ops::Range<usize> {
        let first = o * self.stride;
        first.saturating_sub(self.padding)
            ..(first + self.kernel).saturating_sub(self.padding).min(n)
    }

    /// `f(iy * W + ix)` for each in-image input pixel of output `(oy, ox)`'s window, row by
    /// row.
    #[inline(always)]
    fn for_each_tap(&self, oy: usize, ox: usize, mut f: impl FnMut(usize)) {
        for iy in self.taps(oy, self.h) {
            for ix in self.taps(ox, self.w) {
                f(iy * self.w + ix);
            }
        }
    }

    /// `f(output offset in the plane, offset of the first maximum of its window)` for every
    /// output of one `[H, W]` plane, the first in row-major window order as PyTorch picks it.
    /// Each input row's first maximum over every window's columns comes first, then, per
    /// window, the first of its rows holding the largest of those: the same pixel, with six
    /// comparisons for a 3x3 window instead of nine, each a select rather than a branch (which
    /// tap wins is data, not predictable), and the rows combined a whole output row at a time.
    fn each(&self, plane: &[f32], mut f: impl FnMut(usize, usize)) {
        let (w, ow) = (self.w, self.ow);
        // Per input row and output column: the maximum over the window's columns and the
        // pixel it is at.
        let (mut row_max, mut row_at) = (vec![0f32; self.h * ow], vec![0u32; self.h * ow]);
        let rows = plane.chunks_exact(w).zip(row_max.chunks_exact_mut(ow));
        for (iy, ((row, max), at)) in rows.zip(row_at.chunks_exact_mut(ow)).enumerate() {
            for (ox, (max, at)) in max.iter_mut().zip(at).enumerate() {
                let cols = self.taps(ox, w);
                let window = &row[cols.clone()];
                let mut best = (window[0], 0);
                for (j, &v) in window.iter().enumerate().skip(1) {
                    best = if v > best.0 { (v, j) } else { best };
                }
                (*max, *at) = (best.0, (iy * w + cols.start + best.1) as u32);
            }
        }
        let (mut max, mut at) = (vec![0f32; ow], vec![0u32; ow]);
        for oy in 0..self.oh {
            let mut rows = self.taps(oy, self.h);
            let first = rows.next().unwrap_or(0) * ow;
            max.copy_from_slice(&row_max[first..first + ow]);
            at.copy_from_slice(&row_at[first..first + ow]);
            for iy in rows {
                let (rm, ra) = (
                    &row_max[iy * ow..(iy + 1) * ow],
                    &row_at[iy * ow..(iy + 1) * ow],
                );
                for (((m, a), &v), &p) in max.iter_mut().zip(at.iter_mut()).zip(rm).zip(ra) {
                    // All ones where the row's maximum is larger: a blend of bits, which
                    // vectorises where a select of two values compiles to a branch.
                    let take = ((v > *m) as u32).wrapping_neg();
                    *m = f32::from_bits(m.to_bits() ^ ((m.to_bits() ^ v.to_bits()) & take));
                    *a ^= (*a ^ p) & take;
                }
            }
            for (ox, &p) in at.iter().enumerate() {
                f(oy * ow + ox, p as usize);
            }
        }
    }
}

struct MaxPool(Pool);

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "spikeclip-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("max_pool2d: non-contiguous input".into()))?;
        let x = &storage.as_slice::<f32>()?[start..end];
        let dims = layout.dims();
        let p = self.0;
        // Planes are independent: one task each.
        let (plane, out_plane) = (p.h * p.w, p.oh * p.ow);
        let out = buffer::zeroed_by_chunks(dims[0] * dims[1] * out_plane, out_plane, |i, out| {
            let x = &x[i * plane..(i + 1) * plane];
            p.each(x, |o, i| out[o] = x[i])
        });
        Ok((
            CpuStorage::F32(out),
            Shape::from((dims[0], dims[1], p.oh, p.ow)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let p = self.0;
        let (plane, out_plane) = (p.h * p.w, p.oh * p.ow);
        let grad = with_f32(arg, "max_pool2d", |x| {
            with_f32(grad_res, "max_pool2d", |g| {
                Ok(buffer::zeroed_by_chunks(x.len(), plane, |i, grad| {
                    let g = &g[i * out_plane..(i + 1) * out_plane];
                    p.each(&x[i * plane..(i + 1) * plane], |o, i| grad[i] += g[o])
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(grad, arg.shape(), arg.device())?))
    }
}

/// 2-d max-pooling of `[N, C, H, W]` f32 with square kernel, stride and implicit `-inf`
/// padding, as `torch.nn.MaxPool2d(kernel, stride, padding)`.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let pool = Pool::nchw(x, (kernel, stride, padding))?;
    super::layout::contiguous(x)?.apply_op1(MaxPool(pool))
}

/// [`max_pool2d`] of channels-last `[N, H, W, C]` f32, inference only (no gradient): every
/// output pixel is the elementwise maximum of its window's channel vectors, which vectorises
/// over channels.
pub fn max_pool2d_channels_last(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (n, h, w, c) = x.dims4()?;
    let p = Pool::new((kernel, stride, padding), (h, w))?;
    let out = super::with_f32(x, "max_pool2d", |x| {
        let mut out = vec![0f32; n * p.oh * p.ow * c];
        if c == 0 {
            return Ok(out);
        }
        // One task per output row of one image.
        out.par_chunks_mut(p.ow * c)
            .enumerate()
            .for_each(|(row, out)| {
                let image = &x[row / p.oh * h * w * c..(row / p.oh + 1) * h * w * c];
                for (ox, out) in out.chunks_exact_mut(c).enumerate() {
                    let mut first = true;
                    p.for_each_tap(row % p.oh, ox, |idx| {
                        let pixel = &image[idx * c..(idx + 1) * c];
                        if first {
                            out.copy_from_slice(pixel);
                            first = false;
                        } else {
                            for (o, &v) in out.iter_mut().zip(pixel) {
                                // A select, not a branch, so that it vectorises.
                                *o = if v > *o { v } else { *o };
                            }
                        }
                    });
                }
            });
        Ok(out)
    })?;
    Tensor::from_vec(out, (n, p.oh, p.ow, c), x.device())
}

impl Pool {
    /// The geometry of `torch.nn.MaxPool2d(kernel, stride, padding)` on `x [N, C, H, W]`.
    fn nchw(x: &Tensor, window: (usize, usize, usize)) -> Result<Self> {
        let (_, _, h, w) = x.dims4()?;
        Self::new(window, (h, w))
    }

    /// Geometry of `(kernel, stride, padding)` pooling over an `h x w` input, checked.
    fn new(
        (kernel, stride, padding): (usize, usize, usize),
        (h, w): (usize, usize),
    ) -> Result<Self> {
        if kernel == 0
            || stride == 0
            || 2 * padding > kernel
            || h + 2 * padding < kernel
            || w + 2 * padding < kernel
        {
            candle_core::bail!(
            "max_pool2d: invalid kernel {kernel}, stride {stride}, padding {padding} for {h}x{w}"
        )
        }
        let out = |n: usize| (n + 2 * padding - kernel) / stride + 1;
        Ok(Pool {
            kernel,
            stride,
            padding,
            h,
            w,
            oh: out(h),
            ow: out(w),
        })
    }
}

/// The gradient of `x` through [`max_pool2d`] given the output's, `grad`: for fused ops that
/// pool inside their own backward.
pub fn max_pool2d_grad(
    x: &Tensor,
    grad: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let op = MaxPool(Pool::nchw(x, (kernel, stride, padding))?);
    match op.bwd(x, grad, grad)? {
        Some(g) => Ok(g),
        None => candle_core::bail!("max_pool2d: backward gave no gradient"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn channels_last_pooling_is_the_transposed_pooling() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (3, 5, 7, 9), &Device::Cpu)?;
        let nchw = max_pool2d(&x, 3, 2, 1)?;
        let nhwc = max_pool2d_channels_last(&x.permute((0, 2, 3, 1))?, 3, 2, 1)?;
        let back = nhwc
            .permute((0, 3, 1, 2))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(back, nchw.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// Each output's maximum and the offset of its first maximum in row-major window order,
    /// tap by tap, as PyTorch's CPU kernel scans it.
    fn direct(
        vals: &[f32],
        (h, w): (usize, usize),
        (k, s, p): (usize, usize, usize),
    ) -> (Vec<f32>, Vec<usize>) {
        let out = |n: usize| (n + 2 * p - k) / s + 1;
        let (mut maxima, mut argmax) = (Vec::new(), Vec::new());
        for oy in 0..out(h) as i64 {
            for ox in 0..out(w) as i64 {
                let mut best = (f32::NEG_INFINITY, usize::MAX);
                for dy in 0..k as i64 {
                    for dx in 0..k as i64 {
                        let (iy, ix) =
                            (oy * s as i64 - p as i64 + dy, ox * s as i64 - p as i64 + dx);
                        if (0..h as i64).contains(&iy) && (0..w as i64).contains(&ix) {
                            let idx = (iy * w as i64 + ix) as usize;
                            if best.1 == usize::MAX || vals[idx] > best.0 {
                                best = (vals[idx], idx);
                            }
                        }
                    }
                }
                maxima.push(best.0);
                argmax.push(best.1);
            }
        }
        (maxima, argmax)
    }

    /// Values and gradients against [`direct`] for several windows, on inputs of three levels
    /// only, so that most windows hold tied maxima and the first of them must get the gradient.
    #[test]
    fn matches_a_direct_loop_and_routes_gradients_to_the_first_maxima() -> Result<()> {
        let dev = Device::Cpu;
        for (h, w) in [(5, 6), (8, 8), (7, 3)] {
            for window in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0)] {
                let vals: Vec<f32> = (0..h * w).map(|i| ((i * 37 % 29) % 3) as f32).collect();
                let x = Var::from_vec(vals.clone(), (1, 1, h, w), &dev)?;
                let y = max_pool2d(x.as_tensor(), window.0, window.1, window.2)?;
                let (expected, argmax) = direct(&vals, (h, w), window);
                assert_eq!(
                    y.flatten_all()?.to_vec1::<f32>()?,
                    expected,
                    "{h}x{w} {window:?}"
                );
                let weights: Vec<f32> = (0..argmax.len()).map(|o| o as f32 + 1.0).collect();
                let weighted = (y.flatten_all()? * Tensor::new(weights.as_slice(), &dev)?)?;
                let grads = weighted.sum_all()?.backward()?;
                let g = grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
                let mut want = vec![0f32; h * w];
                for (o, i) in argmax.into_iter().enumerate() {
                    want[i] += weights[o];
                }
                assert_eq!(g, want, "{h}x{w} {window:?}");
            }
        }
        Ok(())
    }
}
