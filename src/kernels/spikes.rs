//! Bit-packed spikes and accumulate-only inference kernels over them.
//!
//! After every LIF the data are 0/1, so a layer fed by spikes needs no multiplications: a linear
//! layer or convolution is the sum of the weight rows its active inputs select, and q . k^T
//! between two spike tensors is a popcount of ANDed words. Work then scales with the firing
//! rate instead of the layer size, which is what turns sparsity into wall-clock time.

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::conv::{weight_matrix, Window};
use super::simd::{self, Level};
use super::{layout, with_f32};
use crate::neuron::MultiStepLif;

/// Spikes per packed word.
pub(crate) const WORD_BITS: usize = u64::BITS as usize;

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

    fn row(&self, r: usize) -> &[u64] {
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
fn pack_binary_row_at(level: Level, row: &[f32], words: &mut [u64]) {
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
fn pack_row_by_quads(row: &[f32], words: &mut [u64]) {
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
fn for_each_silent(words: &[u64], cols: usize, mut f: impl FnMut(usize)) {
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
pub(super) fn for_each_active(words: &[u64], mut f: impl FnMut(usize)) {
    for (i, &word) in words.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            f(i * WORD_BITS + w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
}

/// Output lanes kept in registers while the active weight rows stream past: 8 AVX registers.
pub(crate) const BLOCK: usize = 64;

/// Inputs per weight tile: `TILE` rows of `BLOCK` lanes, 24 KB, within an L1 data cache.
const TILE: usize = 96;

/// One block's accumulators.
type Lanes = [f32; BLOCK];

/// Adds (subtracts, if `SUB`) the rows `active` of a blocked weight slice (`BLOCK` lanes per
/// row) to `acc`, in order.
#[inline(always)]
fn add_rows<const SUB: bool>(block: &[f32], active: &[u32], acc: &mut Lanes) {
    for &r in active {
        let r = r as usize;
        let w: &Lanes = block[r * BLOCK..(r + 1) * BLOCK]
            .try_into()
            .expect("blocks hold BLOCK lanes per input");
        for (a, w) in acc.iter_mut().zip(w) {
            if SUB {
                *a -= w
            } else {
                *a += w
            }
        }
    }
}

/// Output rows per parallel task: each weight block is reused by this many output pixels
/// while it is hot in cache.
const ROWS_PER_TASK: usize = 64;

/// A weight `[O, inputs]` stored as `BLOCK`-lane slices of its transpose, block-major:
/// `data[(block * inputs + input) * BLOCK + lane]`, the last block zero-padded. The rows the
/// spikes select within one block then lie in one contiguous, cache-sized region. The bias, if
/// any, is padded the same way and starts every accumulator.
#[derive(Debug, Clone)]
pub(super) struct BlockedWeights {
    data: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// Per padded output lane: the bias plus every input's weight, the output when all inputs
    /// fire (summed in f64), from which a mostly active pixel subtracts its silent inputs; only
    /// where some window may fire more than half of its inputs.
    full: Option<Vec<f32>>,
    inputs: usize,
    outputs: usize,
}

impl BlockedWeights {
    /// From a weight `[O, C, kh, kw]`, inputs ordered like [`weight_matrix`]'s columns, and an
    /// optional bias `[O]`.
    fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let matrix = weight_matrix(&weight.to_dtype(DType::F32)?)?;
        let (outputs, inputs) = matrix.dims2()?;
        let bias = bias
            .map(|b| {
                if b.dims() != [outputs] {
                    candle_core::bail!("spike layer: bias {:?} for {outputs} outputs", b.dims())
                }
                b.to_dtype(DType::F32)?.to_vec1()
            })
            .transpose()?;
        let data = with_f32(&matrix, "spike layer", |m| {
            Ok(block_major(m, outputs, inputs))
        })?;
        Ok(Self::from_blocks(data, (inputs, outputs), bias, true))
    }

    /// From `rows [inputs, outputs]`, input `i`'s contribution to every output in row `i`,
    /// and an optional bias of `outputs` values; `all_on` prepares the all-on sums that windows
    /// firing over half of their inputs start from.
    pub fn from_rows(rows: &[f32], outputs: usize, bias: Option<Vec<f32>>, all_on: bool) -> Self {
        let inputs = rows.len().checked_div(outputs).unwrap_or(0);
        let mut data = vec![0f32; outputs.div_ceil(BLOCK) * inputs * BLOCK];
        if inputs > 0 {
            data.par_chunks_mut(inputs * BLOCK)
                .enumerate()
                .for_each(|(b, block)| {
                    let lanes = b * BLOCK..((b + 1) * BLOCK).min(outputs);
                    for (to, row) in block
                        .chunks_exact_mut(BLOCK)
                        .zip(rows.chunks_exact(outputs))
                    {
                        to[..lanes.len()].copy_from_slice(&row[lanes.clone()]);
                    }
                });
        }
        Self::from_blocks(data, (inputs, outputs), bias, all_on)
    }

    /// From data already laid out block-major; see [`Self::from_rows`] for `bias` and `all_on`.
    fn from_blocks(
        data: Vec<f32>,
        (inputs, outputs): (usize, usize),
        bias: Option<Vec<f32>>,
        all_on: bool,
    ) -> Self {
        let blocks = outputs.div_ceil(BLOCK);
        let bias = bias.map(|mut b| {
            b.resize(blocks * BLOCK, 0.0);
            b
        });
        let full = all_on.then(|| {
            let mut full = vec![0f32; blocks * BLOCK];
            full.par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(b, lanes)| {
                    let mut sums: [f64; BLOCK] = match &bias {
                        Some(bias) => std::array::from_fn(|l| f64::from(bias[b * BLOCK + l])),
                        None => [0.0; BLOCK],
                    };
                    for row in
                        data[b * inputs * BLOCK..(b + 1) * inputs * BLOCK].chunks_exact(BLOCK)
                    {
                        for (f, &w) in sums.iter_mut().zip(row) {
                            *f += f64::from(w);
                        }
                    }
                    for (lane, sum) in lanes.iter_mut().zip(sums) {
                        *lane = sum as f32;
                    }
                });
            full
        });
        Self {
            data,
            bias,
            full,
            inputs,
            outputs,
        }
    }

    fn block(&self, b: usize) -> &[f32] {
        &self.data[b * self.inputs * BLOCK..(b + 1) * self.inputs * BLOCK]
    }

    /// Block `b`'s accumulators before any row is added (its bias lanes, or zeros) or, for a
    /// pixel that subtracts its silent inputs, before any row is subtracted (all inputs on).
    #[inline(always)]
    fn start(&self, b: usize, complement: bool) -> Lanes {
        let lanes = |v: &[f32]| -> Lanes {
            v[b * BLOCK..(b + 1) * BLOCK]
                .try_into()
                .expect("padded to whole blocks")
        };
        match (&self.full, &self.bias) {
            (Some(full), _) if complement => lanes(full),
            (_, Some(bias)) => lanes(bias),
            _ => [0f32; BLOCK],
        }
    }
}

/// The matrix `m [outputs, inputs]` laid out as [`BlockedWeights::data`], written straight from
/// the weight's storage: through candle's transposing copies the text encoder's widest weight
/// (80 MiB) would be held twice more. Tiles of [`TILE`] inputs keep the writes within L1.
fn block_major(m: &[f32], outputs: usize, inputs: usize) -> Vec<f32> {
    let mut data = vec![0f32; outputs.div_ceil(BLOCK) * inputs * BLOCK];
    data.par_chunks_mut((inputs * BLOCK).max(1))
        .enumerate()
        .for_each(|(b, block)| {
            let lanes = BLOCK.min(outputs - b * BLOCK);
            for first in (0..inputs).step_by(TILE) {
                let tile = first..(first + TILE).min(inputs);
                for lane in 0..lanes {
                    let row = &m[(b * BLOCK + lane) * inputs..][tile.clone()];
                    for (i, &w) in tile.clone().zip(row) {
                        block[i * BLOCK + lane] = w;
                    }
                }
            }
        });
    data
}

/// The windows a convolution reads from channels-last spikes `[B, H, W, C]`; a linear layer's
/// `[M, K]` spikes are `[M, 1, 1, K]` under a 1x1 window.
#[derive(Clone, Copy)]
pub(super) struct Windows<'a> {
    pub spikes: &'a SpikeBits,
    pub dims: (usize, usize, usize, usize),
    pub win: Window,
    pub out_hw: (usize, usize),
}

impl<'a> Windows<'a> {
    /// A linear layer's `[M, K]` spikes: one 1x1 window per row.
    pub fn rows(spikes: &'a SpikeBits) -> Self {
        Self {
            spikes,
            dims: (spikes.rows(), 1, 1, spikes.cols()),
            win: Window::POINTWISE,
            out_hw: (1, 1),
        }
    }

    /// Calls `f(first weight row, spike words)` for each in-image tap of output pixel `p`'s
    /// window; returns whether every tap was in the image.
    #[inline(always)]
    pub fn for_each_tap(&self, p: usize, mut f: impl FnMut(usize, &[u64])) -> bool {
        let (_, h, w, c) = self.dims;
        let (ho, wo) = self.out_hw;
        let win = self.win;
        let (bi, oy, ox) = (p / (ho * wo), p / wo % ho, p % wo);
        let mut inside = true;
        for ky in 0..win.kh {
            let Some(iy) = win.source(oy, ky, h) else {
                inside = false;
                continue;
            };
            for kx in 0..win.kw {
                match win.source(ox, kx, w) {
                    Some(ix) => f(
                        (ky * win.kw + kx) * c,
                        self.spikes.row((bi * h + iy) * w + ix),
                    ),
                    None => inside = false,
                }
            }
        }
        inside
    }

    /// Output pixels, `B * Ho * Wo`.
    pub fn pixels(&self) -> usize {
        self.dims.0 * self.out_hw.0 * self.out_hw.1
    }

    /// Weight rows a window spans, `kh * kw * C`.
    pub fn window_len(&self) -> usize {
        self.win.kh * self.win.kw * self.dims.3
    }
}

/// An event-driven convolution: every output pixel of `windows` sums the weight rows its
/// window's active inputs select.
pub(super) struct Gather<'a> {
    pub windows: Windows<'a>,
    pub weights: &'a BlockedWeights,
    pub schedule: Schedule,
}

/// How a [`Gather`] cuts its work: inputs per weight tile, output rows per parallel task (each
/// task streams every weight block once).
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    pub tile: usize,
    pub rows_per_task: usize,
}

