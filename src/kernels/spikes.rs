//! Bit-packed spikes and accumulate-only inference kernels over them.
//!
//! After every LIF the data are 0/1, so a layer fed by spikes needs no multiplications: a linear
//! layer or convolution is the sum of the weight rows its active inputs select, and q . k^T
//! between two spike tensors is a popcount of ANDed words. Work then scales with the firing
//! rate instead of the layer size, which is what turns sparsity into wall-clock time.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::conv::{weight_matrix, Window};

const WORD_BITS: usize = u64::BITS as usize;

/// Binary spikes packed 64 to a `u64` along the last dimension (32x smaller than f32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpikeBits {
    words: Vec<u64>,
    shape: Vec<usize>,
    words_per_row: usize,
}

impl SpikeBits {
    /// Packs a tensor of exact 0s and 1s; any other value is an error, since silently
    /// thresholding would hide a non-spiking input.
    pub fn pack(spikes: &Tensor) -> Result<Self> {
        let shape = spikes.dims().to_vec();
        let Some(&cols) = shape.last() else {
            candle_core::bail!("SpikeBits::pack: a scalar has no dimension to pack")
        };
        let values = spikes
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|&&v| v != 0.0 && v != 1.0) {
            candle_core::bail!("SpikeBits::pack: spikes must be 0 or 1, found {bad}")
        }
        let words_per_row = cols.div_ceil(WORD_BITS);
        let rows = values.len().checked_div(cols).unwrap_or(0);
        let mut words = vec![0u64; rows * words_per_row];
        if cols > 0 {
            words
                .par_chunks_mut(words_per_row)
                .zip(values.par_chunks(cols))
                .for_each(|(row_words, row)| {
                    for (k, _) in row.iter().enumerate().filter(|(_, &v)| v == 1.0) {
                        row_words[k / WORD_BITS] |= 1 << (k % WORD_BITS);
                    }
                });
        }
        Ok(Self {
            words,
            shape,
            words_per_row,
        })
    }

    /// Packs `[B, C, H, W]` spikes channels-last, `[B, H, W, C]`: the layout the spike-driven
    /// convolution reads a pixel's active channels from.
    pub fn pack_channels_last(spikes: &Tensor) -> Result<Self> {
        Self::pack(&spikes.permute((0, 2, 3, 1))?)
    }

    /// The 0/1 f32 tensor these bits came from.
    pub fn unpack(&self, device: &Device) -> Result<Tensor> {
        let cols = self.cols();
        let mut values = vec![0f32; self.rows() * cols];
        for (r, row) in values.chunks_exact_mut(cols.max(1)).enumerate() {
            for_each_active(self.row(r), |k| row[k] = 1.0);
        }
        Tensor::from_vec(values, self.shape.as_slice(), device)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Length of the packed (last) dimension.
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(0)
    }

    pub fn rows(&self) -> usize {
        self.words
            .len()
            .checked_div(self.words_per_row)
            .unwrap_or(0)
    }

    /// Number of spikes (set bits).
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn row(&self, r: usize) -> &[u64] {
        &self.words[r * self.words_per_row..(r + 1) * self.words_per_row]
    }

    /// `(B, H, W, C)` of channels-last spikes, or an error naming `op`.
    fn dims4(&self, op: &str) -> Result<(usize, usize, usize, usize)> {
        match self.shape[..] {
            [b, h, w, c] => Ok((b, h, w, c)),
            _ => candle_core::bail!("{op}: expected spikes [B, H, W, C], got {:?}", self.shape),
        }
    }
}

/// Calls `f` with the index of every set bit of `words`, in increasing order.
#[inline]
fn for_each_active(words: &[u64], mut f: impl FnMut(usize)) {
    for (i, &word) in words.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            f(i * WORD_BITS + w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
}

#[inline]
fn add_assign(acc: &mut [f32], row: &[f32]) {
    for (a, w) in acc.iter_mut().zip(row) {
        *a += w;
    }
}

/// Output rows per parallel task: enough work to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

/// Event-driven convolution over channels-last spikes `[B, H, W, C]` with the weight as
/// `[kh*kw*C, O]` rows: every output pixel gathers the rows its window's active inputs select.
/// Returns `[B*Ho*Wo, O]`.
fn gather_conv(
    spikes: &SpikeBits,
    (b, h, w, c): (usize, usize, usize, usize),
    weight_rows: &[f32],
    o: usize,
    win: Window,
) -> Result<Vec<f32>> {
    let (ho, wo) = win.out_size(h, w)?;
    let mut out = vec![0f32; b * ho * wo * o];
    out.par_chunks_mut(o * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            for (i, acc) in rows.chunks_exact_mut(o).enumerate() {
                let p = task * ROWS_PER_TASK + i;
                let (bi, oy, ox) = (p / (ho * wo), p / wo % ho, p % wo);
                for ky in 0..win.kh {
                    let Some(iy) = win.source(oy, ky, h) else {
                        continue;
                    };
                    for kx in 0..win.kw {
                        let Some(ix) = win.source(ox, kx, w) else {
                            continue;
                        };
                        let base = (ky * win.kw + kx) * c;
                        for_each_active(spikes.row((bi * h + iy) * w + ix), |ch| {
                            let r = (base + ch) * o;
                            add_assign(acc, &weight_rows[r..r + o]);
                        });
                    }
                }
            }
        });
    Ok(out)
}

