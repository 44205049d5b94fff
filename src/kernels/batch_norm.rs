//! Training-mode BatchNorm as one op with a hand-written backward.
//!
//! candle_nn composes train-mode BatchNorm from about ten tensor ops (a transpose to
//! channel-major, subtract, square, mean, divide, scale, shift, a transpose back): each is a
//! full pass over memory, and autograd keeps about six input-sized tensors per layer until
//! backward, the largest share of a training step's memory. This op reads its input three
//! times forward (mean, variance, normalise) and twice backward, and keeps nothing but its
//! input and two numbers per channel. It normalises as PyTorch's CPU kernel does,
//! `y = x * (gamma * invstd) + (beta - mean * gamma * invstd)`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, Var};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use super::simd::{self, Level};
use super::{contiguous_f32, with_backward3, with_f32, Grads3};

/// A tensor `[N, C, ...]` seen as `[outer, c, inner]`: statistics are per channel `c`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    outer: usize,
    c: usize,
    inner: usize,
}

impl Dims {
    fn of(shape: &Shape) -> Result<Self> {
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
    fn count(&self) -> usize {
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
fn channel_sums(
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
struct Affine {
    x: Vec<f32>,
    g: Vec<f32>,
    shift: Vec<f32>,
}

/// [`Affine`] elementwise over `x` and `g` laid out as `d`, in parallel. The coefficients are
/// slices zipped with the data, not looked up per element, so the loops vectorise.
fn per_channel_affine(level: Level, x: &[f32], g: &[f32], d: Dims, c: &Affine) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let task = rows_per_task(d) * d.c * d.inner;
    out.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .zip(g.par_chunks(task))
        .for_each(|((out, x), g)| simd::on_level!(level, task_affine(out, x, g, d, c)));
    out
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

/// Batch statistics of one forward call: per channel, the mean and `1 / sqrt(var + eps)`,
/// the biased variance for the running average, and the values per channel they were taken
/// over (the whole job's batch under synchronised BatchNorm).
#[derive(Debug, Clone)]
struct Stats {
    mean: Vec<f64>,
    var: Vec<f64>,
    invstd: Vec<f64>,
    count: f64,
}

impl Stats {
    fn of(x: &[f32], d: Dims, eps: f64) -> Self {
        let (mut sum, _) = channel_sums(simd::BATCH_NORM.level(), x, x, d, (None, None));
        sum.push(d.count() as f64);
        let sum = over_ranks(sum);
        let n = sum[d.c].max(1.0);
        let mean: Vec<f64> = sum[..d.c].iter().map(|s| s / n).collect();
        let (_, sq) = channel_sums(
            simd::BATCH_NORM.level(),
            x,
            x,
            d,
            (Some(&mean), Some(&mean)),
        );
        let var: Vec<f64> = over_ranks(sq).iter().map(|s| s / n).collect();
        let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        Self {
            mean,
            var,
            invstd,
            count: n,
        }
    }
}

/// Per-channel sums over every rank of a data-parallel job when BatchNorm is synchronised
/// ([`crate::dist::batch_norm_group`]), as PyTorch's `SyncBatchNorm`; as they are otherwise.
fn over_ranks(mut sums: Vec<f64>) -> Vec<f64> {
    if let Some(group) = crate::dist::batch_norm_group() {
        crate::dist::BATCH_NORM_TRAFFIC
            .time(8 * sums.len(), || group.all_reduce_sum_f64(&mut sums));
    }
    sums
}

/// `x * (gamma * invstd) + (beta - mean * gamma * invstd)` per channel.
fn normalised(x: &[f32], d: Dims, stats: &Stats, gamma: &[f32], beta: &[f32]) -> Vec<f32> {
    let scale: Vec<f32> = (0..d.c)
        .map(|ch| (gamma[ch] as f64 * stats.invstd[ch]) as f32)
        .collect();
    let shift: Vec<f32> = (0..d.c)
        .map(|ch| (beta[ch] as f64 - stats.mean[ch] * scale[ch] as f64) as f32)
        .collect();
    let affine = Affine {
        x: scale,
        g: vec![0.0; d.c],
        shift,
    };
    per_channel_affine(simd::BATCH_NORM.level(), x, x, d, &affine)
}

/// Gradients of the input, `gamma` and `beta` of [`normalised`] given the output's, `grad`.
fn gradients(x: &Tensor, grad: &Tensor, stats: &Stats, gamma: &Tensor) -> Result<Grads3> {
    let d = Dims::of(x.shape())?;
    let n = stats.count;
    let gamma = gamma.to_vec1::<f32>()?;
    let (grad_x, sum_g, sum_gx) = with_f32(x, "batch_norm", |x| {
        with_f32(grad, "batch_norm", |g| {
            // sum(dy) and sum(dy * (x - mean)) per channel: this rank's for the affine pair's
            // gradients (summed over ranks with every other gradient), the job's for the
            // input's.
            let (sum_g, sum_gx) =
                channel_sums(simd::BATCH_NORM.level(), g, x, d, (None, Some(&stats.mean)));
            let global = over_ranks([&sum_g[..], &sum_gx[..]].concat());
            let (all_g, all_gx) = global.split_at(d.c);
            // dx = gamma invstd (dy - sum(dy) / n - (x - mean) invstd^2 sum(dy (x - mean)) / n),
            // as `a dy - a k x + a (k mean - mean(dy))` with its coefficients in f64.
            let mut affine = Affine {
                x: Vec::with_capacity(d.c),
                g: Vec::with_capacity(d.c),
                shift: Vec::with_capacity(d.c),
            };
            for ch in 0..d.c {
                let a = gamma[ch] as f64 * stats.invstd[ch];
                let k = stats.invstd[ch] * stats.invstd[ch] * all_gx[ch] / n;
                affine.g.push(a as f32);
                affine.x.push((-a * k) as f32);
                affine
                    .shift
                    .push((a * (k * stats.mean[ch] - all_g[ch] / n)) as f32);
            }
            let gx = per_channel_affine(simd::BATCH_NORM.level(), x, g, d, &affine);
            Ok((gx, sum_g, sum_gx))
        })
    })?;
    let dev = x.device();
    let grad_gamma: Vec<f32> = (0..d.c)
        .map(|ch| (sum_gx[ch] * stats.invstd[ch]) as f32)
        .collect();
    let grad_beta: Vec<f32> = sum_g.iter().map(|&s| s as f32).collect();
    Ok((
        Some(Tensor::from_vec(grad_x, x.shape(), dev)?),
        Some(Tensor::from_vec(grad_gamma, d.c, dev)?),
        Some(Tensor::from_vec(grad_beta, d.c, dev)?),
    ))
}

struct BatchNormTrain {
    eps: f64,
    /// Written by forward, read by backward and by the running-average update.
    stats: Arc<Mutex<Option<Stats>>>,
}

fn stats_of(slot: &Mutex<Option<Stats>>) -> Result<Stats> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("batch_norm: statistics poisoned".into()))?
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("batch_norm: backward before forward".into()))
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::of(xl.shape())?;
        let x = contiguous_f32(xs, xl, "batch_norm")?;
        let (gamma, beta) = (
            contiguous_f32(gs, gl, "batch_norm")?,
            contiguous_f32(bs, bl, "batch_norm")?,
        );
        if gamma.len() != d.c || beta.len() != d.c {
            candle_core::bail!("batch_norm: {} channels, affine of {}", d.c, gamma.len())
        }
        let stats = Stats::of(x, d, self.eps);
        let y = normalised(x, d, &stats, gamma, beta);
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: statistics poisoned".into()))? =
            Some(stats);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        gradients(x, grad, &stats_of(&self.stats)?, gamma)
    }
}

