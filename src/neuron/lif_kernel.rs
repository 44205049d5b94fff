//! The per-neuron loops of the LIF op.
//!
//! The charge rule and the surrogate are type parameters, so each configuration compiles to its
//! own loop with no branches on settings inside, and the loops vectorise; on x86-64 CPUs with
//! AVX2 and FMA a second copy of each loop runs eight lanes wide. Work is split over chunks of
//! neurons: a chunk's T membrane values stay in cache while backward runs through time.

use std::ops::Range;

use rayon::prelude::*;

use super::lif::LifConfig;
use super::surrogate::{atan_slope, sigmoid_slope, Surrogate};
use crate::kernels::buffer;
use crate::kernels::simd::{self, Level};
use crate::kernels::spikes::pack_binary_row;

/// Neurons per work item.
const CHUNK: usize = 1024;

/// How the membrane integrates its input. Each rule keeps SpikingJelly's operation order, so
/// spikes match it bit for bit.
trait Charge: Copy + Send + Sync {
    fn charge(self, v: f32, x: f32) -> f32;
}

#[derive(Clone, Copy)]
struct DecayToZero {
    tau: f32,
}
impl Charge for DecayToZero {
    #[inline(always)]
    fn charge(self, v: f32, x: f32) -> f32 {
        v + (x - v) / self.tau
    }
}

#[derive(Clone, Copy)]
struct DecayToReset {
    tau: f32,
    v_reset: f32,
}
impl Charge for DecayToReset {
    #[inline(always)]
    fn charge(self, v: f32, x: f32) -> f32 {
        v + (x - (v - self.v_reset)) / self.tau
    }
}

#[derive(Clone, Copy)]
struct LeakToZero {
    keep: f32,
}
impl Charge for LeakToZero {
    #[inline(always)]
    fn charge(self, v: f32, x: f32) -> f32 {
        v * self.keep + x
    }
}

#[derive(Clone, Copy)]
struct LeakToReset {
    tau: f32,
    v_reset: f32,
}
impl Charge for LeakToReset {
    #[inline(always)]
    fn charge(self, v: f32, x: f32) -> f32 {
        v - (v - self.v_reset) / self.tau + x
    }
}

/// The surrogate derivative of the firing step.
trait Slope: Copy + Send + Sync {
    fn slope(self, x: f32) -> f32;
}

#[derive(Clone, Copy)]
struct SigmoidSlope(f32);
impl Slope for SigmoidSlope {
    #[inline(always)]
    fn slope(self, x: f32) -> f32 {
        sigmoid_slope(self.0, x)
    }
}

#[derive(Clone, Copy)]
struct AtanSlope(f32);
impl Slope for AtanSlope {
    #[inline(always)]
    fn slope(self, x: f32) -> f32 {
        atan_slope(self.0, x)
    }
}

/// Settings that enter the loops as plain numbers (selects and multiplies, no branches).
#[derive(Clone, Copy)]
struct Common {
    v_th: f32,
    /// Membrane at rest, and after a hard reset.
    v_rest: f32,
    hard_reset: bool,
    /// 1 when the gradient flows through the spike inside the reset, 0 when detached.
    through_reset: f32,
    /// dH[t] / dX[t].
    input_slope: f32,
    /// dH[t] / dV[t-1] = 1 - 1 / tau.
    keep: f32,
}

impl Common {
    fn new(cfg: &LifConfig) -> Self {
        Self {
            v_th: cfg.v_threshold,
            v_rest: cfg.v_reset.unwrap_or(0.0),
            hard_reset: cfg.v_reset.is_some(),
            through_reset: if cfg.detach_reset { 0.0 } else { 1.0 },
            input_slope: if cfg.decay_input { 1.0 / cfg.tau } else { 1.0 },
            // SpikingJelly computes 1 - 1 / tau in double precision.
            keep: (1.0 - 1.0 / cfg.tau as f64) as f32,
        }
    }

    #[inline(always)]
    fn reset(&self, h: f32, spike: bool) -> f32 {
        let fired = if self.hard_reset {
            self.v_rest
        } else {
            h - self.v_th
        };
        if spike {
            fired
        } else {
            h
        }
    }