/// Weight `[O, C, kh, kw]` as `[kh*kw*C, O]` rows, one per input the spikes can select.
fn weight_rows(weight: &Tensor) -> Result<Vec<f32>> {
    weight_matrix(&weight.to_dtype(DType::F32)?)?
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Spike-driven linear layer: `spikes [..., K] x weight [O, K]^T -> [..., O]`, adds only.
pub fn spike_linear(spikes: &SpikeBits, weight: &Tensor) -> Result<Tensor> {
    let (o, k) = weight.dims2()?;
    if spikes.cols() != k {
        candle_core::bail!(
            "spike_linear: spikes have {} features, weight expects {k}",
            spikes.cols()
        )
    }
    let rows = spikes.rows();
    let win = Window {
        kh: 1,
        kw: 1,
        padding: 0,
        stride: 1,
    };
    let w = weight.reshape((o, k, 1, 1))?;
    let out = gather_conv(spikes, (rows, 1, 1, k), &weight_rows(&w)?, o, win)?;
    let mut shape = spikes.shape[..spikes.shape.len() - 1].to_vec();
    shape.push(o);
    Tensor::from_vec(out, shape, weight.device())
}

/// Spike-driven convolution of channels-last spikes `[B, H, W, C]` (see
/// [`SpikeBits::pack_channels_last`]) with `weight [O, C, kh, kw]`: `[B, O, Ho, Wo]`, equal to
/// the dense `conv2d` of the unpacked spikes.
pub fn spike_conv2d(
    spikes: &SpikeBits,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, h, w, c) = spikes.dims4("spike_conv2d")?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        candle_core::bail!("spike_conv2d: spikes have {c} channels, weight expects {wc}")
    }
    let win = Window {
        kh,
        kw,
        padding,
        stride,
    };
    let (ho, wo) = win.out_size(h, w)?;
    let out = gather_conv(spikes, (b, h, w, c), &weight_rows(weight)?, o, win)?;
    Tensor::from_vec(out, (b, ho, wo, o), weight.device())?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// `(batch, n, d)` of spikes `[..., N, D]`: attention heads flattened into the batch.
fn attention_dims(s: &SpikeBits, op: &str) -> Result<(usize, usize, usize)> {
    let rank = s.shape.len();
    if rank < 2 {
        candle_core::bail!("{op}: expected spikes [..., N, D], got shape {:?}", s.shape)
    }
    let n = s.shape[rank - 2];
    Ok((s.rows().checked_div(n).unwrap_or(0), n, s.cols()))
}

/// `q . k^T` between spike tensors `q [..., Nq, D]` and `k [..., Nk, D]`: `[..., Nq, Nk]` u32,
/// the number of channels where both fire, as a popcount of ANDed words.
pub fn spike_attention_scores(q: &SpikeBits, k: &SpikeBits) -> Result<Tensor> {
    let (bq, nq, dq) = attention_dims(q, "spike_attention_scores")?;
    let (_, nk, dk) = attention_dims(k, "spike_attention_scores")?;
    let (rq, rk) = (q.shape.len(), k.shape.len());
    if q.shape[..rq - 2] != k.shape[..rk - 2] || dq != dk {
        candle_core::bail!(
            "spike_attention_scores: q {:?} and k {:?} do not match",
            q.shape,
            k.shape
        )
    }
    let mut scores = vec![0u32; bq * nq * nk];
    scores
        .par_chunks_mut(nk.max(1))
        .enumerate()
        .for_each(|(row, out)| {
            let g = row / nq.max(1);
            let qrow = q.row(row);
            for (j, s) in out.iter_mut().enumerate() {
                let krow = k.row(g * nk + j);
                *s = qrow
                    .iter()
                    .zip(krow)
                    .map(|(a, b)| (a & b).count_ones())
                    .sum();
            }
        });
    let mut shape = q.shape[..rq - 1].to_vec();
    shape.push(nk);
    Tensor::from_vec(scores, shape, &Device::Cpu)
}