/// Each of `bns` applied by `f` to its own channels of `x [N, C, ...]`, where their channels
/// lie side by side along C; the outputs side by side again.
pub fn per_layer(
    x: &Tensor,
    bns: &[&BatchNorm],
    f: impl Fn(&BatchNorm, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut first = 0;
    let parts = bns
        .iter()
        .map(|bn| {
            let c = bn.running_mean().dim(0)?;
            first += c;
            f(bn, &x.narrow(1, first - c, c)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}

/// BatchNorms `bns` in training mode on `x [N, C, ...]`, their channels side by side along C
/// (layers fed by the same input normalise their stacked outputs in one pass, with no copy of
/// each layer's part): normalised with the batch's statistics, which also update each `bn`'s
/// running mean and (unbiased) variance with its momentum, as `BatchNorm::forward_train` does.
/// Non-CPU tensors go through candle_nn's version.
pub fn batch_norm_train(x: &Tensor, bns: &[&BatchNorm]) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return per_layer(x, bns, BatchNorm::forward_train);
    }
    let (gamma, beta, eps) = stacked_affine(x, bns)?;
    let stats = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
        stats: stats.clone(),
    };
    let y = x.contiguous()?.apply_op3(&gamma, &beta, op)?;
    update_running(bns, &stats_of(&stats)?)?;
    Ok(y)
}

/// The backward of the op a fused BatchNorm feeds (see [`batch_norm_train_then`]): given its
/// input, recomputed, and its output's gradient, the gradients of that input and of the op's
/// own parameter, if it has one.
pub trait ThenBackward:
    Fn(&Tensor, &Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync + 'static
{
}

impl<G> ThenBackward for G where
    G: Fn(&Tensor, &Tensor) -> Result<(Tensor, Option<Tensor>)> + Send + Sync + 'static
{
}

/// [`batch_norm_train`] followed by `then`, as one op that keeps nothing but `x` for backward:
/// the normalised tensor, as large as `x`, is recomputed in backward instead of kept for what
/// follows. For a layer whose output is only normalised on its way into an op that keeps what
/// it needs of its input itself (max-pooling, attention, a LIF-fed layer). `then` gives its
/// value on the normalised tensor and its backward: given that input (recomputed) and the
/// output's gradient, the gradients of the input and of `param`, a tensor of its own if it has
/// one (a layer's weights).
pub fn batch_norm_train_then<F, G>(
    x: &Tensor,
    bns: &[&BatchNorm],
    param: Option<&Tensor>,
    then: F,
) -> Result<Tensor>
where
    F: FnOnce(&Tensor) -> Result<(Tensor, G)>,
    G: ThenBackward,
{
    let d = Dims::of(x.shape())?;
    let (gamma, beta, eps) = stacked_affine(x, bns)?;
    let (g, b) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
    let (stats, y) = with_f32(x, "batch_norm", |x| {
        let stats = Stats::of(x, d, eps);
        let y = normalised(x, d, &stats, &g, &b);
        Ok((stats, y))
    })?;
    update_running(bns, &stats)?;
    let (value, then_grad) = then(&Tensor::from_vec(y, x.shape(), x.device())?)?;
    // Three arguments at most: the affine pair travels as one, and without a parameter the
    // pair stands in for it (and gets no gradient as such).
    let affine = Tensor::cat(&[&gamma, &beta], 0)?;
    let has_param = param.is_some();
    let bwd = move |[x, affine, _]: [&Tensor; 3], grad: &Tensor| -> Result<Grads3> {
        let y = with_f32(x, "batch_norm", |x| Ok(normalised(x, d, &stats, &g, &b)))?;
        let (grad_y, grad_param) = then_grad(&Tensor::from_vec(y, x.shape(), x.device())?, grad)?;
        let gamma = affine.narrow(0, 0, d.c)?;
        let (grad_x, grad_gamma, grad_beta) = gradients(x, &grad_y, &stats, &gamma)?;
        let grad_affine = match (grad_gamma, grad_beta) {
            (Some(g), Some(b)) => Some(Tensor::cat(&[g, b], 0)?),
            _ => None,
        };
        Ok((grad_x, grad_affine, grad_param.filter(|_| has_param)))
    };
    let param = param.unwrap_or(&affine);
    with_backward3("batch-norm-then", [x, &affine, param], value, bwd)
}

/// The affine pairs of `bns` side by side (ones and zeros for a BatchNorm without), and their
/// common eps.
fn stacked_affine(x: &Tensor, bns: &[&BatchNorm]) -> Result<(Tensor, Tensor, f64)> {
    let c = Dims::of(x.shape())?.c;
    let affine = bns
        .iter()
        .map(|bn| {
            let c = bn.running_mean().dim(0)?;
            match bn.weight_and_bias() {
                Some((g, b)) => Ok((g.clone(), b.clone())),
                None => Ok((
                    Tensor::ones(c, x.dtype(), x.device())?,
                    Tensor::zeros(c, x.dtype(), x.device())?,
                )),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let (gamma, beta): (Vec<Tensor>, Vec<Tensor>) = affine.into_iter().unzip();
    let (gamma, beta) = (Tensor::cat(&gamma, 0)?, Tensor::cat(&beta, 0)?);
    if gamma.dim(0)? != c {
        candle_core::bail!("batch_norm: {c} channels, affine of {}", gamma.dim(0)?)
    }
    let eps = bns.first().map_or(1e-5, |bn| bn.eps());
    if bns.iter().any(|bn| bn.eps() != eps) {
        candle_core::bail!("batch_norm: stacked layers with different eps")
    }
    Ok((gamma, beta, eps))
}

/// Moves each of `bns`' running mean and (unbiased) variance towards its channels' share of
/// the batch statistics `stats`, with its momentum.
fn update_running(bns: &[&BatchNorm], stats: &Stats) -> Result<()> {
    let n = stats.count;
    let unbiased = n / (n - 1.0).max(1.0);
    let mut first = 0;
    for bn in bns {
        let m = bn.momentum();
        let running = bn.running_mean();
        let c = running.dim(0)?;
        let update = |running: &Tensor, batch: &[f64], scale: f64| -> Result<()> {
            let old = running.to_vec1::<f32>()?;
            let new: Vec<f32> = old
                .iter()
                .zip(batch)
                .map(|(&r, b)| (r as f64 * (1.0 - m) + b * scale * m) as f32)
                .collect();
            Var::from_tensor(running)?.set(&Tensor::from_vec(new, c, running.device())?)
        };
        update(running, &stats.mean[first..first + c], 1.0)?;
        update(bn.running_var(), &stats.var[first..first + c], unbiased)?;
        first += c;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::*;
    use candle_core::{DType, Device};
    use candle_nn::{BatchNormConfig, VarBuilder, VarMap};

    /// The scale and shift of each BatchNorm, in order.
    fn affine_params(bns: &[&BatchNorm]) -> Vec<Tensor> {
        bns.iter()
            .flat_map(|bn| {
                let (g, b) = bn.weight_and_bias().unwrap();
                [g.clone(), b.clone()]
            })
            .collect()
    }

    /// A BatchNorm over `c` channels with a random affine pair (the same for every seed).
    fn batch_norm(c: usize, affine: &[Tensor; 2]) -> (VarMap, BatchNorm) {
        let vm = VarMap::new();
        let cfg = BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        };
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let bn = candle_nn::batch_norm(c, cfg, vb).unwrap();
        let (g, b) = bn.weight_and_bias().unwrap();
        Var::from_tensor(g).unwrap().set(&affine[0]).unwrap();
        Var::from_tensor(b).unwrap().set(&affine[1]).unwrap();
        (vm, bn)
    }

    /// Output, gradients of input and affine pairs, and running statistics against candle_nn's
    /// composed `forward_train`, on inputs off-centre so that a naive variance would cancel;
    /// `layers` splits the channels among stacked BatchNorms.
    fn check(shape: &[usize], layers: &[usize]) {
        let dev = Device::Cpu;
        let make = || {
            layers
                .iter()
                .map(|&c| {
                    let affine = [
                        Tensor::randn(1f32, 0.5, c, &dev).unwrap(),
                        Tensor::randn(0f32, 0.5, c, &dev).unwrap(),
                    ];
                    (batch_norm(c, &affine), batch_norm(c, &affine))
                })
                .unzip::<_, _, Vec<_>, Vec<_>>()
        };
        let (ours_bns, ref_bns) = make();
        fn refs(bns: &[(VarMap, BatchNorm)]) -> Vec<&BatchNorm> {
            bns.iter().map(|(_, bn)| bn).collect()
        }
        let (ours_bns, ref_bns) = (refs(&ours_bns), refs(&ref_bns));
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 3.0).unwrap())
            .unwrap();
        let ours = batch_norm_train(x.as_tensor(), &ours_bns).unwrap();
        let theirs = per_layer(x.as_tensor(), &ref_bns, BatchNorm::forward_train).unwrap();
        assert!(max_rel_diff(&ours, &theirs) < 1e-5, "forward differs");
        let mut pairs = vec![(x.as_tensor().clone(), x.as_tensor().clone())];
        pairs.extend(
            affine_params(&ours_bns)
                .into_iter()
                .zip(affine_params(&ref_bns)),
        );
        assert_paired_gradients(ours, theirs, &pairs, 1e-4);
        for (ours, theirs) in ours_bns.iter().zip(&ref_bns) {
            assert!(max_rel_diff(ours.running_mean(), theirs.running_mean()) < 1e-5);
            assert!(max_rel_diff(ours.running_var(), theirs.running_var()) < 1e-5);
        }
    }

    /// Channels-first images, runs of a channel not a multiple of the lane width.
    #[test]
    fn matches_candle_on_images() {
        check(&[6, 5, 7, 9], &[5]);
    }

    /// Rows of channels (a 1x1 convolution over tokens), as `LinearBn` normalises them.
    #[test]
    fn matches_candle_on_rows() {
        check(&[300, 13], &[13]);
    }

    /// Three layers' outputs side by side, as spiking self-attention's q, k and v.
    #[test]
    fn stacked_layers_match_each_layer_alone() {
        check(&[300, 12], &[3, 4, 5]);
    }

    /// [`batch_norm_train_then`] against `then` composed after [`batch_norm_train`] (values,
    /// gradients of the input, the affine pair and `param`, running statistics), on `[8, 6, ...]`.
    fn check_then<F, G>(
        shape: &[usize],
        param: Option<&Var>,
        then: F,
        composed: impl Fn(&Tensor) -> Tensor,
    ) where
        F: FnOnce(&Tensor) -> Result<(Tensor, G)>,
        G: ThenBackward,
    {
        let dev = Device::Cpu;
        let c = shape[1];
        let affine = [
            Tensor::randn(1f32, 0.5, c, &dev).unwrap(),
            Tensor::randn(0f32, 0.5, c, &dev).unwrap(),
        ];
        let ((_m1, ours_bn), (_m2, ref_bn)) = (batch_norm(c, &affine), batch_norm(c, &affine));
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 3.0).unwrap())
            .unwrap();
        let ours =
            batch_norm_train_then(x.as_tensor(), &[&ours_bn], param.map(Var::as_tensor), then)
                .unwrap();
        let theirs = composed(&batch_norm_train(x.as_tensor(), &[&ref_bn]).unwrap());
        assert!(max_rel_diff(&ours, &theirs) < 1e-5, "forward differs");
        let mut pairs = vec![(x.as_tensor().clone(), x.as_tensor().clone())];
        pairs.extend(
            affine_params(&[&ours_bn])
                .into_iter()
                .zip(affine_params(&[&ref_bn])),
        );
        pairs.extend(param.map(|p| (p.as_tensor().clone(), p.as_tensor().clone())));
        assert_paired_gradients(ours, theirs, &pairs, 1e-4);
        assert!(max_rel_diff(ours_bn.running_mean(), ref_bn.running_mean()) < 1e-5);
        assert!(max_rel_diff(ours_bn.running_var(), ref_bn.running_var()) < 1e-5);
    }

    /// Followed by max-pooling, as the tokenizer's pooled convolutions.
    #[test]
    fn then_max_pool_matches_composed() {
        use crate::kernels::maxpool::{max_pool2d, max_pool2d_grad};
        let then = |y: &Tensor| {
            let grad = |y: &Tensor, g: &Tensor| Ok((max_pool2d_grad(y, g, 3, 2, 1)?, None));
            Ok((max_pool2d(y, 3, 2, 1)?, grad))
        };
        check_then(&[8, 6, 7, 9], None, then, |y| {
            max_pool2d(y, 3, 2, 1).unwrap()
        });
    }

    /// Followed by a LIF-fed linear layer whose packed weights get their gradient through
    /// `param`, as the spiking MLP's hidden layer.
    #[test]
    fn then_lif_linear_matches_composed() {
        use crate::kernels::lif_linear::{lif_linear, lif_linear_packed};
        use crate::neuron::{LifConfig, MultiStepLif};
        let packed = Var::randn(0f32, 1.0, (5, 7), &Device::Cpu).unwrap();
        let lif = MultiStepLif::new(LifConfig::default());
        // Rows of 6 channels, seen by the LIF as [T = 4, 2, 6].
        let then = |y: &Tensor| {
            let (value, grad) =
                lif_linear_packed(&lif, &y.reshape((4, 2, 6))?, packed.as_tensor())?;
            let grad = move |y: &Tensor, g: &Tensor| {
                let (grad_y, grad_packed) = grad(&y.reshape((4, 2, 6))?, g)?;
                Ok((grad_y.reshape(y.shape())?, grad_packed))
            };
            Ok((value, grad))
        };
        let composed = |y: &Tensor| {
            let p = packed.as_tensor();
            let (w, b) = (
                p.narrow(1, 0, 6).unwrap(),
                p.narrow(1, 6, 1).unwrap().squeeze(1).unwrap(),
            );
            lif_linear(&lif, &y.reshape((4, 2, 6)).unwrap(), &w, Some(&b)).unwrap()
        };
        check_then(&[8, 6], Some(&packed), then, composed);
    }

    /// Followed by a residual sum whose other term gets its gradient through `param`, as the
    /// blocks' projections.
    #[test]
    fn then_residual_sum_matches_composed() {
        let residual = Var::randn(0f32, 1.0, (8, 6), &Device::Cpu).unwrap();
        let kept = residual.as_tensor().detach();
        let then = |y: &Tensor| {
            let grad = |_: &Tensor, g: &Tensor| Ok((g.clone(), Some(g.clone())));
            Ok(((y + &kept)?, grad))
        };
        check_then(&[8, 6], Some(&residual), then, |y| {
            (y + residual.as_tensor()).unwrap()
        });
    }

    #[test]
    fn rejects_a_vector() {
        let (_vm, bn) = batch_norm(
            3,
            &[
                Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            ],
        );
        let x = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(batch_norm_train(&x, &[&bn]).is_err());
    }

    /// The channel sums and the per-channel map, bit for bit the same on every instruction set
    /// this CPU has (the AVX-512 path is skipped, with a note, where it lacks it).
    #[test]
    fn every_simd_level_gives_the_same_sums_and_maps() {
        if !Level::Avx512.supported() {
            println!("skipped the avx512 path: this CPU lacks AVX-512");
        }
        let values = |n: usize, k: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 * k).fract() - 0.4) * 3.0)
                .collect()
        };
        // Images (runs of 37 per channel) and rows (one value per channel).
        for (outer, c, inner) in [(5, 6, 37), (300, 70, 1)] {
            let d = Dims { outer, c, inner };
            let (x, g) = (
                values(outer * c * inner, 0.618),
                values(outer * c * inner, 0.377),
            );
            let centre: Vec<f64> = (0..c).map(|ch| ch as f64 * 0.1).collect();
            let affine = Affine {
                x: values(c, 0.21),
                g: values(c, 0.73),
                shift: values(c, 0.51),
            };
            let run = |level| {
                let sums = channel_sums(level, &g, &x, d, (None, Some(&centre)));
                (sums, per_channel_affine(level, &x, &g, d, &affine))
            };
            let portable = run(Level::Portable);
            for level in Level::supported_levels() {
                assert_eq!(run(level), portable, "{level}, inner {inner}");
            }
        }
    }
}
