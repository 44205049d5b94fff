//! The spike-driven accumulators pinned in vector registers: left to itself, the compiler
//! keeps them on the stack and stores them all after every row, which halves the kernel's
//! speed. Lane by lane the sums run in the same order as [`add_rows`]', so results are
//! bit-identical.

use super::bits::{pack_row_by_quads, WORD_BITS};
use super::gather::{Lanes, BLOCK};
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
