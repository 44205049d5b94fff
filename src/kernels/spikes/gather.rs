//! The accumulate-only gather: weights blocked so that the rows a pixel's spikes select lie
//! together, and the tasks that sum them, shared by linear layers, convolutions and the
//! spike-fed weight gradients.

use std::mem::MaybeUninit;
use std::ops::Range;

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::bits::{for_each_active, for_each_silent, SpikeBits, WORD_BITS};
#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::kernels::buffer;
use crate::kernels::conv::{weight_matrix, Window};
use crate::kernels::simd::{self, Level};
use crate::kernels::with_f32;
use crate::neuron::MultiStepLif;

/// Output lanes kept in registers while the active weight rows stream past: 8 AVX registers.
pub(crate) const BLOCK: usize = 64;

/// Inputs per weight tile: `TILE` rows of `BLOCK` lanes, 24 KB, within an L1 data cache.
const TILE: usize = 96;

/// One block's accumulators.
pub(super) type Lanes = [f32; BLOCK];

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
pub(in crate::kernels) struct BlockedWeights {
    data: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// Per padded output lane: the bias plus every input's weight, the output when all inputs
    /// fire (summed in f64), from which a mostly active pixel subtracts its silent inputs; only
    /// where some window may fire more than half of its inputs.
    full: Option<Vec<f32>>,
    pub(super) inputs: usize,
    pub(super) outputs: usize,
}

impl BlockedWeights {
    /// From a weight `[O, C, kh, kw]`, inputs ordered like [`weight_matrix`]'s columns, and an
    /// optional bias `[O]`.
    pub(super) fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
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
        let len = outputs.div_ceil(BLOCK) * inputs * BLOCK;
        let data = buffer::zeroed_by_chunks(len, inputs * BLOCK, |b, block| {
            let lanes = b * BLOCK..((b + 1) * BLOCK).min(outputs);
            for (to, row) in block
                .chunks_exact_mut(BLOCK)
                .zip(rows.chunks_exact(outputs))
            {
                to[..lanes.len()].copy_from_slice(&row[lanes.clone()]);
            }
        });
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
    let len = outputs.div_ceil(BLOCK) * inputs * BLOCK;
    buffer::zeroed_by_chunks(len, inputs * BLOCK, |b, block| {
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
    })
}

/// The windows a convolution reads from channels-last spikes `[B, H, W, C]`; a linear layer's
/// `[M, K]` spikes are `[M, 1, 1, K]` under a 1x1 window.
#[derive(Clone, Copy)]
pub(in crate::kernels) struct Windows<'a> {
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
pub(in crate::kernels) struct Gather<'a> {
    pub windows: Windows<'a>,
    pub weights: &'a BlockedWeights,
    pub schedule: Schedule,
}

/// How a [`Gather`] cuts its work: inputs per weight tile, output rows per parallel task (each
/// task streams every weight block once).
#[derive(Debug, Clone, Copy)]
pub(in crate::kernels) struct Schedule {
    pub tile: usize,
    pub rows_per_task: usize,
}

/// A layer's forward: up to a few thousand inputs per window, many output pixels.
pub(super) const LAYER: Schedule = Schedule {
    tile: TILE,
    rows_per_task: ROWS_PER_TASK,
};

/// The weight rows one task's output pixels accumulate: pixel `p`'s rows within tile `t` are
/// `active[splits[p * (tiles + 1) + t]..splits[p * (tiles + 1) + t + 1]]`, to be subtracted
/// from the all-on sums if `subtract[p]`. It depends on the spikes alone, so a layer run a
/// slice of outputs at a time ([`sparse_linear_sliced`]) chooses it once for every slice.
pub(in crate::kernels) struct Selection {
    active: Vec<u32>,
    splits: Vec<usize>,
    subtract: Vec<bool>,
}

/// Where a [`Gather`] writes: rows of `stride` values, its outputs from column `offset` on.
#[derive(Clone, Copy)]
pub(super) struct Placement {
    pub(super) stride: usize,
    pub(super) offset: usize,
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
            .map(|task| simd::on_level!(level, self.select_pixels(self.task_pixels(task))))
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
    pub(super) fn run_into(
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
                        own = simd::on_level!(level, self.select_pixels(pixels));
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
    pub(super) fn run_fired(&self, lif: &MultiStepLif, steps: usize, groups: usize) -> Vec<u64> {
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
                let sel = simd::on_level!(level, self.select_pixels(pixels.iter().copied()));
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
                return simd::on_level!(level, {
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
                return simd::on_level!(level, {
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