    /// dV[t] / dH[t] given the surrogate slope `sg` at H[t].
    #[inline(always)]
    fn reset_slope(&self, h: f32, spike: bool, sg: f32) -> f32 {
        let through = sg * self.through_reset;
        if self.hard_reset {
            let kept = if spike { 0.0 } else { 1.0 };
            kept + (self.v_rest - h) * through
        } else {
            1.0 - self.v_th * through
        }
    }
}

/// A raw output pointer shared by work items that write disjoint index ranges.
#[derive(Clone, Copy)]
struct DisjointOut(*mut f32);
// SAFETY: work items only form slices over their own chunk's neurons (see `slice`), so no two
// threads touch the same element, and the buffer outlives the parallel loop using the pointer.
unsafe impl Send for DisjointOut {}
unsafe impl Sync for DisjointOut {}

/// How a pass reads its input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Steps {
    /// `[T, n]`: an input per step.
    PerStep,
    /// `[n]`, the input of every one of this many steps (direct encoding). Backward gives its
    /// gradient `[n]`, summed over the steps.
    Held(usize),
}

/// The input of `n` neurons over `steps` steps: `[T, n]`, or `[n]` held.
#[derive(Clone, Copy)]
struct Input<'a> {
    x: &'a [f32],
    n: usize,
    steps: usize,
    held: bool,
}

impl<'a> Input<'a> {
    fn new(x: &'a [f32], n: usize, steps: Steps) -> Self {
        let (steps, held) = match steps {
            Steps::PerStep => (x.len() / n.max(1), false),
            Steps::Held(steps) => (steps, true),
        };
        Self { x, n, steps, held }
    }

    /// The input of neurons `lo..hi` at step `t`.
    #[inline(always)]
    fn at(self, t: usize, lo: usize, hi: usize) -> &'a [f32] {
        let start = if self.held { 0 } else { t * self.n };
        &self.x[start + lo..start + hi]
    }
}

/// One call's buffers: input, upstream gradient `[T, n]` (backward only) and output.
#[derive(Clone, Copy)]
struct Pass<'a> {
    input: Input<'a>,
    grad_out: &'a [f32],
    out: DisjointOut,
    /// Forward only: count spikes per step (for monitors; skipped when none listens).
    count_spikes: bool,
}

impl<'a> Pass<'a> {
    fn new(input: Input<'a>, grad_out: &'a [f32], out: &mut [f32]) -> Self {
        Self {
            input,
            grad_out,
            out: DisjointOut(out.as_mut_ptr()),
            count_spikes: false,
        }
    }

    /// The output of neurons `lo..hi` at step `t`.
    ///
    /// # Safety
    /// Only the work item owning the chunk `lo..hi` may call this, one slice at a time, while
    /// the output buffer lives.
    #[inline(always)]
    unsafe fn out_slice<'o>(self, t: usize, lo: usize, hi: usize) -> &'o mut [f32] {
        std::slice::from_raw_parts_mut(self.out.0.add(t * self.input.n + lo), hi - lo)
    }
}

/// Applies `f` elementwise over two mutable and one shared slice (the shortest length wins).
#[inline(always)]
fn for_each_lane(
    a: &mut [f32],
    b: &mut [f32],
    c: &[f32],
    f: impl Fn(&mut f32, &mut f32, f32) + Copy,
) {
    let len = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&mut a[..len], &mut b[..len], &c[..len]);
    for i in 0..len {
        f(&mut a[i], &mut b[i], c[i]);
    }
}

/// One step of one neuron: charge membrane `v` with input `x`, fire into `o` (0 or 1), reset.
#[inline(always)]
fn step<C: Charge>(c: C, k: Common, o: &mut f32, v: &mut f32, x: f32) {
    let h = c.charge(*v, x);
    let s = h >= k.v_th;
    *v = k.reset(h, s);
    *o = if s { 1.0 } else { 0.0 };
}

