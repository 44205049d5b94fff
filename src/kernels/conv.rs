//! 2-D convolution as im2col + matmul, forward and backward.
//!
//! candle's conv2d reaches about 45 GFLOP/s forward and 8-22 backward (its input gradient goes
//! through conv_transpose2d); its matmul reaches about 116. Here the input is laid out
//! channels-last so that every patch row is a run of `C`-long memcpys, each chunk of images is one
//! `[n*Ho*Wo, kh*kw*C] x [kh*kw*C, O]` matmul, and the input gradient is the adjoint scatter
//! (col2im) of the matmul's gradient. The patch matrix is nine times the input, so it is never
//! kept for backward: one op holds only the input and the weight, as candle's conv2d does, and
//! rebuilds each chunk's patches when the gradient arrives.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{self, Level};
use super::{buffer, contiguous_f32, layout, with_f32};

/// Geometry of a square-stride, square-padding convolution window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub stride: usize,
}

impl Window {
    /// The 1x1 window of a linear layer seen as a convolution.
    pub const POINTWISE: Window = Window {
        kh: 1,
        kw: 1,
        padding: 0,
        stride: 1,
    };

    pub(super) fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (ph, pw) = (h + 2 * self.padding, w + 2 * self.padding);
        if self.stride == 0 || ph < self.kh || pw < self.kw {
            candle_core::bail!("conv window {self:?} does not fit a {h}x{w} input")
        }
        Ok((
            (ph - self.kh) / self.stride + 1,
            (pw - self.kw) / self.stride + 1,
        ))
    }

    /// Input coordinate read by output coordinate `o` at kernel offset `k`, if inside the image.
    #[inline(always)]
    pub(super) fn source(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.padding)
            .filter(|&i| i < len)
    }

    /// Calls `f(patch_offset, image_offset)` for each in-image tap of output pixel (oy, ox):
    /// offsets of a `c`-channel run in the patch row (ordered ky, kx, c) and in a `[H, W, C]`
    /// image. im2col copies along these pairs and col2im adds back along them.
    #[inline(always)]
    fn for_each_tap(&self, (oy, ox): (usize, usize), d: Nhwc, mut f: impl FnMut(usize, usize)) {
        for ky in 0..self.kh {
            let Some(iy) = self.source(oy, ky, d.h) else {
                continue;
            };
            for kx in 0..self.kw {
                if let Some(ix) = self.source(ox, kx, d.w) {
                    f((ky * self.kw + kx) * d.c, (iy * d.w + ix) * d.c);
                }
            }
        }
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.padding == 0 && self.stride == 1
    }
}