/// A layer's forward: up to a few thousand inputs per window, many output pixels.
const LAYER: Schedule = Schedule {
    tile: TILE,
    rows_per_task: ROWS_PER_TASK,
};

/// The weight rows one task's output pixels accumulate: pixel `p`'s rows within tile `t` are
/// `active[splits[p * (tiles + 1) + t]..splits[p * (tiles + 1) + t + 1]]`, to be subtracted
/// from the all-on sums if `subtract[p]`. It depends on the spikes alone, so a layer run a
/// slice of outputs at a time ([`sparse_linear_sliced`]) chooses it once for every slice.
pub(super) struct Selection {
    active: Vec<u32>,
    splits: Vec<usize>,
    subtract: Vec<bool>,
}

/// Where a [`Gather`] writes: rows of `stride` values, its outputs from column `offset` on.
#[derive(Clone, Copy)]
struct Placement {
    stride: usize,
    offset: usize,
}

impl Gather<'_> {
    /// Appends the weight rows output pixel `p` accumulates to `active`, in increasing order,
    /// and returns whether they are to be subtracted. Rows of active inputs are added; when
    /// more than half of a whole window's inputs fire, the rows of its silent inputs are
    /// subtracted from the all-on sum instead, so the work is that of the smaller set.
    #[inline(always)]
    fn select(&self, p: usize, active: &mut Vec<u32>) -> bool {
        let c = self.windows.dims.3;
        let mut firing = 0;
        let whole = self.windows.for_each_tap(p, |_, row| {
            firing += row.iter().map(|w| w.count_ones() as usize).sum::<usize>()
        });
        let complement = whole && self.weights.full.is_some() && 2 * firing > self.weights.inputs;
        self.windows.for_each_tap(p, |base, row| {
            // Window lengths are far below 2^32 (`Windows::window_len`).
            let base = base as u32;
            if complement {
                for_each_silent(row, c, |ch| active.push(base + ch as u32))
            } else {
                for_each_active(row, |ch| active.push(base + ch as u32))
            }
        });
        complement
    }

    /// The selection of the output pixels `pixels`.
    #[inline(always)]
    fn select_pixels(&self, pixels: impl ExactSizeIterator<Item = usize>) -> Selection {
        let tiles = self.weights.inputs.div_ceil(self.schedule.tile);
        let mut sel = Selection {
            active: Vec::new(),
            splits: Vec::with_capacity(pixels.len() * (tiles + 1)),
            subtract: Vec::with_capacity(pixels.len()),
        };
        for p in pixels {
            let start = sel.active.len();
            sel.subtract.push(self.select(p, &mut sel.active));
            // The rows are in increasing order: one walk finds where each tile's begin.
            let mut at = start;
            for t in 0..tiles {
                let edge = (t * self.schedule.tile) as u32;
                while at < sel.active.len() && sel.active[at] < edge {
                    at += 1;
                }
                sel.splits.push(at);
            }
            sel.splits.push(sel.active.len());
        }
        sel
    }

    /// The output pixels of task `task`.
    fn task_pixels(&self, task: usize) -> Range<usize> {
        let per_task = self.schedule.rows_per_task.max(1);
        task * per_task..((task + 1) * per_task).min(self.windows.pixels())
    }

    /// Every task's selection, for gathers over other weights of the same inputs (see
    /// [`Selection`]).
    pub fn selections(&self) -> Vec<Selection> {
        let level = simd::SPIKE_GATHER.level();
        let tasks = self
            .windows
            .pixels()
            .div_ceil(self.schedule.rows_per_task.max(1));
        (0..tasks)
            .into_par_iter()
            .map(|task| simd::dispatch(level, || self.select_pixels(self.task_pixels(task))))
            .collect()
    }

    /// The sums of the pixels `sel` chose, handed to `emit(block, accumulators)` one weight
    /// block (`BLOCK` outputs) at a time, the accumulators in the selection's pixel order;
    /// `sum` adds a pixel's selected rows of a weight tile to its accumulators.
    ///
    /// The loop runs one weight block at a time and, within it, one [`TILE`] of inputs at a
    /// time for all of the task's pixels, so that the rows the pixels select come from L1: a
    /// whole block (up to 900 KB for the last tokenizer conv) would stream from L2 or L3 for
    /// every pixel. A pixel's accumulators carry from tile to tile, so each lane still sums its
    /// rows in increasing order.
    #[inline(always)]
    fn accumulate(
        &self,
        sel: &Selection,
        sum: impl Fn(&[f32], &[u32], &mut Lanes, bool),
        emit: &mut dyn FnMut(usize, &[Lanes]),
    ) {
        let tiles = self.weights.inputs.div_ceil(self.schedule.tile);
        let mut accs = vec![[0f32; BLOCK]; sel.subtract.len()];
        for b in 0..self.weights.outputs.div_ceil(BLOCK) {
            let block = self.weights.block(b);
            for (acc, &sub) in accs.iter_mut().zip(&sel.subtract) {
                *acc = self.weights.start(b, sub);
            }
            for t in 0..tiles {
                for ((acc, split), &sub) in accs
                    .iter_mut()
                    .zip(sel.splits.chunks_exact(tiles + 1))
                    .zip(&sel.subtract)
                {
                    sum(block, &sel.active[split[t]..split[t + 1]], acc, sub);
                }
            }
            emit(b, &accs);
        }
    }

    /// `[B*Ho*Wo, O]`.
    pub fn run(&self) -> Vec<f32> {
        self.run_at(simd::SPIKE_GATHER.level())
    }

    /// [`Self::run`] on the instruction set `level` (the portable one where the CPU lacks it).
    pub(crate) fn run_at(&self, level: Level) -> Vec<f32> {
        let len = self.windows.pixels() * self.weights.outputs;
        let mut out = Vec::with_capacity(len);
        let at = Placement {
            stride: self.weights.outputs,
            offset: 0,
        };
        self.run_into(level, &mut out.spare_capacity_mut()[..len], at, None);
        // SAFETY: `run_into` wrote all `len` values.
        unsafe { out.set_len(len) };
        out
    }

    /// Writes the outputs into `out`, rows of `at.stride` values from column `at.offset` on,
    /// every value of those columns. Not zeroed first: zeroing an output of up to 200 MB (the
    /// tokenizer's second conv) would run on one thread.
    fn run_into(
        &self,
        level: Level,
        out: &mut [MaybeUninit<f32>],
        at: Placement,
        selections: Option<&[Selection]>,
    ) {
        if self.weights.outputs == 0 {
            out.fill(MaybeUninit::new(0.0));
            return;
        }
        let per_task = self.schedule.rows_per_task.max(1);
        let o = self.weights.outputs;
        out.par_chunks_mut(at.stride * per_task)
            .enumerate()
            .for_each(|(task, rows)| {
                let own;
                let sel = match selections {
                    Some(shared) => &shared[task],
                    None => {
                        let pixels = self.task_pixels(task);
                        own = simd::dispatch(level, || self.select_pixels(pixels));
                        &own
                    }
                };
                self.task(level, sel, &mut |b, accs| {
                    let lanes = b * BLOCK..((b + 1) * BLOCK).min(o);
                    let cols = at.offset + lanes.start..at.offset + lanes.end;
                    for (out, acc) in rows.chunks_exact_mut(at.stride).zip(accs) {
                        for (to, &v) in out[cols.clone()].iter_mut().zip(acc) {
                            to.write(v);
                        }
                    }
                })
            });
    }

    /// The outputs, rows `t * M + m` for `steps` steps of `M` pixels, through `lif`, never
    /// written as f32: a task sums a few pixels at every step, one weight block at a time, and
    /// fires them while the sums are in L1. The spikes are the bits `lif.forward_bits` gives of
    /// the outputs shaped `[T, M, groups, O / groups]` (the heads of spiking self-attention),
    /// `[T, M, groups, words]`, uncounted.
    fn run_fired(&self, lif: &MultiStepLif, steps: usize, groups: usize) -> Vec<u64> {
        let level = simd::SPIKE_GATHER.level();
        let (o, m) = (self.weights.outputs, self.windows.pixels() / steps);
        let cols = o / groups;
        let words_per_row = cols.div_ceil(WORD_BITS);
        let row_words = groups * words_per_row;
        let per_task = (self.schedule.rows_per_task / steps).max(1);
        let pixels_of = |task: usize| task * per_task..((task + 1) * per_task).min(m);
        let tasks: Vec<Vec<u64>> = (0..m.div_ceil(per_task))
            .into_par_iter()
            .map(|task| {
                let mine = pixels_of(task);
                let pixels: Vec<usize> = (0..steps)
                    .flat_map(|t| mine.clone().map(move |p| t * m + p))
                    .collect();
                let sel = simd::dispatch(level, || self.select_pixels(pixels.iter().copied()));
                let mut words = vec![0u64; pixels.len() * row_words];
                self.task(level, &sel, &mut |b, accs| {
                    // [T, pixels, BLOCK] in, a word per pixel and step out.
                    let fired = lif.fire_rows(accs.as_flattened(), steps, BLOCK);
                    for (row, word) in words.chunks_exact_mut(row_words).zip(fired) {
                        for_each_active(&[word], |lane| {
                            let out = b * BLOCK + lane;
                            if out < o {
                                let (g, c) = (out / cols, out % cols);
                                row[g * words_per_row + c / WORD_BITS] |= 1 << (c % WORD_BITS);
                            }
                        });
                    }
                });
                words
            })
            .collect();
        // Tasks hold [T, their pixels, words]; the result is [T, M, words].
        let mut all = Vec::with_capacity(steps * m * row_words);
        for t in 0..steps {
            for (task, words) in tasks.iter().enumerate() {
                let per_step = pixels_of(task).len() * row_words;
                all.extend_from_slice(&words[t * per_step..(t + 1) * per_step]);
            }
        }
        all
    }

    /// [`Self::accumulate`] with the accumulators in registers of `level`.
    fn task(&self, level: Level, sel: &Selection, emit: &mut dyn FnMut(usize, &[Lanes])) {
        #[cfg(target_arch = "x86_64")]
        match level {
            // SAFETY: the CPU has AVX-512 (checked), and `Gather::select` only yields rows
            // below the weight's input count, the number of rows of every block.
            Level::Avx512 if level.supported() => {
                return simd::dispatch(level, || {
                    self.accumulate(
                        sel,
                        |block, active, acc, sub| unsafe {
                            match sub {
                                true => x86::add_rows_avx512::<true>(block, active, acc),
                                false => x86::add_rows_avx512::<false>(block, active, acc),
                            }
                        },
                        emit,
                    )
                })
            }
            // SAFETY: as above, for AVX2.
            Level::Avx2 if level.supported() => {
                return simd::dispatch(level, || {
                    self.accumulate(
                        sel,
                        |block, active, acc, sub| unsafe {
                            match sub {
                                true => x86::add_rows_avx2::<true>(block, active, acc),
                                false => x86::add_rows_avx2::<false>(block, active, acc),
                            }
                        },
                        emit,
                    )
                })
            }
            _ => {}
        }
        self.accumulate(
            sel,
            |block, active, acc, sub| match sub {
                true => add_rows::<true>(block, active, acc),
                false => add_rows::<false>(block, active, acc),
            },
            emit,
        )
    }
}