#[inline(always)]
fn forward_chunk<C: Charge>(c: C, k: Common, pass: Pass, lo: usize, hi: usize) -> Vec<u64> {
    let mut v = [k.v_rest; CHUNK];
    let mut spikes = vec![0u64; pass.input.steps];
    for (t, fired_at_t) in spikes.iter_mut().enumerate() {
        let xs = pass.input.at(t, lo, hi);
        // SAFETY: this work item owns lo..hi.
        let out = unsafe { pass.out_slice(t, lo, hi) };
        for_each_lane(out, &mut v, xs, |o, v, x| step(c, k, o, v, x));
        if pass.count_spikes {
            *fired_at_t = out.iter().filter(|&&s| s != 0.0).count() as u64;
        }
    }
    spikes
}

/// Rows `rows` (of `cols` neurons) of the input: their spikes packed 64 to a word,
/// `[T, rows, words_per_row]`, the same spikes as [`forward_chunk`]'s.
#[inline(always)]
fn bits_chunk<C: Charge>(
    c: C,
    k: Common,
    input: Input,
    (cols, words_per_row): (usize, usize),
    rows: Range<usize>,
) -> Vec<u64> {
    let (lo, hi) = (rows.start * cols, rows.end * cols);
    let mut v = vec![k.v_rest; hi - lo];
    let mut spikes = vec![0f32; hi - lo];
    let mut words = vec![0u64; input.steps * rows.len() * words_per_row];
    for (t, words) in words
        .chunks_exact_mut(rows.len() * words_per_row)
        .enumerate()
    {
        for_each_lane(&mut spikes, &mut v, input.at(t, lo, hi), |o, v, x| {
            step(c, k, o, v, x)
        });
        for (row, row_words) in spikes
            .chunks_exact(cols)
            .zip(words.chunks_exact_mut(words_per_row))
        {
            pack_binary_row(row, row_words);
        }
    }
    words
}

#[inline(always)]
fn backward_chunk<C: Charge, S: Slope>(c: C, sl: S, k: Common, pass: Pass, lo: usize, hi: usize) {
    let (n, width, steps) = (pass.input.n, hi - lo, pass.input.steps);
    // The chunk's membrane trajectory H[t], recomputed rather than stored by forward.
    let mut h = vec![0f32; steps * width];
    let mut v = [k.v_rest; CHUNK];
    for t in 0..steps {
        let xs = pass.input.at(t, lo, hi);
        for_each_lane(&mut h[t * width..(t + 1) * width], &mut v, xs, |h, v, x| {
            *h = c.charge(*v, x);
            *v = k.reset(*h, *h >= k.v_th);
        });
    }
    // Backprop through time: gv carries dL/dV[t] back to step t - 1. Each H[t] is replaced by
    // dL/dX[t] in place, then copied out.
    let mut gv = [0f32; CHUNK];
    for t in (0..steps).rev() {
        let gs = &pass.grad_out[t * n + lo..t * n + hi];
        let hs = &mut h[t * width..(t + 1) * width];
        for_each_lane(hs, &mut gv, gs, |h, gv, gs| {
            let spike = *h >= k.v_th;
            let sg = sl.slope(*h - k.v_th);
            let gh = gs * sg + *gv * k.reset_slope(*h, spike, sg);
            *h = gh * k.input_slope;
            *gv = gh * k.keep;
        });
        if !pass.input.held {
            // SAFETY: this work item owns lo..hi.
            unsafe { pass.out_slice(t, lo, hi) }.copy_from_slice(hs);
        }
    }
    if pass.input.held {
        // Summed in step order from zero, as candle sums the gradient of a repeated input.
        // SAFETY: this work item owns lo..hi.
        let out = unsafe { pass.out_slice(0, lo, hi) };
        out.fill(0.0);
        for gx in h.chunks_exact(width) {
            for (o, g) in out.iter_mut().zip(gx) {
                *o += g;
            }
        }
    }
}

/// The neuron ranges `lo..hi` of the work items, in parallel.
fn chunks(n: usize) -> impl IndexedParallelIterator<Item = (usize, usize)> {
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(move |c| (c * CHUNK, ((c + 1) * CHUNK).min(n)))
}

