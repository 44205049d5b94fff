//! Spiking self-attention on packed spikes: q . k^T as popcounts of ANDed words, then integer
//! sums of the value rows.

use std::ops::Range;

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::bits::{for_each_active, SpikeBits};
use crate::kernels::simd::{self, Level};

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
pub(super) fn spike_attention_at(
    level: Level,
    q: &SpikeBits,
    k: &SpikeBits,
    v: &SpikeBits,
) -> Result<Tensor> {
    let (groups, nq, nk) = attention_dims(q, k, Some(v), "spike_attention")?;
    let dv = v.cols();
    let mut out = vec![0u32; groups * nq * dv];
    if nq * dv > 0 {
        out.par_chunks_mut(nq * dv)
            .enumerate()
            .for_each(|(g, out)| {
                simd::on_level!(level, attention_group(q, k, v, g, (nq, nk), out))
            });
    }
    let mut shape = q.shape[..q.shape.len() - 1].to_vec();
    shape.push(dv);
    Tensor::from_vec(out, shape, &Device::Cpu)
}