/// A linear layer's output `[M, O]` on spikes `[M, K]`, its weights laid out for the
/// accumulate-only kernel a slice of `outputs` outputs at a time (`slice(range)` gives a slice's
/// layer), the rows each output row sums chosen once for all slices: for the text encoder's
/// first layer, chosen 32 times over, the choosing took as long as the sums. Every value is
/// the one the whole layer would compute.
pub(super) fn sparse_linear_sliced(
    spikes: &SpikeBits,
    o: usize,
    outputs: usize,
    mut slice: impl FnMut(Range<usize>) -> Result<SpikeLayer>,
) -> Result<Vec<f32>> {
    let level = simd::SPIKE_GATHER.level();
    let len = spikes.rows() * o;
    let mut out = Vec::with_capacity(len);
    let mut selections = None;
    for start in (0..o).step_by(outputs.max(1)) {
        let layer = slice(start..(start + outputs).min(o))?;
        layer.check_linear(spikes)?;
        let gather = Gather {
            windows: Windows::rows(spikes),
            weights: &layer.weights,
            schedule: LAYER,
        };
        // One slice chooses as it goes, holding a task's choice at a time.
        let shared = match outputs < o {
            true => Some(
                selections
                    .get_or_insert_with(|| gather.selections())
                    .as_slice(),
            ),
            false => None,
        };
        let at = Placement {
            stride: o,
            offset: start,
        };
        gather.run_into(level, &mut out.spare_capacity_mut()[..len], at, shared);
    }
    // SAFETY: the slices cover all `o` columns, and `run_into` wrote every value of its
    // slice's columns in every row.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// A layer fed by spikes with its weights prepared once for the accumulate-only kernels: a
/// linear layer `[O, K]` or a convolution `[O, C, kh, kw]`, with an optional bias (where a
/// folded BatchNorm's shift goes).
#[derive(Debug, Clone)]
pub struct SpikeLayer {
    weights: BlockedWeights,
    kernel: (usize, usize),
}

impl SpikeLayer {
    /// A linear layer `weight [O, K]`, or a convolution `weight [O, C, kh, kw]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let weight = match weight.rank() {
            2 => weight.unsqueeze(2)?.unsqueeze(3)?,
            4 => weight.clone(),
            _ => candle_core::bail!(
                "spike layer: weight must be [O, K] or [O, C, kh, kw], got {:?}",
                weight.dims()
            ),
        };
        let (_, _, kh, kw) = weight.dims4()?;
        Ok(Self {
            weights: BlockedWeights::new(&weight, bias)?,
            kernel: (kh, kw),
        })
    }

    /// `spikes [..., K] -> [..., O]` for a linear layer.
    pub fn linear(&self, spikes: &SpikeBits, device: &Device) -> Result<Tensor> {
        self.check_linear(spikes)?;
        let o = self.weights.outputs;
        let out = Gather {
            windows: Windows::rows(spikes),
            weights: &self.weights,
            schedule: LAYER,
        }
        .run();
        let mut shape = spikes.shape[..spikes.shape.len() - 1].to_vec();
        shape.push(o);
        Tensor::from_vec(out, shape, device)
    }

    /// [`Self::linear`] then `lif` over the spikes' leading axis of steps: `[T, ..., K]` to the
    /// bits `lif.forward_bits` gives of the output shaped `[T, ..., groups, O / groups]`
    /// (`[T, ..., O]` for one group), the f32 output never written whole (see
    /// [`Gather::run_fired`]). Counted by the LIF's monitor.
    pub fn linear_fired(
        &self,
        spikes: &SpikeBits,
        lif: &MultiStepLif,
        groups: usize,
    ) -> Result<SpikeBits> {
        self.check_linear(spikes)?;
        let gather = Gather {
            windows: Windows::rows(spikes),
            weights: &self.weights,
            schedule: LAYER,
        };
        let rows = spikes.shape[..spikes.shape.len() - 1].to_vec();
        self.fired(&gather, lif, (spikes.shape[0], groups), rows)
    }

    /// `gather` through `lif` over `steps` steps, its outputs in `groups`, as bits of shape
    /// `rows` then the groups' columns.
    fn fired(
        &self,
        gather: &Gather,
        lif: &MultiStepLif,
        (steps, groups): (usize, usize),
        mut shape: Vec<usize>,
    ) -> Result<SpikeBits> {
        lif.check_config()?;
        let (o, pixels) = (self.weights.outputs, gather.windows.pixels());
        if steps == 0 || !pixels.is_multiple_of(steps) || groups == 0 || !o.is_multiple_of(groups) {
            candle_core::bail!(
                "spike layer into a LIF: {pixels} output rows over {steps} steps, {o} outputs \
                 in {groups} groups"
            )
        }
        if groups > 1 {
            shape.push(groups);
        }
        shape.push(o / groups);
        let bits = SpikeBits::from_words(gather.run_fired(lif, steps, groups), shape)?;
        lif.observe(&bits)?;
        Ok(bits)
    }

    /// That this is a linear layer over the spikes' features.
    fn check_linear(&self, spikes: &SpikeBits) -> Result<()> {
        let k = self.weights.inputs;
        if self.kernel != (1, 1) || spikes.cols() != k {
            candle_core::bail!(
                "spike_linear: spikes have {} features, weight expects {k} (kernel {:?})",
                spikes.cols(),
                self.kernel
            )
        }
        Ok(())
    }

    /// Convolution of channels-last spikes `[B, H, W, C]` (see
    /// [`SpikeBits::pack_channels_last`]): `[B, O, Ho, Wo]`, equal to the dense `conv2d` of the
    /// unpacked spikes.
    pub fn conv2d(
        &self,
        spikes: &SpikeBits,
        padding: usize,
        stride: usize,
        device: &Device,
    ) -> Result<Tensor> {
        layout::contiguous(
            &self
                .conv2d_channels_last(spikes, padding, stride, device)?
                .permute((0, 3, 1, 2))?,
        )
    }

    /// [`Self::conv2d`] left channels-last, `[B, Ho, Wo, O]`, as the kernel writes it: the
    /// layout the next spike-driven layer reads, so a chain of them needs no transposes.
    pub fn conv2d_channels_last(
        &self,
        spikes: &SpikeBits,
        padding: usize,
        stride: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let gather = self.conv_gather(spikes, padding, stride)?;
        let (b, _, _, _) = gather.windows.dims;
        let (ho, wo) = gather.windows.out_hw;
        let out = gather.run();
        Tensor::from_vec(out, (b, ho, wo, self.weights.outputs), device)
    }

    /// [`Self::conv2d_channels_last`] of spikes `[T * B, H, W, C]`, `steps` = T, then `lif`:
    /// the bits `lif.forward_bits` gives of the output shaped `[T, B, Ho, Wo, O]`, the f32
    /// output never written whole (see [`Gather::run_fired`]). Counted by the LIF's monitor.
    pub fn conv2d_channels_last_fired(
        &self,
        spikes: &SpikeBits,
        (padding, stride): (usize, usize),
        steps: usize,
        lif: &MultiStepLif,
    ) -> Result<SpikeBits> {
        let gather = self.conv_gather(spikes, padding, stride)?;
        let (tb, _, _, _) = gather.windows.dims;
        if steps == 0 || !tb.is_multiple_of(steps) {
            candle_core::bail!(
                "spike conv into a LIF: {tb} images are not {steps} steps of a batch"
            )
        }
        let (ho, wo) = gather.windows.out_hw;
        let rows = vec![steps, tb / steps, ho, wo];
        self.fired(&gather, lif, (steps, 1), rows)
    }

    /// The gather of the convolution of channels-last spikes `[B, H, W, C]`.
    fn conv_gather<'a>(
        &'a self,
        spikes: &'a SpikeBits,
        padding: usize,
        stride: usize,
    ) -> Result<Gather<'a>> {
        let (b, h, w, c) = spikes.dims4("spike_conv2d")?;
        let (kh, kw) = self.kernel;
        if kh * kw * c != self.weights.inputs {
            candle_core::bail!(
                "spike_conv2d: spikes have {c} channels, weight expects {}",
                self.weights.inputs / (kh * kw)
            )
        }
        let win = Window {
            kh,
            kw,
            padding,
            stride,
        };
        Ok(Gather {
            windows: Windows {
                spikes,
                dims: (b, h, w, c),
                win,
                out_hw: win.out_size(h, w)?,
            },
            weights: &self.weights,
            schedule: LAYER,
        })
    }
}