/// Runs the forward loop on every chunk and sums the per-step spike counts.
fn par_forward(n: usize, chunk: impl Fn(usize, usize) -> Vec<u64> + Sync) -> Vec<u64> {
    chunks(n)
        .map(|(lo, hi)| chunk(lo, hi))
        .reduce(Vec::new, |a, b| {
            if a.is_empty() {
                return b;
            }
            a.iter().zip(&b).map(|(a, b)| a + b).collect()
        })
}

/// Code generic over the charge rule, instantiated once per rule by [`with_charge`].
trait WithCharge {
    type Out;
    fn run<C: Charge>(self, c: C) -> Self::Out;
}

fn with_charge<W: WithCharge>(cfg: &LifConfig, w: W) -> W::Out {
    let tau = cfg.tau;
    match (cfg.decay_input, cfg.v_reset.filter(|&v| v != 0.0)) {
        (true, None) => w.run(DecayToZero { tau }),
        (true, Some(v_reset)) => w.run(DecayToReset { tau, v_reset }),
        (false, None) => w.run(LeakToZero {
            keep: Common::new(cfg).keep,
        }),
        (false, Some(v_reset)) => w.run(LeakToReset { tau, v_reset }),
    }
}

struct Forward<'a> {
    cfg: &'a LifConfig,
    pass: Pass<'a>,
    level: Level,
}

impl WithCharge for Forward<'_> {
    type Out = Vec<u64>;
    fn run<C: Charge>(self, c: C) -> Vec<u64> {
        let (k, pass, level) = (Common::new(self.cfg), self.pass, self.level);
        par_forward(pass.input.n, |lo, hi| {
            simd::on_level!(level, forward_chunk(c, k, pass, lo, hi))
        })
    }
}

struct ForwardBits<'a> {
    cfg: &'a LifConfig,
    input: Input<'a>,
    cols: usize,
    level: Level,
    /// All rows in one work item on the calling thread.
    serial: bool,
}

impl WithCharge for ForwardBits<'_> {
    type Out = Vec<u64>;
    fn run<C: Charge>(self, c: C) -> Vec<u64> {
        let (k, input, level) = (Common::new(self.cfg), self.input, self.level);
        let row_shape = (self.cols, self.cols.div_ceil(u64::BITS as usize));
        let rows = input.n / self.cols;
        if self.serial {
            return simd::on_level!(level, bits_chunk(c, k, input, row_shape, 0..rows));
        }
        // Whole rows per work item, about CHUNK neurons.
        let per_item = (CHUNK / self.cols).max(1);
        let items: Vec<Vec<u64>> = (0..rows.div_ceil(per_item))
            .into_par_iter()
            .map(|i| {
                let rows = i * per_item..((i + 1) * per_item).min(rows);
                simd::on_level!(level, bits_chunk(c, k, input, row_shape, rows))
            })
            .collect();
        // Items hold [T, their rows, words]; the result is [T, all rows, words].
        let steps = input.steps;
        let mut words = Vec::with_capacity(steps * rows * row_shape.1);
        for t in 0..steps {
            for item in &items {
                let per_step = item.len() / steps;
                words.extend_from_slice(&item[t * per_step..(t + 1) * per_step]);
            }
        }
        words
    }
}

struct Backward<'a> {
    cfg: &'a LifConfig,
    pass: Pass<'a>,
    level: Level,
}

impl Backward<'_> {
    fn run_with<C: Charge, S: Slope>(self, c: C, sl: S) {
        let (k, pass, level) = (Common::new(self.cfg), self.pass, self.level);
        chunks(pass.input.n)
            .for_each(|(lo, hi)| simd::on_level!(level, backward_chunk(c, sl, k, pass, lo, hi)));
    }
}

impl WithCharge for Backward<'_> {
    type Out = ();
    fn run<C: Charge>(self, c: C) {
        match self.cfg.surrogate {
            Surrogate::Sigmoid { alpha } => self.run_with(c, SigmoidSlope(alpha)),
            Surrogate::ATan { alpha } => self.run_with(c, AtanSlope(alpha)),
        }
    }
}

