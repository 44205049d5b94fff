//! Padded 2-d max-pooling as our own op. candle's `max_pool2d` has no padding, refuses
//! backward when kernel != stride and returns wrong gradients when they are equal; this op
//! routes each output's gradient to the first maximum of its window, as PyTorch does.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::with_f32;

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
    /// Index in `plane` (one `[H, W]` input plane) of the first maximum of output `(oy, ox)`'s
    /// window.
    fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> usize {
        let mut best = (f32::NEG_INFINITY, usize::MAX);
        self.for_each_tap(oy, ox, |idx| {
            if best.1 == usize::MAX || plane[idx] > best.0 {
                best = (plane[idx], idx);
            }
        });
        best.1
    }

    /// `f(iy * W + ix)` for each in-image input pixel of output `(oy, ox)`'s window, row by
    /// row.
    #[inline(always)]
    fn for_each_tap(&self, oy: usize, ox: usize, mut f: impl FnMut(usize)) {
        for dy in 0..self.kernel {
            let iy = (oy * self.stride + dy).wrapping_sub(self.padding);
            if iy >= self.h {
                continue;
            }
            for dx in 0..self.kernel {
                let ix = (ox * self.stride + dx).wrapping_sub(self.padding);
                if ix < self.w {
                    f(iy * self.w + ix);
                }
            }
        }
    }

    /// `f(output offset in the plane, argmax input offset in the plane)` for every output of
    /// one `[H, W]` plane.
    fn each(&self, plane: &[f32], mut f: impl FnMut(usize, usize)) {
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                f(oy * self.ow + ox, self.argmax(plane, oy, ox));
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
        let mut out = vec![0f32; dims[0] * dims[1] * p.oh * p.ow];
        // Planes are independent: one task each.
        out.par_chunks_mut(p.oh * p.ow)
            .zip(x.par_chunks(p.h * p.w))
            .for_each(|(out, x)| p.each(x, |o, i| out[o] = x[i]));
        Ok((
            CpuStorage::F32(out),
            Shape::from((dims[0], dims[1], p.oh, p.ow)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let p = self.0;
        let mut grad = vec![0f32; arg.elem_count()];
        with_f32(arg, "max_pool2d", |x| {
            with_f32(grad_res, "max_pool2d", |g| {
                grad.par_chunks_mut(p.h * p.w)
                    .zip(x.par_chunks(p.h * p.w))
                    .zip(g.par_chunks(p.oh * p.ow))
                    .for_each(|((grad, x), g)| p.each(x, |o, i| grad[i] += g[o]));
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(grad, arg.shape(), arg.device())?))
    }
}

/// 2-d max-pooling of `[N, C, H, W]` f32 with square kernel, stride and implicit `-inf`
/// padding, as `torch.nn.MaxPool2d(kernel, stride, padding)`.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let pool = Pool::nchw(x, (kernel, stride, padding))?;
    x.contiguous()?.apply_op1(MaxPool(pool))
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

    #[test]
    fn matches_a_direct_loop_and_routes_gradients_to_the_maxima() -> Result<()> {
        let dev = Device::Cpu;
        let (h, w) = (5, 6);
        let vals: Vec<f32> = (0..h * w).map(|i| ((i * 37 % 29) as f32) - 14.0).collect();
        let x = Var::from_vec(vals.clone(), (1, 1, h, w), &dev)?;
        let y = max_pool2d(x.as_tensor(), 3, 2, 1)?;
        assert_eq!(y.dims(), &[1, 1, 3, 3]);
        let got = y.flatten_all()?.to_vec1::<f32>()?;
        let mut expected = Vec::new();
        let mut argmax = Vec::new();
        for oy in 0..3i64 {
            for ox in 0..3i64 {
                let mut best = (f32::NEG_INFINITY, 0);
                for dy in 0..3 {
                    for dx in 0..3 {
                        let (iy, ix) = (oy * 2 - 1 + dy, ox * 2 - 1 + dx);
                        if (0..h as i64).contains(&iy) && (0..w as i64).contains(&ix) {
                            let idx = (iy * w as i64 + ix) as usize;
                            if vals[idx] > best.0 {
                                best = (vals[idx], idx);
                            }
                        }
                    }
                }
                expected.push(best.0);
                argmax.push(best.1);
            }
        }
        assert_eq!(got, expected);
        let grads = y.sum_all()?.backward()?;
        let g = grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
        let mut want = vec![0f32; h * w];
        for i in argmax {
            want[i] += 1.0;
        }
        assert_eq!(g, want);
        Ok(())
    }
}
