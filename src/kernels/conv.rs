//! 2-D convolution as im2col + one large matmul, forward and backward.
//!
//! candle's conv2d reaches about 45 GFLOP/s forward and 8-22 backward (its input gradient goes
//! through conv_transpose2d); its matmul reaches about 116. Here the input is laid out channels-last
//! so that every patch row is a run of `C`-long memcpys, the convolution is a single
//! `[B*Ho*Wo, kh*kw*C] x [kh*kw*C, O]` matmul, and the input gradient is the adjoint scatter
//! (col2im) of the matmul's gradient; candle's autograd supplies the matmul and layout gradients.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;

/// Geometry of a square-stride, square-padding convolution window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    pub stride: usize,
}

impl Window {
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
    #[inline]
    pub(super) fn source(&self, o: usize, k: usize, len: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.padding)
            .filter(|&i| i < len)
    }

    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.padding == 0 && self.stride == 1
    }
}

/// Channels-last input dimensions `[B, H, W, C]`.
#[derive(Debug, Clone, Copy)]
struct Nhwc {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

/// im2col over a channels-last `[B, H, W, C]` input: `[B*Ho*Wo, kh*kw*C]`, columns ordered
/// (ky, kx, c), zeros where the window hangs over the padding.
struct Im2Col(Window);

/// The adjoint of [`Im2Col`]: scatters-and-adds patch rows back into `[B, H, W, C]`.
struct Col2Im {
    window: Window,
    dims: Nhwc,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "im2col")?;
        let (b, h, w, c) = layout.shape().dims4()?;
        let win = self.0;
        let (ho, wo) = win.out_size(h, w)?;
        let row = win.kh * win.kw * c;
        let mut cols = vec![0f32; b * ho * wo * row];
        // One task per (image, output row): disjoint output, each patch row a few memcpys.
        cols.par_chunks_mut(wo * row)
            .enumerate()
            .for_each(|(task, out)| {
                let (bi, oy) = (task / ho, task % ho);
                let image = &x[bi * h * w * c..(bi + 1) * h * w * c];
                for (ox, patch) in out.chunks_exact_mut(row).enumerate() {
                    for ky in 0..win.kh {
                        let Some(iy) = win.source(oy, ky, h) else {
                            continue;
                        };
                        for kx in 0..win.kw {
                            let Some(ix) = win.source(ox, kx, w) else {
                                continue;
                            };
                            let dst = (ky * win.kw + kx) * c;
                            let src = (iy * w + ix) * c;
                            patch[dst..dst + c].copy_from_slice(&image[src..src + c]);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(cols), Shape::from((b * ho * wo, row))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, w, c) = arg.dims4()?;
        let col2im = Col2Im {
            window: self.0,
            dims: Nhwc { b, h, w, c },
        };
        Ok(Some(grad_res.contiguous()?.apply_op1(col2im)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(storage, layout, "col2im")?;
        let Nhwc { b, h, w, c } = self.dims;
        let win = self.window;
        let (ho, wo) = win.out_size(h, w)?;
        let row = win.kh * win.kw * c;
        if layout.shape().dims() != [b * ho * wo, row] {
            candle_core::bail!(
                "col2im: got {:?}, expected [{}, {row}]",
                layout.shape(),
                b * ho * wo
            )
        }
        let mut x = vec![0f32; b * h * w * c];
        // One task per image: overlapping windows only ever add within their own image.
        x.par_chunks_mut(h * w * c)
            .enumerate()
            .for_each(|(bi, image)| {
                let image_cols = &cols[bi * ho * wo * row..(bi + 1) * ho * wo * row];
                for (p, patch) in image_cols.chunks_exact(row).enumerate() {
                    let (oy, ox) = (p / wo, p % wo);
                    for ky in 0..win.kh {
                        let Some(iy) = win.source(oy, ky, h) else {
                            continue;
                        };
                        for kx in 0..win.kw {
                            let Some(ix) = win.source(ox, kx, w) else {
                                continue;
                            };
                            let src = (ky * win.kw + kx) * c;
                            let dst = (iy * w + ix) * c;
                            for (o, g) in image[dst..dst + c].iter_mut().zip(&patch[src..src + c]) {
                                *o += g;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(x), Shape::from((b, h, w, c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.window))?))
    }
}

/// Patch matrix `[B*Ho*Wo, kh*kw*C]` of a `[B, C, H, W]` input (columns ordered ky, kx, c),
/// differentiable; also the entry point of the spike-driven convolution.
pub fn im2col(x: &Tensor, window: Window) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let nhwc = x.permute((0, 2, 3, 1))?.contiguous()?;
    if window.is_pointwise() {
        let c = nhwc.dim(3)?;
        return nhwc.reshape((b * h * w, c));
    }
    nhwc.apply_op1(Im2Col(window))
}

/// Weight `[O, C, kh, kw]` as the `[O, kh*kw*C]` matrix matching [`im2col`]'s column order.
pub fn weight_matrix(weight: &Tensor) -> Result<Tensor> {
    let o = weight.dim(0)?;
    weight.permute((0, 2, 3, 1))?.reshape((o, ()))
}

/// `conv2d(x [B, C, H, W], weight [O, C, kh, kw]) -> [B, O, Ho, Wo]`, same results as candle's
/// `Tensor::conv2d(weight, padding, stride, 1, 1)`, differentiable in both arguments.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        candle_core::bail!("conv2d: input has {c} channels, weight expects {wc}")
    }
    let window = Window {
        kh,
        kw,
        padding,
        stride,
    };
    let (ho, wo) = window.out_size(h, w)?;
    let cols = im2col(x, window)?;
    let out = cols.matmul(&weight_matrix(weight)?.t()?)?;
    out.reshape((b, ho, wo, o))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        (diff.to_scalar::<f32>().unwrap()) / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    /// Forward, input gradient and weight gradient against candle's conv2d.
    fn check((b, c, h, w): (usize, usize, usize, usize), o: usize, win: Window) {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (b, c, h, w), &dev).unwrap();
        let wt = Var::randn(0f32, 1.0, (o, c, win.kh, win.kw), &dev).unwrap();
        let ours = conv2d(x.as_tensor(), wt.as_tensor(), win.padding, win.stride).unwrap();
        let theirs = x
            .as_tensor()
            .conv2d(wt.as_tensor(), win.padding, win.stride, 1, 1)
            .unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        assert!(max_rel_diff(&ours, &theirs) < 1e-4, "forward differs");
        let g = Tensor::randn(0f32, 1.0, theirs.dims(), &dev).unwrap();
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &wt] {
            let (a, b) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_rel_diff(a, b) < 1e-4,
                "gradient differs for {:?}",
                v.dims()
            );
        }
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

    #[test]
    fn rejects_mismatched_channels() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 4, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let err = conv2d(&x, &w, 1, 1).unwrap_err().to_string();
        assert!(err.contains("3 channels"), "{err}");
    }
}