/// Spike-driven linear layer: `spikes [..., K] x weight [O, K]^T -> [..., O]`, adds only.
pub fn spike_linear(spikes: &SpikeBits, weight: &Tensor) -> Result<Tensor> {
    weight.dims2()?;
    SpikeLayer::new(weight, None)?.linear(spikes, weight.device())
}

/// Spike-driven convolution of channels-last spikes `[B, H, W, C]` with
/// `weight [O, C, kh, kw]`: `[B, O, Ho, Wo]`, see [`SpikeLayer::conv2d`].
pub fn spike_conv2d(
    spikes: &SpikeBits,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    weight.dims4()?;
    SpikeLayer::new(weight, None)?.conv2d(spikes, padding, stride, weight.device())
}

/// `out[i * b_rows.len() + j] = popcount(a_i & b_j)` over the rows of two spike groups, one
/// word column at a time so that the inner loop runs over contiguous `b` words and vectorises.
#[inline(always)]
fn popcount_products(
    a: &SpikeBits,
    a_rows: Range<usize>,
    b: &SpikeBits,
    b_rows: Range<usize>,
    out: &mut [u32],
) {
    let wpr = a.words_per_row;
    let a_words = &a.words[a_rows.start * wpr..a_rows.end * wpr];
    let b_words = &b.words[b_rows.start * wpr..b_rows.end * wpr];
    out.fill(0);
    for (a_row, out_row) in a_words
        .chunks_exact(wpr)
        .zip(out.chunks_exact_mut(b_rows.len()))
    {
        for (w, &a_word) in a_row.iter().enumerate() {
            for (o, b_row) in out_row.iter_mut().zip(b_words.chunks_exact(wpr)) {
                *o += (a_word & b_row[w]).count_ones();
            }
        }
    }
}

