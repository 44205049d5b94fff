//! Spikes packed 64 to a word, and the walks over their set and clear bits.

use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::kernels::simd::{self, Level};
use crate::kernels::with_f32;

/// Spikes per packed word.
pub(crate) const WORD_BITS: usize = u64::BITS as usize;

/// Binary spikes packed 64 to a `u64` along the last dimension (32x smaller than f32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpikeBits {
    pub(super) words: Vec<u64>,
    pub(super) shape: Vec<usize>,
    pub(super) words_per_row: usize,
}

impl SpikeBits {
    /// Packs a tensor of exact 0s and 1s; any other value is an error, since silently
    /// thresholding would hide a non-spiking input.
    pub fn pack(spikes: &Tensor) -> Result<Self> {
        let shape = spikes.dims().to_vec();
        if shape.is_empty() {
            candle_core::bail!("SpikeBits::pack: a scalar has no dimension to pack")
        }
        // CPU f32 spikes are read in place: a copy would be as large as the spikes again.
        if spikes.device().is_cpu() && spikes.dtype() == DType::F32 {
            return with_f32(spikes, "SpikeBits::pack", |v| Self::pack_values(v, shape));
        }
        let values = spikes.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Self::pack_values(&values, shape)
    }

    /// [`Self::pack`] of the values of a tensor of `shape` (not a scalar).
    fn pack_values(values: &[f32], shape: Vec<usize>) -> Result<Self> {
        let cols = shape.last().copied().unwrap_or(0);
        let words_per_row = cols.div_ceil(WORD_BITS);
        let rows = values.len().checked_div(cols).unwrap_or(0);
        let mut words = vec![0u64; rows * words_per_row];
        if cols > 0 {
            words
                .par_chunks_mut(words_per_row)
                .zip(values.par_chunks(cols))
                .try_for_each(|(row_words, row)| {
                    if let Some(&bad) = row.iter().find(|&&v| v != 0.0 && v != 1.0) {
                        return Err(bad);
                    }
                    pack_binary_row(row, row_words);
                    Ok(())
                })
                .map_err(|bad| {
                    candle_core::Error::Msg(format!(
                        "SpikeBits::pack: spikes must be 0 or 1, found {bad}"
                    ))
                })?;
        }
        Ok(Self {
            words,
            shape,
            words_per_row,
        })
    }

    /// Bits already packed as [`Self::pack`] lays them out: `words_per_row` words per row of
    /// the last axis of `shape`.
    pub(crate) fn from_words(words: Vec<u64>, shape: Vec<usize>) -> Result<Self> {
        let cols = shape.last().copied().unwrap_or(0);
        let words_per_row = cols.div_ceil(WORD_BITS);
        let rows = shape
            .iter()
            .product::<usize>()
            .checked_div(cols)
            .unwrap_or(0);
        if shape.is_empty() || words.len() != rows * words_per_row {
            candle_core::bail!(
                "SpikeBits: {} words do not pack a {shape:?} spike tensor",
                words.len()
            )
        }
        Ok(Self {
            words,
            shape,
            words_per_row,
        })
    }

    /// The same bits under another shape with the same last axis and element count, as
    /// `Tensor::reshape` of the unpacked spikes.
    pub fn reshaped(self, shape: Vec<usize>) -> Result<Self> {
        if shape.last() != self.shape.last()
            || shape.iter().product::<usize>() != self.shape.iter().product::<usize>()
        {
            candle_core::bail!("SpikeBits: cannot reshape {:?} to {shape:?}", self.shape)
        }
        Ok(Self { shape, ..self })
    }

    /// Spikes `[..., N, H, D]` as `[..., H, N, D]`, the two axes before the packed one
    /// swapped: attention heads split from tokens, as `transpose` of the unpacked spikes.
    pub fn heads_first(&self) -> Result<Self> {
        let rank = self.shape.len();
        if rank < 3 {
            candle_core::bail!(
                "SpikeBits::heads_first: expected [..., N, H, D], got {:?}",
                self.shape
            )
        }
        let (n, h, wpr) = (
            self.shape[rank - 3],
            self.shape[rank - 2],
            self.words_per_row,
        );
        let mut words = vec![0u64; self.words.len()];
        if n * h * wpr > 0 {
            words
                .par_chunks_mut(n * h * wpr)
                .zip(self.words.par_chunks(n * h * wpr))
                .for_each(|(out, group)| {
                    for (i, row) in group.chunks_exact(wpr).enumerate() {
                        let (token, head) = (i / h, i % h);
                        let to = (head * n + token) * wpr;
                        out[to..to + wpr].copy_from_slice(row);
                    }
                });
        }
        let mut shape = self.shape.clone();
        shape.swap(rank - 3, rank - 2);
        Ok(Self {
            words,
            shape,
            words_per_row: wpr,
        })
    }

    /// Spikes per leading index (per time step of `[T, ...]` spikes).
    pub fn counts_per_leading(&self) -> Vec<u64> {
        let lead = self.shape.first().copied().unwrap_or(0);
        self.words
            .chunks(self.words.len().checked_div(lead).unwrap_or(1).max(1))
            .map(|step| step.iter().map(|w| u64::from(w.count_ones())).sum())
            .collect()
    }