/// Spikes `[T, n]` of input `x` of `n` neurons read as `steps` says, and the number of spikes at
/// each step (zeros unless counted), computed at `level`.
pub(super) fn forward(
    level: Level,
    cfg: &LifConfig,
    x: &[f32],
    n: usize,
    steps: Steps,
    count_spikes: bool,
) -> (Vec<f32>, Vec<u64>) {
    let len = match steps {
        Steps::PerStep => x.len(),
        Steps::Held(steps) => steps * x.len(),
    };
    let mut out = buffer::zeroed(len);
    let pass = Pass {
        count_spikes,
        ..Pass::new(Input::new(x, n, steps), &[], &mut out)
    };
    let per_step = with_charge(cfg, Forward { cfg, pass, level });
    (out, per_step)
}

/// Spikes of input `x` of `n` neurons read as `steps` says, the neurons forming rows of `cols`,
/// packed 64 to a word per row: `[T, n / cols, cols.div_ceil(64)]` words, bit `j % 64` of word
/// `j / 64` for column `j`; on the calling thread alone if `serial` (for kernels that make the
/// input a piece at a time inside their own parallel tasks).
pub(super) fn forward_bits(
    level: Level,
    cfg: &LifConfig,
    x: &[f32],
    (n, cols): (usize, usize),
    (steps, serial): (Steps, bool),
) -> Vec<u64> {
    if n == 0 || cols == 0 {
        return Vec::new();
    }
    let input = Input::new(x, n, steps);
    with_charge(
        cfg,
        ForwardBits {
            cfg,
            input,
            cols,
            level,
            serial,
        },
    )
}

/// dL/dX of input `x` of `n` neurons read as `steps` says, given dL/dS `[T, n]`; the shape of
/// `x`.
pub(super) fn backward(
    level: Level,
    cfg: &LifConfig,
    x: &[f32],
    grad_out: &[f32],
    n: usize,
    steps: Steps,
) -> Vec<f32> {
    let mut gx = buffer::zeroed(x.len());
    let pass = Pass::new(Input::new(x, n, steps), grad_out, &mut gx);
    with_charge(cfg, Backward { cfg, pass, level });
    gx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs around the threshold, with a partial last chunk and a tail shorter than a block.
    fn inputs(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.3) * 3.0)
            .collect()
    }

    #[test]
    fn every_simd_level_gives_the_same_spikes_and_gradients() {
        let (steps, n) = (4, CHUNK + 13);
        let x = inputs(steps * n);
        let g: Vec<f32> = inputs(steps * n).iter().map(|v| v * 0.7 - 0.1).collect();
        let configs = [
            LifConfig {
                detach_reset: false,
                ..LifConfig::default()
            },
            LifConfig {
                surrogate: Surrogate::atan(),
                v_reset: None,
                ..LifConfig::default()
            },
        ];
        let cols = 70;
        let run = |level: Level, cfg: &LifConfig| {
            let (spikes, counts) = forward(level, cfg, &x, n, Steps::PerStep, true);
            let held = forward(level, cfg, &x[..n], n, Steps::Held(steps), false).0;
            let bits = forward_bits(
                level,
                cfg,
                &x[..cols * 20],
                (cols * 20, cols),
                (Steps::Held(3), false),
            );
            // Many work items, or one on this thread: the same words.
            let per_step = |serial| {
                forward_bits(
                    level,
                    cfg,
                    &x,
                    (n / cols * cols, cols),
                    (Steps::PerStep, serial),
                )
            };
            assert_eq!(per_step(true), per_step(false));
            let gx = backward(level, cfg, &x, &g, n, Steps::PerStep);
            let gx_held = backward(level, cfg, &x[..n], &g, n, Steps::Held(steps));
            (spikes, counts, held, bits, gx, gx_held)
        };
        for cfg in &configs {
            let portable = run(Level::Portable, cfg);
            assert!(portable.0.contains(&1.0) && portable.0.contains(&0.0));
            for level in Level::supported_levels() {
                let ours = run(level, cfg);
                // Bit-identical: the same operations in the same order at every width.
                assert_eq!(ours, portable, "{level}");
            }
            if !Level::Avx512.supported() {
                println!("skipped the avx512 path: this CPU lacks AVX-512");
            }
        }
    }
}