/// Channels-last dimensions `[B, H, W, C]`.
#[derive(Debug, Clone, Copy)]
struct Nhwc {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

/// im2col over channels-last images `x [B, H, W, C]`: `[B*Ho*Wo, kh*kw*C]`, columns ordered
/// (ky, kx, c), zeros where the window hangs over the padding.
fn im2col(x: &[f32], d: Nhwc, win: Window, (ho, wo): (usize, usize)) -> Vec<f32> {
    let row = win.kh * win.kw * d.c;
    let image_len = d.h * d.w * d.c;
    // One task per (image, output row): disjoint output, each patch row a few memcpys.
    buffer::zeroed_by_chunks(d.b * ho * wo * row, wo * row, |task, out| {
        let (bi, oy) = (task / ho, task % ho);
        let image = &x[bi * image_len..(bi + 1) * image_len];
        for (ox, patch) in out.chunks_exact_mut(row).enumerate() {
            win.for_each_tap((oy, ox), d, |dst, src| {
                patch[dst..dst + d.c].copy_from_slice(&image[src..src + d.c]);
            });
        }
    })
}

/// The adjoint of [`im2col`]: scatters-and-adds patch rows back into `[B, H, W, C]`, the adds
/// on the instruction set `level`.
fn col2im(level: Level, cols: &[f32], d: Nhwc, win: Window, (ho, wo): (usize, usize)) -> Vec<f32> {
    let row = win.kh * win.kw * d.c;
    let image_len = d.h * d.w * d.c;
    // One task per image: overlapping windows only ever add within their own image.
    buffer::zeroed_by_chunks(d.b * image_len, image_len, |bi, image| {
        let image_cols = &cols[bi * ho * wo * row..(bi + 1) * ho * wo * row];
        simd::on_level!(level, {
            for (p, patch) in image_cols.chunks_exact(row).enumerate() {
                win.for_each_tap((p / wo, p % wo), d, |src, dst| {
                    for (o, g) in image[dst..dst + d.c].iter_mut().zip(&patch[src..src + d.c]) {
                        *o += g;
                    }
                });
            }
        })
    })
}

/// Pixels per tile of [`nhwc_into_nchw`]: one 64-byte line of each channel plane written per
/// tile, the tile's `C`-long pixel rows read from L1.
const TRANSPOSE_PIXELS: usize = 16;

/// Writes channels-last images `src [n, hw, c]` channels-first into `dst [n, c, hw]`: the
/// layout change a convolution's output and input gradient take on their way out, done in one
/// pass over each image (one task per image) instead of a strided copy and two more.
fn nhwc_into_nchw(src: &[f32], dst: &mut [f32], hw: usize, c: usize) {
    dst.par_chunks_mut(hw * c)
        .zip(src.par_chunks(hw * c))
        .for_each(|(planes, image)| {
            for p0 in (0..hw).step_by(TRANSPOSE_PIXELS) {
                let pixels = p0..(p0 + TRANSPOSE_PIXELS).min(hw);
                for (ch, plane) in planes.chunks_exact_mut(hw).enumerate() {
                    for p in pixels.clone() {
                        plane[p] = image[p * c + ch];
                    }
                }
            }
        });
}

/// Weight `[O, C, kh, kw]` as the `[O, kh*kw*C]` matrix matching the patch columns' order.
pub fn weight_matrix(weight: &Tensor) -> Result<Tensor> {
    let o = weight.dim(0)?;
    weight.permute((0, 2, 3, 1))?.reshape((o, ()))
}

/// Patch-matrix floats per chunk of images (32 MiB): large enough for full-speed matmuls,
/// small enough that the transient patches stay a fraction of the activations.
const CHUNK_FLOATS: usize = 8 << 20;

/// One convolution's geometry, resolved against its input.
struct Conv2d {
    window: Window,
    /// Patch-matrix floats per chunk, [`CHUNK_FLOATS`] outside tests.
    chunk_floats: usize,
}

/// The shapes a [`Conv2d`] works with.
struct Plan {
    d: Nhwc,
    o: usize,
    out_hw: (usize, usize),
    /// Images per chunk.
    chunk: usize,
}

impl Conv2d {
    fn new(weight: &Tensor, padding: usize, stride: usize, chunk_floats: usize) -> Result<Self> {
        let (_, _, kh, kw) = weight.dims4()?;
        Ok(Self {
            window: Window {
                kh,
                kw,
                padding,
                stride,
            },
            chunk_floats,
        })
    }

