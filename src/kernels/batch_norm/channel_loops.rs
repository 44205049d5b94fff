//! The per-channel loops of BatchNorm: sums over a channel's values and an affine map per
//! channel, in parallel work items, each compiled for the CPU's SIMD level.

use candle_core::{Result, Shape};
use rayon::prelude::*;

use crate::kernels::buffer;
use crate::kernels::simd::{self, Level};

/// A tensor `[N, C, ...]` seen as `[outer, c, inner]`: statistics are per channel `c`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub(super) outer: usize,
    pub(super) c: usize,
    pub(super) inner: usize,
}

impl Dims {
    pub(super) fn of(shape: &Shape) -> Result<Self> {
        let dims = shape.dims();
        if dims.len() < 2 {
            candle_core::bail!("batch_norm: expected [N, C, ...], got {shape:?}")
        }
        Ok(Self {
            outer: dims[0],
            c: dims[1],
            inner: dims[2..].iter().product(),
        })
    }

    /// Values per channel.
    pub(super) fn count(&self) -> usize {
        self.outer * self.inner
    }
}

/// Rows of `[c, inner]` per work item: enough floats to amortise the per-item partial sums.
fn rows_per_task(d: Dims) -> usize {
    (65_536 / (d.c * d.inner).max(1)).max(1)
}

/// Per channel, `sum(a - ca)` and `sum((a - ca) * (b - cb))` over `a`, `b` laid out as `d`
/// (`ca`, `cb`: a per-channel centre, or none for zero). Runs of one channel are summed in
/// eight f32 lanes, channels and work items in f64.
pub(super) fn channel_sums(
    level: Level,
    a: &[f32],
    b: &[f32],
    d: Dims,
    (ca, cb): (Option<&[f64]>, Option<&[f64]>),
) -> (Vec<f64>, Vec<f64>) {
    // Per-channel centres as the f32 values subtracted, so that the channel loops vectorise.
    let centres = |c: Option<&[f64]>| -> Vec<f32> {
        (0..d.c).map(|ch| c.map_or(0.0, |c| c[ch] as f32)).collect()
    };
    let (ca, cb) = (centres(ca), centres(cb));
    let rows = rows_per_task(d) * d.c * d.inner;
    let partials: Vec<(Vec<f64>, Vec<f64>)> = a
        .par_chunks(rows)
        .zip(b.par_chunks(rows))
        .map(|(a, b)| simd::on_level!(level, task_sums(a, b, d, (&ca, &cb))))
        .collect();
    let (mut sa, mut sab) = (vec![0f64; d.c], vec![0f64; d.c]);
    for (pa, pab) in partials {
        for ch in 0..d.c {
            sa[ch] += pa[ch];
            sab[ch] += pab[ch];
        }
    }
    (sa, sab)
}

/// [`channel_sums`] of one work item's rows.
#[inline(always)]
fn task_sums(a: &[f32], b: &[f32], d: Dims, (ca, cb): (&[f32], &[f32])) -> (Vec<f64>, Vec<f64>) {
    let row = d.c * d.inner;
    let (mut sa, mut sab) = (vec![0f64; d.c], vec![0f64; d.c]);
    for (ra, rb) in a.chunks_exact(row).zip(b.chunks_exact(row)) {
        if d.inner == 1 {
            let centred = ra.iter().zip(rb).zip(ca.iter().zip(cb));
            for ((s, p), ((&a, &b), (&ca, &cb))) in sa.iter_mut().zip(sab.iter_mut()).zip(centred) {
                let x = (a - ca) as f64;
                *s += x;
                *p += x * (b - cb) as f64;
            }
            continue;
        }
        for ch in 0..d.c {
            let run = ch * d.inner..(ch + 1) * d.inner;
            let (s, p) = run_sums(&ra[run.clone()], &rb[run], ca[ch], cb[ch]);
            sa[ch] += s as f64;
            sab[ch] += p as f64;
        }
    }
    (sa, sab)
}

/// `sum(a - ca)` and `sum((a - ca) * (b - cb))` of one run, in eight independent lanes so that
/// the loop vectorises (float addition is not reassociated by the compiler).
#[inline(always)]
fn run_sums(a: &[f32], b: &[f32], ca: f32, cb: f32) -> (f32, f32) {
    const LANES: usize = 8;
    let (mut s, mut p) = ([0f32; LANES], [0f32; LANES]);
    let (a8, b8) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = a8.remainder().iter().zip(b8.remainder());
    for (a, b) in a8.zip(b8) {
        for j in 0..LANES {
            let x = a[j] - ca;
            s[j] += x;
            p[j] += x * (b[j] - cb);
        }
    }
    let (mut s, mut p) = (s.iter().sum::<f32>(), p.iter().sum::<f32>());
    for (&a, &b) in tail {
        s += a - ca;
        p += (a - ca) * (b - cb);
    }
    (s, p)
}

/// Per channel `ch`: `out = x * x[ch] + g * g[ch] + shift[ch]`.
pub(super) struct Affine {
    pub(super) x: Vec<f32>,
    pub(super) g: Vec<f32>,
    pub(super) shift: Vec<f32>,
}

/// [`Affine`] elementwise over `x` and `g` laid out as `d`, in parallel. The coefficients are
/// slices zipped with the data, not looked up per element, so the loops vectorise.
pub(super) fn per_channel_affine(
    level: Level,
    x: &[f32],
    g: &[f32],
    d: Dims,
    c: &Affine,
) -> Vec<f32> {
    let task = rows_per_task(d) * d.c * d.inner;
    buffer::zeroed_by_chunks(x.len(), task, |i, out| {
        let part = i * task..i * task + out.len();
        simd::on_level!(level, task_affine(out, &x[part.clone()], &g[part], d, c))
    })
}

/// [`per_channel_affine`] of one work item's rows.
#[inline(always)]
fn task_affine(out: &mut [f32], x: &[f32], g: &[f32], d: Dims, c: &Affine) {
    let row = d.c * d.inner;
    let rows = out
        .chunks_exact_mut(row)
        .zip(x.chunks_exact(row))
        .zip(g.chunks_exact(row));
    for ((out, x), g) in rows {
        if d.inner == 1 {
            let coefs = c.x.iter().zip(&c.g).zip(&c.shift);
            for (((o, &x), &g), ((&cx, &cg), &c0)) in out.iter_mut().zip(x).zip(g).zip(coefs) {
                *o = x * cx + g * cg + c0;
            }
            continue;
        }
        for ch in 0..d.c {
            let run = ch * d.inner..(ch + 1) * d.inner;
            let (cx, cg, c0) = (c.x[ch], c.g[ch], c.shift[ch]);
            for ((o, &x), &g) in out[run.clone()]
                .iter_mut()
                .zip(&x[run.clone()])
                .zip(&g[run])
            {
                *o = x * cx + g * cg + c0;
            }
        }
    }
}
