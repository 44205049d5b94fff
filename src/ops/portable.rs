//! The student's ops composed from candle's standard tensor ops, so they run on any device
//! candle supports and take their gradients from candle's autograd. Each has the semantics of
//! its fused CPU twin in [`crate::kernels`] and [`crate::neuron`]: the same spikes, the same
//! gradients up to float summation order (`tests/portable_ops.rs`). They keep what autograd
//! keeps, several times the fused ops' memory: the price of running anywhere.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::BatchNorm;

use crate::kernels::attention::Attention;
use crate::kernels::grad_slot::SlotParam;
use crate::neuron::{LifConfig, MultiStepLif, Surrogate};

/// `x` plus a term whose value is zero and whose gradient is `slope`: the Heaviside step's
/// spikes with the surrogate derivative in backward, the detach construction
/// `heaviside(x) + (x * slope - (x * slope).detach())` with `slope` itself detached.
fn fire(x: &Tensor, slope: &Tensor) -> Result<Tensor> {
    let spikes = x.ge(0f64)?.to_dtype(x.dtype())?;
    let shaped = (x * slope.detach())?;
    spikes + (&shaped - shaped.detach())?
}

/// The surrogate derivative at `x = H - V_th`, detached, as [`Surrogate::grad`] gives it.
fn surrogate_slope(surrogate: Surrogate, x: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    match surrogate {
        Surrogate::Sigmoid { alpha } => {
            let sg = (x * -(alpha as f64))?.exp()?.affine(1.0, 1.0)?.recip()?;
            (sg.affine(-1.0, 1.0)? * &sg)? * alpha as f64
        }
        Surrogate::ATan { alpha } => {
            let z = (x * (std::f64::consts::FRAC_PI_2 * alpha as f64))?;
            z.sqr()?.affine(1.0, 1.0)?.recip()? * (alpha as f64 / 2.0)
        }
    }
}

/// A scalar on `like`'s device and dtype, for true divisions (candle's `x / f64` multiplies
/// by the reciprocal, which rounds differently from the fused kernels' division).
fn scalar(value: f32, like: &Tensor) -> Result<Tensor> {
    Tensor::new(value, like.device())?.to_dtype(like.dtype())
}

/// One step's charge: the membrane `v` integrates the input `x` into `H`, in the operation
/// order of the fused kernel (SpikingJelly's), so that spikes match bit for bit.
fn charge(cfg: &LifConfig, v: &Tensor, x: &Tensor) -> Result<Tensor> {
    let tau = scalar(cfg.tau, x)?;
    match (cfg.decay_input, cfg.v_reset.filter(|&r| r != 0.0)) {
        (true, None) => v + (x - v)?.broadcast_div(&tau)?,
        (true, Some(r)) => v + (x - v.affine(1.0, -(r as f64))?)?.broadcast_div(&tau)?,
        (false, None) => {
            let keep = (1.0 - 1.0 / cfg.tau as f64) as f32;
            v.broadcast_mul(&scalar(keep, x)?)? + x
        }
        (false, Some(r)) => (v - v.affine(1.0, -(r as f64))?.broadcast_div(&tau)?)? + x,
    }
}

/// The membrane after firing `spikes` from `h`: hard reset to `v_reset` or soft (minus the
/// threshold), the spikes detached inside the reset when `detach_reset`.
fn reset(cfg: &LifConfig, h: &Tensor, spikes: &Tensor) -> Result<Tensor> {
    let s = if cfg.detach_reset {
        spikes.detach()
    } else {
        spikes.clone()
    };
    match cfg.v_reset {
        Some(r) => (h * s.affine(-1.0, 1.0)?)? + (s * r as f64)?,
        None => h - (s * cfg.v_threshold as f64)?,
    }
}