    fn plan(&self, x: &[usize], w: &[usize]) -> Result<Plan> {
        let (&[b, c, h, w_], &[o, wc, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected input [B, C, H, W] and weight [O, C, kh, kw], got {x:?} and {w:?}")
        };
        if wc != c || (kh, kw) != (self.window.kh, self.window.kw) {
            candle_core::bail!("conv2d: input has {c} channels, weight {w:?} expects {wc}")
        }
        let out_hw = self.window.out_size(h, w_)?;
        let per_image = out_hw.0 * out_hw.1 * kh * kw * c;
        Ok(Plan {
            d: Nhwc { b, h, w: w_, c },
            o,
            out_hw,
            chunk: (self.chunk_floats / per_image.max(1)).clamp(1, b.max(1)),
        })
    }

    /// Patches `[n*Ho*Wo, kh*kw*C]` of images `first..first + n` of `x [B, C, H, W]`.
    fn patches(&self, x: &Tensor, plan: &Plan, first: usize, n: usize) -> Result<Tensor> {
        let nhwc = layout::contiguous(&x.narrow(0, first, n)?.permute((0, 2, 3, 1))?)?;
        let d = Nhwc { b: n, ..plan.d };
        let (ho, wo) = plan.out_hw;
        let rows = n * ho * wo;
        if self.window.is_pointwise() {
            return nhwc.reshape((rows, d.c));
        }
        let cols = im2col(&nhwc.flatten_all()?.to_vec1()?, d, self.window, plan.out_hw);
        Tensor::from_vec(cols, (rows, ()), x.device())
    }

    /// The chunks of images, `(first, n)`.
    fn chunks(plan: &Plan) -> impl Iterator<Item = (usize, usize)> {
        let (b, chunk) = (plan.d.b, plan.chunk);
        (0..b)
            .step_by(chunk)
            .map(move |first| (first, chunk.min(b - first)))
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let plan = self.plan(xl.dims(), wl.dims())?;
        let dev = Device::Cpu;
        let x = Tensor::from_slice(contiguous_f32(xs, xl, "conv2d")?, xl.shape(), &dev)?;
        let w = Tensor::from_slice(contiguous_f32(ws, wl, "conv2d")?, wl.shape(), &dev)?;
        let wt = weight_matrix(&w)?.t()?;
        let (ho, wo) = plan.out_hw;
        let image_len = plan.o * ho * wo;
        let mut out = vec![0f32; plan.d.b * image_len];
        for (first, n) in Self::chunks(&plan) {
            let y = self.patches(&x, &plan, first, n)?.matmul(&wt)?;
            let dst = &mut out[first * image_len..(first + n) * image_len];
            with_f32(&y, "conv2d", |y| {
                nhwc_into_nchw(y, dst, ho * wo, plan.o);
                Ok(())
            })?;
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((plan.d.b, plan.o, ho, wo)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad_x, grad_w) = self.grads(x.dims(), Some(x), w, grad)?;
        Ok((Some(grad_x), grad_w))
    }
}

impl Conv2d {
    /// The input gradient for an input of `x_dims` and, if the input `x` is given, the weight
    /// gradient.
    fn grads(
        &self,
        x_dims: &[usize],
        x: Option<&Tensor>,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (w, grad) = (w.detach(), grad.detach());
        let x = x.map(Tensor::detach);
        let plan = self.plan(x_dims, w.dims())?;
        let wm = weight_matrix(&w)?;
        let (ho, wo) = plan.out_hw;
        let mut grad_wm = match x {
            Some(_) => Some(Tensor::zeros(wm.shape(), DType::F32, w.device())?),
            None => None,
        };
        let Nhwc { h, w: width, c, .. } = plan.d;
        let image_len = h * width * c;
        let mut grad_x = buffer::zeroed(plan.d.b * image_len);
        for (first, n) in Self::chunks(&plan) {
            let g = grad.narrow(0, first, n)?.reshape((n, plan.o, ho * wo))?;
            let g = layout::contiguous(&g.transpose(1, 2)?)?.reshape((n * ho * wo, plan.o))?;
            if let (Some(x), Some(sum)) = (&x, grad_wm.as_mut()) {
                let cols = self.patches(x, &plan, first, n)?;
                *sum = (&*sum + g.t()?.matmul(&cols)?)?;
            }
            let grad_cols = g.matmul(&wm)?;
            let d = Nhwc { b: n, ..plan.d };
            let dst = &mut grad_x[first * image_len..(first + n) * image_len];
            with_f32(&grad_cols, "conv2d backward", |cols| {
                if self.window.is_pointwise() {
                    nhwc_into_nchw(cols, dst, h * width, c);
                } else {
                    let image = col2im(simd::COL2IM.level(), cols, d, self.window, plan.out_hw);
                    nhwc_into_nchw(&image, dst, h * width, c);
                }
                Ok(())
            })?;
        }
        let grad_w = grad_wm
            .map(|gw| {
                let channels_last = gw.reshape((plan.o, self.window.kh, self.window.kw, c))?;
                layout::contiguous(&channels_last.permute((0, 3, 1, 2))?)
            })
            .transpose()?;
        let grad_x = Tensor::from_vec(grad_x, x_dims, w.device())?;
        Ok((grad_x, grad_w))
    }
}

/// `conv2d(x [B, C, H, W], weight [O, C, kh, kw]) -> [B, O, Ho, Wo]`, same results as candle's
/// `Tensor::conv2d(weight, padding, stride, 1, 1)`, differentiable in both arguments.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    chunked_conv2d(x, weight, padding, stride, CHUNK_FLOATS)
}

/// Gradients of [`conv2d`]`(x, weight, padding, stride)` with respect to `x` and `weight`,
/// given the gradient of its output: for fused ops that run the convolution inside their own
/// backward.
pub fn conv2d_grads(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<(Tensor, Tensor)> {
    let op = Conv2d::new(weight, padding, stride, CHUNK_FLOATS)?;
    match op.grads(x.dims(), Some(x), weight, grad)? {
        (gx, Some(gw)) => Ok((gx, gw)),
        _ => candle_core::bail!("conv2d: backward gave no weight gradient"),
    }
}

/// The input gradient alone of [`conv2d`] on an input of `x_dims`: it needs only the weight,
/// for layers that get their weight gradient another way.
pub fn conv2d_input_grad(
    x_dims: &[usize],
    weight: &Tensor,
    grad: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let op = Conv2d::new(weight, padding, stride, CHUNK_FLOATS)?;
    Ok(op.grads(x_dims, None, weight, grad)?.0)
}

fn chunked_conv2d(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    chunk_floats: usize,
) -> Result<Tensor> {
    let op = Conv2d::new(weight, padding, stride, chunk_floats)?;
    op.plan(x.dims(), weight.dims())?;
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::*;
    use candle_core::{Device, Var};

    /// Forward, input gradient and weight gradient against candle's conv2d.
    fn check((b, c, h, w): (usize, usize, usize, usize), o: usize, win: Window) {
        check_chunked((b, c, h, w), o, win, CHUNK_FLOATS)
    }

    fn check_chunked(
        (b, c, h, w): (usize, usize, usize, usize),
        o: usize,
        win: Window,
        chunk_floats: usize,
    ) {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
        let wt = Var::randn(0f32, 1.0, (o, c, win.kh, win.kw), &dev).unwrap();
        let (pad, stride) = (win.padding, win.stride);
        let ours =
            chunked_conv2d(x.as_tensor(), wt.as_tensor(), pad, stride, chunk_floats).unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), win.padding, win.stride, 1, 1)
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        assert!(max_rel_diff(&ours, &theirs) < 1e-4, "forward differs");
        assert_same_gradients(ours, theirs, &[&x, &wt], 1e-4);
    }