/// Checks q `[..., Nq, D]` and k `[..., Nk, D]` (and v `[..., Nk, Dv]`) agree; returns
/// `(groups, Nq, Nk)`.
fn attention_dims(
    q: &SpikeBits,
    k: &SpikeBits,
    v: Option<&SpikeBits>,
    op: &str,
) -> Result<(usize, usize, usize)> {
    let rank = q.shape.len();
    let lead_matches =
        |s: &SpikeBits| s.shape.len() == rank && s.shape[..rank - 2] == q.shape[..rank - 2];
    let v_matches = v.is_none_or(|v| lead_matches(v) && v.shape[rank - 2] == k.shape[rank - 2]);
    if rank < 2 || !lead_matches(k) || k.cols() != q.cols() || !v_matches {
        candle_core::bail!(
            "{op}: q {:?}, k {:?}, v {:?} are not [..., N, D] attention operands",
            q.shape,
            k.shape,
            v.map(|v| &v.shape)
        )
    }
    let (nq, nk) = (q.shape[rank - 2], k.shape[rank - 2]);
    Ok((q.rows().checked_div(nq).unwrap_or(0), nq, nk))
}

/// `q . k^T` between spike tensors `q [..., Nq, D]` and `k [..., Nk, D]`: `[..., Nq, Nk]` u32,
/// the number of channels where both fire, as a popcount of ANDed words.
pub fn spike_attention_scores(q: &SpikeBits, k: &SpikeBits) -> Result<Tensor> {
    let (groups, nq, nk) = attention_dims(q, k, None, "spike_attention_scores")?;
    let mut scores = vec![0u32; groups * nq * nk];
    if nq * nk > 0 {
        scores
            .par_chunks_mut(nq * nk)
            .enumerate()
            .for_each(|(g, out)| {
                popcount_products(q, g * nq..(g + 1) * nq, k, g * nk..(g + 1) * nk, out)
            });
    }
    let mut shape = q.shape[..q.shape.len() - 1].to_vec();
    shape.push(nk);
    Tensor::from_vec(scores, shape, &Device::Cpu)
}