/// The spikes `[T, ...]` of `lif` on `inputs`, one tensor per step, from a membrane at rest.
fn run(lif: &MultiStepLif, inputs: impl Iterator<Item = Result<Tensor>>) -> Result<Tensor> {
    let cfg = lif.config();
    let mut v: Option<Tensor> = None;
    let mut spikes = Vec::new();
    for x in inputs {
        let x = x?;
        let rest = match &v {
            Some(v) => v.clone(),
            None => x
                .zeros_like()?
                .affine(1.0, cfg.v_reset.unwrap_or(0.0) as f64)?,
        };
        let h = charge(cfg, &rest, &x)?;
        let over = h.affine(1.0, -(cfg.v_threshold as f64))?;
        let s = fire(&over, &surrogate_slope(cfg.surrogate, &over)?)?;
        v = Some(reset(cfg, &h, &s)?);
        spikes.push(s);
    }
    let spikes = Tensor::stack(&spikes, 0)?;
    record(lif, &spikes)?;
    Ok(spikes)
}

/// Counts `spikes [T, ...]` in `lif`'s monitor, if it listens, as the fused op does.
fn record(lif: &MultiStepLif, spikes: &Tensor) -> Result<()> {
    if !lif.monitor().is_enabled() {
        return Ok(());
    }
    let steps = spikes.dim(0)?;
    let per_step: Vec<f32> = spikes
        .detach()
        .reshape((steps, ()))?
        .sum(1)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let per_step: Vec<u64> = per_step.iter().map(|&c| c as u64).collect();
    lif.monitor()
        .record(&per_step, (spikes.elem_count() / steps.max(1)) as u64);
    Ok(())
}

/// [`MultiStepLif::forward`]: spikes of `x [T, ...]`.
pub fn lif(lif: &MultiStepLif, x: &Tensor) -> Result<Tensor> {
    let steps = x.dim(0)?;
    run(lif, (0..steps).map(|t| x.get(t)))
}

/// [`MultiStepLif::forward_held`]: spikes `[steps, ...]` of `x [...]` held over the steps.
pub fn lif_held(lif: &MultiStepLif, x: &Tensor, steps: usize) -> Result<Tensor> {
    run(lif, (0..steps).map(|_| Ok(x.clone())))
}

/// `x . weight^T + bias` over the last axis of `x [..., K]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let rows = x.flatten_to(dims.len().saturating_sub(2))?;
    let mut y = rows.matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let mut out = dims;
    *out.last_mut().expect("rank checked by flatten") = weight.dim(0)?;
    y.reshape(out)
}

/// [`crate::kernels::lif_linear::lif_linear`]: `lif(x) . weight^T + bias`.
pub fn lif_linear(
    neurons: &MultiStepLif,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    linear(&lif(neurons, x)?, weight, bias)
}

/// [`crate::kernels::conv::conv2d`] at stride 1: candle's convolution.
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize) -> Result<Tensor> {
    x.conv2d(weight, padding, 1, 1, 1)
}