/// `scores . v` for integer `scores [..., Nq, Nk]` (u32, e.g. from [`spike_attention_scores`])
/// and spikes `v [..., Nk, D]`: `[..., Nq, D]` u32, each score added to the channels its key's
/// value spikes select.
pub fn spike_attention_apply(scores: &Tensor, v: &SpikeBits) -> Result<Tensor> {
    let (bv, nk, d) = attention_dims(v, "spike_attention_apply")?;
    let dims = scores.dims();
    let rank = dims.len();
    if rank != v.shape.len() || dims[..rank - 2] != v.shape[..rank - 2] || dims[rank - 1] != nk {
        candle_core::bail!(
            "spike_attention_apply: scores {dims:?} do not match values {:?}",
            v.shape
        )
    }
    let nq = dims[rank - 2];
    let scores = scores
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let mut out = vec![0u32; bv * nq * d];
    out.par_chunks_mut(d.max(1))
        .zip(scores.par_chunks(nk.max(1)))
        .enumerate()
        .for_each(|(row, (acc, srow))| {
            let g = row / nq.max(1);
            for (j, &s) in srow.iter().enumerate().filter(|(_, &s)| s != 0) {
                for_each_active(v.row(g * nk + j), |c| acc[c] += s);
            }
        });
    let mut shape = dims[..rank - 1].to_vec();
    shape.push(d);
    Tensor::from_vec(out, shape, &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random 0/1 spikes firing at about `rate`.
    fn spikes(shape: &[usize], rate: f64) -> Tensor {
        let u = Tensor::rand(0f32, 1.0, shape, &Device::Cpu).unwrap();
        u.lt(rate).unwrap().to_dtype(DType::F32).unwrap()
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
    }

    #[test]
    fn pack_roundtrips_and_counts() {
        let s = spikes(&[3, 5, 130], 0.3);
        let bits = SpikeBits::pack(&s).unwrap();
        assert_eq!((bits.rows(), bits.cols()), (15, 130));
        let sum = s.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(bits.count(), sum as usize);
        let back = bits.unpack(&Device::Cpu).unwrap();
        assert_eq!(back.to_vec3::<f32>().unwrap(), s.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn pack_rejects_non_binary() {
        let t = Tensor::new(&[[0f32, 1.0, 0.5]], &Device::Cpu).unwrap();
        let err = SpikeBits::pack(&t).unwrap_err().to_string();
        assert!(err.contains("0 or 1") && err.contains("0.5"), "{err}");
    }

    #[test]
    fn linear_matches_dense() {
        let s = spikes(&[2, 7, 100], 0.2);
        let w = Tensor::randn(0f32, 1.0, (13, 100), &Device::Cpu).unwrap();
        let ours = spike_linear(&SpikeBits::pack(&s).unwrap(), &w).unwrap();
        let dense = s.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(ours.dims(), &[2, 7, 13]);
        assert!(max_rel_diff(&ours, &dense) < 1e-5);
    }

    fn check_conv(shape: (usize, usize, usize, usize), o: usize, k: usize, pad: usize, st: usize) {
        let (b, c, h, w) = shape;
        let s = spikes(&[b, c, h, w], 0.15);
        let wt = Tensor::randn(0f32, 1.0, (o, c, k, k), &Device::Cpu).unwrap();
        let bits = SpikeBits::pack_channels_last(&s).unwrap();
        let ours = spike_conv2d(&bits, &wt, pad, st).unwrap();
        let dense = s.conv2d(&wt, pad, st, 1, 1).unwrap();
        assert_eq!(ours.dims(), dense.dims());
        assert!(max_rel_diff(&ours, &dense) < 1e-5);
    }

    #[test]
    fn conv3x3_matches_dense() {
        check_conv((2, 70, 7, 5), 9, 3, 1, 1);
    }

    #[test]
    fn conv1x1_and_strided_match_dense() {
        check_conv((3, 5, 6, 6), 4, 1, 0, 1);
        check_conv((2, 3, 9, 9), 4, 3, 1, 2);
    }

    #[test]
    fn conv_rejects_channel_mismatch() {
        let bits = SpikeBits::pack_channels_last(&spikes(&[1, 3, 4, 4], 0.5)).unwrap();
        let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let err = spike_conv2d(&bits, &w, 1, 1).unwrap_err().to_string();
        assert!(err.contains("3 channels"), "{err}");
    }

    /// Scores and their product with v are exact integers, equal to the dense f32 matmuls.
    #[test]
    fn attention_matches_dense_exactly() {
        let (q, k, v) = (
            spikes(&[2, 3, 9, 70], 0.3),
            spikes(&[2, 3, 9, 70], 0.3),
            spikes(&[2, 3, 9, 70], 0.3),
        );
        let pack = |t: &Tensor| SpikeBits::pack(t).unwrap();
        let scores = spike_attention_scores(&pack(&q), &pack(&k)).unwrap();
        let dense = q.matmul(&k.t().unwrap()).unwrap();
        let as_f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(max_rel_diff(&as_f32(&scores), &dense), 0.0);
        let out = spike_attention_apply(&scores, &pack(&v)).unwrap();
        let dense_out = dense.matmul(&v).unwrap();
        assert_eq!(out.dims(), &[2, 3, 9, 70]);
        assert_eq!(max_rel_diff(&as_f32(&out), &dense_out), 0.0);
    }
}