/// One attention group: `(q . k^T) . v` as `[Nq, Dv]` into `out`.
///
/// Scores are computed transposed, `s^T [Nk, Nq]`, so that every active value spike `v[j, c]`
/// adds a whole contiguous score row `s^T[j, ..]` to output column `c`: vector adds of small
/// integers, no multiplications.
#[inline(always)]
fn attention_group(
    q: &SpikeBits,
    k: &SpikeBits,
    v: &SpikeBits,
    g: usize,
    (nq, nk): (usize, usize),
    out: &mut [u32],
) {
    let dv = v.cols();
    let mut scores_t = vec![0u32; nk * nq];
    popcount_products(
        k,
        g * nk..(g + 1) * nk,
        q,
        g * nq..(g + 1) * nq,
        &mut scores_t,
    );
    let mut out_t = vec![0u32; dv * nq];
    for (j, s_row) in scores_t.chunks_exact(nq).enumerate() {
        for_each_active(v.row(g * nk + j), |c| {
            for (o, s) in out_t[c * nq..(c + 1) * nq].iter_mut().zip(s_row) {
                *o += s;
            }
        });
    }
    for (i, out_row) in out.chunks_exact_mut(dv).enumerate() {
        for (c, o) in out_row.iter_mut().enumerate() {
            *o = out_t[c * nq + i];
        }
    }
}

/// Spiking self-attention's `(q . k^T) . v` for spikes `q [..., Nq, D]`, `k [..., Nk, D]`,
/// `v [..., Nk, Dv]`: `[..., Nq, Dv]` u32, exactly the dense product of the unpacked spikes.
pub fn spike_attention(q: &SpikeBits, k: &SpikeBits, v: &SpikeBits) -> Result<Tensor> {
    spike_attention_at(simd::SPIKE_ATTENTION.level(), q, k, v)
}

/// [`spike_attention`] on the instruction set `level`.
fn spike_attention_at(level: Level, q: &SpikeBits, k: &SpikeBits, v: &SpikeBits) -> Result<Tensor> {
    let (groups, nq, nk) = attention_dims(q, k, Some(v), "spike_attention")?;
    let dv = v.cols();
    let mut out = vec![0u32; groups * nq * dv];
    if nq * dv > 0 {
        out.par_chunks_mut(nq * dv)
            .enumerate()
            .for_each(|(g, out)| {
                simd::dispatch(level, || attention_group(q, k, v, g, (nq, nk), out))
            });
    }
    let mut shape = q.shape[..q.shape.len() - 1].to_vec();
    shape.push(dv);
    Tensor::from_vec(out, shape, &Device::Cpu)
}