/// [`crate::kernels::lif_linear::lif_conv2d`]: `conv2d(lif(x)) + bias` of `x [T, B, C, H, W]`,
/// all steps at once, `[T * B, O, H', W']`.
pub fn lif_conv2d(
    neurons: &MultiStepLif,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    let spikes = lif(neurons, x)?.flatten_to(1)?;
    let y = conv2d(&spikes, weight, padding)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// [`crate::kernels::batch_norm::batch_norm_train`]: BatchNorms `bns` in training mode on
/// `x [N, C, ...]`, their channels side by side along C, each `bn`'s running mean and unbiased
/// variance moved towards the batch's with its momentum. The statistics are per-channel sums in
/// f64 and the output `x * scale + shift` in f32, as the fused kernel computes them: f32 sums of
/// a large batch are off by about 1e-5, enough to move spikes across their threshold. The sums
/// are where a synchronised BatchNorm would add other ranks' sums.
pub fn batch_norm_train(x: &Tensor, bns: &[&BatchNorm]) -> Result<Tensor> {
    let c = x.dim(1)?;
    let channels_first = x.transpose(0, 1)?.contiguous()?; // [C, N, ...]
    let rows = channels_first.reshape((c, ()))?;
    let n = rows.dim(1)? as f64;
    let mean = (rows.to_dtype(DType::F64)?.sum_keepdim(1)? / n)?;
    let centred = rows
        .broadcast_sub(&mean.to_dtype(rows.dtype())?)?
        .to_dtype(DType::F64)?;
    let var = (centred.sqr()?.sum_keepdim(1)? / n)?;
    update_running(bns, &mean, &var, n)?;
    let eps = bns.first().map_or(1e-5, |bn| bn.eps());
    let (gamma, beta) = stacked_affine(bns, x)?;
    let invstd = (var + eps)?.sqrt()?.recip()?;
    let scale = gamma
        .to_dtype(DType::F64)?
        .mul(&invstd)?
        .to_dtype(x.dtype())?;
    let shift = (beta.to_dtype(DType::F64)? - mean.mul(&scale.to_dtype(DType::F64)?)?)?
        .to_dtype(x.dtype())?;
    let y = rows.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    y.reshape(channels_first.shape())?
        .transpose(0, 1)?
        .contiguous()
}

/// The affine pairs of `bns` side by side as `[C, 1]` columns (ones and zeros for a BatchNorm
/// without).
fn stacked_affine(bns: &[&BatchNorm], x: &Tensor) -> Result<(Tensor, Tensor)> {
    let mut gammas = Vec::with_capacity(bns.len());
    let mut betas = Vec::with_capacity(bns.len());
    for bn in bns {
        let c = bn.running_mean().dim(0)?;
        match bn.weight_and_bias() {
            Some((g, b)) => {
                gammas.push(g.clone());
                betas.push(b.clone());
            }
            None => {
                gammas.push(Tensor::ones(c, x.dtype(), x.device())?);
                betas.push(Tensor::zeros(c, x.dtype(), x.device())?);
            }
        }
    }
    let column = |parts: Vec<Tensor>| Tensor::cat(&parts, 0)?.unsqueeze(1);
    Ok((column(gammas)?, column(betas)?))
}

/// Moves each of `bns`' running statistics towards its channels of the batch's `mean` and
/// biased `var` (`[C, 1]`, f64) over `n` values per channel, in f64.
fn update_running(bns: &[&BatchNorm], mean: &Tensor, var: &Tensor, n: f64) -> Result<()> {
    let unbiased = n / (n - 1.0).max(1.0);
    let mut first = 0;
    for bn in bns {
        let m = bn.momentum();
        let c = bn.running_mean().dim(0)?;
        let update = |running: &Tensor, batch: &Tensor, scale: f64| -> Result<()> {
            let batch = batch.narrow(0, first, c)?.detach().squeeze(1)?;
            let old = running.to_dtype(DType::F64)?;
            let new = ((old * (1.0 - m))? + (batch * (scale * m))?)?;
            candle_core::Var::from_tensor(running)?.set(&new.to_dtype(running.dtype())?)
        };
        update(bn.running_mean(), mean, 1.0)?;
        update(bn.running_var(), var, unbiased)?;
        first += c;
    }
    Ok(())
}

/// `x [N, C, H, W]` with `padding` rows and columns of `value` around it, and `extra` more at
/// the bottom and right.
fn pad(x: &Tensor, padding: usize, extra: usize, value: f32) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let fill = |dims: (usize, usize, usize, usize)| {
        Tensor::full(value, dims, x.device())?.to_dtype(x.dtype())
    };
    let (top, bottom) = (fill((n, c, padding, w))?, fill((n, c, padding + extra, w))?);
    let tall = Tensor::cat(&[&top, x, &bottom], 2)?;
    let h = h + 2 * padding + extra;
    let (left, right) = (fill((n, c, h, padding))?, fill((n, c, h, padding + extra))?);
    Tensor::cat(&[&left, &tall, &right], 3)
}

/// Every `stride`-th of `len` entries of axis `axis` of `x`, from `start`.
fn strided(x: &Tensor, axis: usize, start: usize, len: usize, stride: usize) -> Result<Tensor> {
    let part = x.narrow(axis, start, len * stride)?;
    let mut dims = part.dims().to_vec();
    dims[axis] = len;
    dims.insert(axis + 1, stride);
    part.reshape(dims)?
        .narrow(axis + 1, 0, 1)?
        .squeeze(axis + 1)
}