    /// Packs `[B, C, H, W]` spikes channels-last, `[B, H, W, C]`: the layout the spike-driven
    /// convolution reads a pixel's active channels from.
    pub fn pack_channels_last(spikes: &Tensor) -> Result<Self> {
        Self::pack(&spikes.permute((0, 2, 3, 1))?)
    }

    /// The 0/1 f32 tensor these bits came from.
    pub fn unpack(&self, device: &Device) -> Result<Tensor> {
        self.unpack_columns(0..self.cols(), device)?
            .reshape(self.shape.as_slice())
    }

    /// The columns `cols` of the last axis, unpacked as [`Self::unpack`] does, `[rows,
    /// cols.len()]`; `cols` starts at a multiple of 64.
    pub fn unpack_columns(&self, cols: Range<usize>, device: &Device) -> Result<Tensor> {
        if !cols.start.is_multiple_of(WORD_BITS) || cols.start > cols.end || cols.end > self.cols()
        {
            candle_core::bail!(
                "SpikeBits: columns {cols:?} of {} (from a multiple of {WORD_BITS})",
                self.cols()
            )
        }
        let width = cols.len();
        let words = cols.start / WORD_BITS..cols.end.div_ceil(WORD_BITS);
        let mut values = vec![0f32; self.rows() * width];
        for (r, row) in values.chunks_exact_mut(width.max(1)).enumerate() {
            for_each_active(&self.row(r)[words.clone()], |k| {
                if k < width {
                    row[k] = 1.0
                }
            });
        }
        Tensor::from_vec(values, (self.rows(), width), device)
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

    /// Spikes per row.
    pub fn row_counts(&self) -> impl Iterator<Item = usize> + '_ {
        self.words
            .chunks(self.words_per_row.max(1))
            .map(|row| row.iter().map(|w| w.count_ones() as usize).sum())
    }

    pub(super) fn row(&self, r: usize) -> &[u64] {
        &self.words[r * self.words_per_row..(r + 1) * self.words_per_row]
    }

    /// `(B, H, W, C)` of channels-last spikes, or an error naming `op`.
    pub(crate) fn dims4(&self, op: &str) -> Result<(usize, usize, usize, usize)> {
        match self.shape[..] {
            [b, h, w, c] => Ok((b, h, w, c)),
            _ => candle_core::bail!("{op}: expected spikes [B, H, W, C], got {:?}", self.shape),
        }
    }
}

/// Packs a row of spikes 64 to a word: bit `k % 64` of word `k / 64` is set where `row[k]` is 1.
#[inline(always)]
pub(crate) fn pack_binary_row(row: &[f32], words: &mut [u64]) {
    pack_binary_row_at(simd::SPIKE_PACK.level(), row, words)
}

/// [`pack_binary_row`] on the instruction set `level`: one AVX-512 compare gives 16 bits.
#[inline(always)]
pub(super) fn pack_binary_row_at(level: Level, row: &[f32], words: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.supported() {
        // SAFETY: the CPU has AVX-512 (checked).
        return unsafe { x86::pack_row_avx512(row, words) };
    }
    let _ = level;
    pack_row_by_quads(row, words)
}

/// [`pack_binary_row`] four spikes at a time.
#[inline(always)]
pub(super) fn pack_row_by_quads(row: &[f32], words: &mut [u64]) {
    for (word, chunk) in words.iter_mut().zip(row.chunks(WORD_BITS)) {
        let quads = chunk.chunks_exact(4);
        let tail = quads.remainder();
        let mut bits = 0;
        for (q, quad) in quads.enumerate() {
            bits |= quad_bits(quad.try_into().expect("exact chunk")) << (4 * q);
        }
        *word = tail.iter().enumerate().fold(bits, |bits, (k, &v)| {
            bits | u64::from(v == 1.0) << (chunk.len() - tail.len() + k)
        });
    }
}

/// The 4 bits of 4 spikes, one SSE compare and move-mask (SSE is part of every x86-64 CPU); a
/// bit-by-bit loop costs a sixth of a whole spike-driven inference pass.
#[inline(always)]
fn quad_bits(quad: &[f32; 4]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_cmpeq_ps, _mm_loadu_ps, _mm_movemask_ps, _mm_set1_ps};
        // SAFETY: SSE is baseline on x86-64, and the load reads the 4 floats of `quad`.
        let mask =
            unsafe { _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(quad.as_ptr()), _mm_set1_ps(1.0))) };
        mask as u64
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        quad.iter()
            .enumerate()
            .fold(0, |bits, (k, &v)| bits | u64::from(v == 1.0) << k)
    }
}

/// Calls `f` with the index of every clear bit among the first `cols` of `words`, in
/// increasing order.
#[inline]
pub(super) fn for_each_silent(words: &[u64], cols: usize, mut f: impl FnMut(usize)) {
    for (i, &word) in words.iter().enumerate() {
        let valid = (cols - i * WORD_BITS).min(WORD_BITS);
        let mut w = !word & (u64::MAX >> (WORD_BITS - valid));
        while w != 0 {
            f(i * WORD_BITS + w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
}

/// Calls `f` with the index of every set bit of `words`, in increasing order.
#[inline]
pub(in crate::kernels) fn for_each_active(words: &[u64], mut f: impl FnMut(usize)) {
    for (i, &word) in words.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            f(i * WORD_BITS + w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
}