    #[test]
    fn matches_candle_3x3_padded() {
        check(
            (3, 5, 7, 9),
            6,
            Window {
                kh: 3,
                kw: 3,
                padding: 1,
                stride: 1,
            },
        );
    }

    #[test]
    fn matches_candle_1x1() {
        check(
            (2, 7, 5, 3),
            11,
            Window {
                kh: 1,
                kw: 1,
                padding: 0,
                stride: 1,
            },
        );
    }

    /// candle's own conv2d backward fails when the stride does not divide the padded extent,
    /// so the strided cases keep it divisible.
    #[test]
    fn matches_candle_strided_unpadded() {
        check(
            (2, 3, 9, 9),
            4,
            Window {
                kh: 3,
                kw: 3,
                padding: 0,
                stride: 2,
            },
        );
    }

    #[test]
    fn matches_candle_strided_padded_1x1() {
        check(
            (2, 4, 7, 7),
            5,
            Window {
                kh: 1,
                kw: 1,
                padding: 1,
                stride: 2,
            },
        );
    }

    /// Chunks of two images, the last one short: 5 images of 7*9 patches of 5*9 floats.
    #[test]
    fn matches_candle_in_chunks() {
        let win = Window {
            kh: 3,
            kw: 3,
            padding: 1,
            stride: 1,
        };
        check_chunked((5, 5, 7, 9), 6, win, 2 * 7 * 9 * 5 * 9);
    }

    #[test]
    fn rejects_mismatched_channels() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 4, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let err = conv2d(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(err.contains("3 channels"), "{err}");
    }

    /// col2im's sums, bit for bit the same on every instruction set this CPU has.
    #[test]
    fn col2im_is_the_same_on_every_simd_level() {
        if !Level::Avx512.supported() {
            println!("skipped the avx512 path: this CPU lacks AVX-512");
        }
        let d = Nhwc {
            b: 2,
            h: 7,
            w: 6,
            c: 37,
        };
        let win = Window {
            kh: 3,
            kw: 3,
            padding: 1,
            stride: 1,
        };
        let out_hw = win.out_size(d.h, d.w).unwrap();
        let cols: Vec<f32> = (0..d.b * out_hw.0 * out_hw.1 * 9 * d.c)
            .map(|i| (i as f32 * 0.618).fract() - 0.5)
            .collect();
        let portable = col2im(Level::Portable, &cols, d, win, out_hw);
        for level in Level::supported_levels() {
            assert_eq!(col2im(level, &cols, d, win, out_hw), portable, "{level}");
        }
    }
}