/// [`crate::kernels::maxpool::max_pool2d`]: `torch.nn.MaxPool2d(kernel, stride, padding)` of
/// `x [N, C, H, W]`, each output's gradient to the first maximum of its window, row by row.
/// candle's own max-pooling has no padding and splits the gradient among tied maxima.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if kernel == 0 || stride == 0 || 2 * padding > kernel || h + 2 * padding < kernel {
        candle_core::bail!(
            "max_pool2d: invalid kernel {kernel}, stride {stride}, padding {padding} for {h}x{w}"
        )
    }
    let out = |n: usize| (n + 2 * padding - kernel) / stride + 1;
    let (oh, ow) = (out(h), out(w));
    // Padding never wins a window, which always holds a pixel of the image.
    let padded = pad(x, padding, stride, f32::MIN)?;
    let mut taps = Vec::with_capacity(kernel * kernel);
    for dy in 0..kernel {
        let rows = strided(&padded, 2, dy, oh, stride)?;
        for dx in 0..kernel {
            taps.push(strided(&rows, 3, dx, ow, stride)?.contiguous()?);
        }
    }
    let max = taps[1..]
        .iter()
        .try_fold(taps[0].detach(), |m, t| m.maximum(&t.detach()))?;
    // Each output selects its first maximal tap; the others are multiplied by zero.
    let mut taken = max.zeros_like()?;
    let mut pooled = max.zeros_like()?;
    for tap in &taps {
        let first = tap
            .detach()
            .eq(&max)?
            .to_dtype(x.dtype())?
            .mul(&taken.affine(-1.0, 1.0)?)?;
        taken = (taken + &first)?;
        pooled = (pooled + tap.mul(&first)?)?;
    }
    Ok(pooled)
}

/// [`Attention::forward`]: `(LIF(q) . LIF(k)^T) . LIF(v) * scale` per head of
/// `qkv [T, B, N, 3C]`, padding keys masked out.
pub fn attention(core: &Attention, qkv: &Tensor) -> Result<Tensor> {
    let (t, b, n, c3) = qkv.dims4()?;
    let c = c3 / 3;
    if c3 % 3 != 0 || c % core.heads != 0 {
        candle_core::bail!(
            "attention: {c3} channels are not q, k, v of {} heads",
            core.heads
        )
    }
    let spikes = |i: usize| -> Result<Tensor> {
        let s = lif(&core.lifs[i], &qkv.narrow(3, i * c, c)?)?;
        match (i, &core.key_mask) {
            (1, Some(m)) => core.split(&s.broadcast_mul(&m.detach().reshape((1, b, n, 1))?)?),
            _ => core.split(&s),
        }
    };
    let (q, k, v) = (spikes(0)?, spikes(1)?, spikes(2)?);
    let product = q.matmul(&k.t()?.contiguous()?)?.matmul(&v)?;
    core.merge(&(product * core.scale)?, (t, b, n, c))
}

/// [`crate::kernels::embedding::token_embedding`]: `token[ids] + position[..L]` for ids
/// `[B, L]`, `[B, L, W]`, the gradients in candle's store rather than the slots.
pub fn token_embedding(ids: &Tensor, token: &SlotParam, position: &SlotParam) -> Result<Tensor> {
    let (b, l) = ids.dims2()?;
    let (vocab, width) = token.value().dims2()?;
    if position.value().dim(0)? < l {
        candle_core::bail!(
            "token embedding: {l} tokens but {} positions",
            position.value().dim(0)?
        )
    }
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
    if flat.elem_count() > 0 {
        let top = flat.max(D::Minus1)?.to_scalar::<u32>()?;
        if top as usize >= vocab {
            candle_core::bail!("token embedding: token id {top} outside the vocabulary of {vocab}")
        }
    }
    token
        .value()
        .index_select(&flat, 0)?
        .reshape((b, l, width))?
        .broadcast_add(&position.value().narrow(0, 0, l)?)
}

/// [`crate::kernels::text_mlp::text_mlp`]: the flattened embedding of `ids` held over `steps`
/// steps through two LIF-fed linear layers (weight, bias), `[T, B, O]`.
pub fn text_mlp(
    ids: &Tensor,
    (token, position): (&SlotParam, &SlotParam),
    [(lif1, fc1), (lif2, fc2)]: [(&MultiStepLif, (&Tensor, &Tensor)); 2],
    steps: usize,
) -> Result<Tensor> {
    let x = token_embedding(ids, token, position)?.flatten_from(1)?;
    let hidden = linear(&lif_held(lif1, &x, steps)?, fc1.0, Some(fc1.1))?;
    lif_linear(lif2, &hidden, fc2.0, Some(fc2.1))
}
