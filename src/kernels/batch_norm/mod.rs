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

use super::simd;
use super::{contiguous_f32, with_backward3, with_f32, Grads3};
use channel_loops::{channel_sums, per_channel_affine, Affine, Dims};

mod channel_loops;
#[cfg(test)]
mod tests;

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
    let y = super::layout::contiguous(x)?.apply_op3(&gamma, &beta, op)?;
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