/// The spike-driven accumulators pinned in vector registers: left to itself, the compiler
/// keeps them on the stack and stores them all after every row, which halves the kernel's
/// speed. Lane by lane the sums run in the same order as [`add_rows`]', so results are
/// bit-identical.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`super::add_rows`] in eight AVX registers.
    ///
    /// # Safety
    /// The CPU must have AVX2, and every row in `active` must lie inside `block`
    /// (`r < block.len() / BLOCK`): checking it here would cost a fifth of the kernel's time.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn add_rows_avx2<const SUB: bool>(
        block: &[f32],
        active: &[u32],
        acc: &mut Lanes,
    ) {
        const REGS: usize = BLOCK / 8;
        debug_assert!(active.iter().all(|&r| (r as usize) < block.len() / BLOCK));
        let base = block.as_ptr();
        // SAFETY: `acc` holds REGS * 8 lanes and every row read lies inside `block` (the
        // caller's promise); unaligned loads and stores are used throughout.
        unsafe {
            let mut regs = [_mm256_setzero_ps(); REGS];
            for (i, reg) in regs.iter_mut().enumerate() {
                *reg = _mm256_loadu_ps(acc.as_ptr().add(i * 8));
            }
            for &r in active {
                let row = base.add(r as usize * BLOCK);
                for (i, reg) in regs.iter_mut().enumerate() {
                    let w = _mm256_loadu_ps(row.add(i * 8));
                    *reg = if SUB {
                        _mm256_sub_ps(*reg, w)
                    } else {
                        _mm256_add_ps(*reg, w)
                    };
                }
            }
            for (i, reg) in regs.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(i * 8), *reg);
            }
        }
    }

    /// [`super::pack_row_by_quads`] sixteen spikes to a compare.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_row_avx512(row: &[f32], words: &mut [u64]) {
        let one = _mm512_set1_ps(1.0);
        for (word, chunk) in words.iter_mut().zip(row.chunks(WORD_BITS)) {
            let sixteens = chunk.chunks_exact(16);
            let rest = sixteens.remainder();
            let mut bits = 0;
            for (i, s) in sixteens.enumerate() {
                // SAFETY: the load reads the 16 floats of `s`.
                let mask =
                    unsafe { _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_loadu_ps(s.as_ptr()), one) };
                bits |= u64::from(mask) << (16 * i);
            }
            if !rest.is_empty() {
                let mut tail = [0u64];
                pack_row_by_quads(rest, &mut tail);
                bits |= tail[0] << (chunk.len() - rest.len());
            }
            *word = bits;
        }
    }

    /// [`super::add_rows`] in four AVX-512 registers.
    ///
    /// # Safety
    /// As [`add_rows_avx2`], with AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_rows_avx512<const SUB: bool>(
        block: &[f32],
        active: &[u32],
        acc: &mut Lanes,
    ) {
        const REGS: usize = BLOCK / 16;
        debug_assert!(active.iter().all(|&r| (r as usize) < block.len() / BLOCK));
        let base = block.as_ptr();
        // SAFETY: as in `add_rows_avx2`, sixteen lanes to a register.
        unsafe {
            let mut regs = [_mm512_setzero_ps(); REGS];
            for (i, reg) in regs.iter_mut().enumerate() {
                *reg = _mm512_loadu_ps(acc.as_ptr().add(i * 16));
            }
            for &r in active {
                let row = base.add(r as usize * BLOCK);
                for (i, reg) in regs.iter_mut().enumerate() {
                    let w = _mm512_loadu_ps(row.add(i * 16));
                    *reg = if SUB {
                        _mm512_sub_ps(*reg, w)
                    } else {
                        _mm512_add_ps(*reg, w)
                    };
                }
            }
            for (i, reg) in regs.iter().enumerate() {
                _mm512_storeu_ps(acc.as_mut_ptr().add(i * 16), *reg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::*;

    /// Random 0/1 spikes firing at about `rate`.
    fn spikes(shape: &[usize], rate: f64) -> Tensor {
        let u = Tensor::rand(0f32, 1.0, shape, &Device::Cpu).unwrap();
        u.lt(rate).unwrap().to_dtype(DType::F32).unwrap()
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
    fn heads_first_and_reshape_follow_the_unpacked_tensor() {
        let s = spikes(&[2, 3, 5, 4, 48], 0.3);
        let bits = SpikeBits::pack(&s).unwrap();
        let swapped = bits.heads_first().unwrap();
        assert_eq!(
            swapped,
            SpikeBits::pack(&s.transpose(2, 3).unwrap()).unwrap()
        );
        assert_eq!(
            bits.counts_per_leading().iter().sum::<u64>(),
            bits.count() as u64
        );
        let flat = bits.reshaped(vec![6, 20, 48]).unwrap();
        assert_eq!(
            flat,
            SpikeBits::pack(&s.reshape((6, 20, 48)).unwrap()).unwrap()
        );
        assert!(SpikeBits::pack(&s)
            .unwrap()
            .reshaped(vec![6, 5, 192])
            .is_err());
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
        let w = Tensor::randn(0f32, 1.0, (130, 100), &Device::Cpu).unwrap();
        let ours = spike_linear(&SpikeBits::pack(&s).unwrap(), &w).unwrap();
        let dense = s.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(ours.dims(), &[2, 7, 130]);
        assert!(max_rel_diff(&ours, &dense) < 1e-5);
    }

    /// Sparse rows add their active inputs' weights, dense ones (above half firing, around
    /// 0.5 a mix of both) subtract their silent inputs' from the all-on sum, bias included.
    #[test]
    fn layer_bias_starts_the_sums_at_every_firing_rate() {
        let w = Tensor::randn(0f32, 1.0, (66, 70), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 66, &Device::Cpu).unwrap();
        let layer = SpikeLayer::new(&w, Some(&b)).unwrap();
        for rate in [0.3, 0.5, 0.9, 1.0] {
            let s = spikes(&[40, 70], rate);
            let ours = layer
                .linear(&SpikeBits::pack(&s).unwrap(), &Device::Cpu)
                .unwrap();
            let dense = s
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            assert!(max_rel_diff(&ours, &dense) < 1e-5, "rate {rate}");
        }
        let err = SpikeLayer::new(&w, Some(&b.narrow(0, 0, 3).unwrap()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias"), "{err}");
    }

    /// A layer into a LIF fires what the LIF fires on the layer's output, in groups of columns
    /// that cut across the 64-output blocks and words, with output counts that leave a block
    /// partly padded and pixel counts that leave the last task short.
    #[test]
    fn layers_into_a_lif_fire_the_spikes_of_their_outputs() {
        use crate::neuron::{LifConfig, MultiStepLif};
        let lif = MultiStepLif::new(LifConfig::default());
        let dev = &Device::Cpu;
        for (o, groups) in [(96, 1), (96, 3), (96, 2), (70, 2)] {
            let w = Tensor::randn(0f32, 1.0, (o, 70), dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, o, dev).unwrap();
            let layer = SpikeLayer::new(&w, Some(&b)).unwrap();
            let bits = SpikeBits::pack(&spikes(&[4, 37, 70], 0.2)).unwrap();
            let out = layer.linear(&bits, dev).unwrap();
            let grouped = match groups {
                1 => out,
                _ => out.reshape((4, 37, groups, o / groups)).unwrap(),
            };
            let want = lif.forward_bits(&grouped).unwrap();
            assert!(want.count() > 0, "nothing fired");
            let ours = layer.linear_fired(&bits, &lif, groups).unwrap();
            assert_eq!(ours, want, "{o} outputs in {groups} groups");
        }
        let conv = Tensor::randn(0f32, 1.0, (9, 7, 3, 3), dev).unwrap();
        let layer = SpikeLayer::new(&conv, None).unwrap();
        let bits = SpikeBits::pack_channels_last(&spikes(&[4 * 2, 7, 6, 5], 0.3)).unwrap();
        let out = layer.conv2d_channels_last(&bits, 1, 1, dev).unwrap();
        let want = lif
            .forward_bits(&out.reshape((4, 2, 6, 5, 9)).unwrap())
            .unwrap();
        let ours = layer
            .conv2d_channels_last_fired(&bits, (1, 1), 4, &lif)
            .unwrap();
        assert_eq!(ours, want);
        let err = layer
            .conv2d_channels_last_fired(&bits, (1, 1), 3, &lif)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not 3 steps"), "{err}");
    }

    fn check_conv(
        shape: (usize, usize, usize, usize),
        o: usize,
        (k, pad, st): (usize, usize, usize),
        rate: f64,
    ) {
        let (b, c, h, w) = shape;
        let s = spikes(&[b, c, h, w], rate);
        let wt = Tensor::randn(0f32, 1.0, (o, c, k, k), &Device::Cpu).unwrap();
        let bits = SpikeBits::pack_channels_last(&s).unwrap();
        let ours = spike_conv2d(&bits, &wt, pad, st).unwrap();
        let dense = s.conv2d(&wt, pad, st, 1, 1).unwrap();
        assert_eq!(ours.dims(), dense.dims());
        assert!(max_rel_diff(&ours, &dense) < 1e-5);
    }

    /// At 0.8 the inner pixels subtract silent inputs while the border ones, whose windows
    /// leave the image, add active ones.
    #[test]
    fn conv3x3_matches_dense() {
        for rate in [0.15, 0.8] {
            check_conv((2, 70, 7, 5), 9, (3, 1, 1), rate);
        }
    }

    #[test]
    fn conv1x1_and_strided_match_dense() {
        for rate in [0.15, 0.8] {
            check_conv((3, 5, 6, 6), 4, (1, 0, 1), rate);
            check_conv((2, 3, 9, 9), 4, (3, 1, 2), rate);
        }
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
        let out = spike_attention(&pack(&q), &pack(&k), &pack(&v)).unwrap();
        let dense_out = dense.matmul(&v).unwrap();
        assert_eq!(out.dims(), &[2, 3, 9, 70]);
        assert_eq!(max_rel_diff(&as_f32(&out), &dense_out), 0.0);
    }

    /// Every instruction set gives the same bits and bit-identical sums (the AVX-512 path is
    /// skipped, with a note, where the CPU lacks it).
    #[test]
    fn every_simd_level_packs_gathers_and_attends_alike() {
        let levels = Level::supported_levels();
        if !Level::Avx512.supported() {
            println!("skipped the avx512 path: this CPU lacks AVX-512");
        }
        let s = spikes(&[3, 203], 0.4);
        let values = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let packed = |level| {
            let mut words = vec![0u64; 3 * 4];
            for (row, w) in values.chunks(203).zip(words.chunks_mut(4)) {
                pack_binary_row_at(level, row, w);
            }
            words
        };
        let portable = packed(Level::Portable);
        assert_eq!(portable, SpikeBits::pack(&s).unwrap().words);
        let w = Tensor::randn(0f32, 1.0, (70, 9, 3, 3), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 70, &Device::Cpu).unwrap();
        let layer = SpikeLayer::new(&w, Some(&b)).unwrap();
        let conv = |bits: &SpikeBits, level| {
            Gather {
                windows: Windows {
                    spikes: bits,
                    dims: (2, 7, 5, 9),
                    win: Window {
                        kh: 3,
                        kw: 3,
                        padding: 1,
                        stride: 1,
                    },
                    out_hw: (7, 5),
                },
                weights: &layer.weights,
                schedule: LAYER,
            }
            .run_at(level)
        };
        let (q, k, v) = (
            SpikeBits::pack(&spikes(&[2, 9, 70], 0.3)).unwrap(),
            SpikeBits::pack(&spikes(&[2, 9, 70], 0.3)).unwrap(),
            SpikeBits::pack(&spikes(&[2, 9, 70], 0.3)).unwrap(),
        );
        let attend = |level| {
            spike_attention_at(level, &q, &k, &v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        };
        for rate in [0.15, 0.8] {
            let bits = SpikeBits::pack_channels_last(&spikes(&[2, 9, 7, 5], rate)).unwrap();
            let expected = conv(&bits, Level::Portable);
            for &level in &levels {
                assert_eq!(conv(&bits, level), expected, "{level}, rate {rate}");
            }
        }
        for &level in &levels {
            assert_eq!(packed(level), portable, "{level}");
            assert_eq!(attend(level), attend(Level::Portable), "{level}");
        }
    }
}
