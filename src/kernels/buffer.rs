//! Large output buffers made on every thread.
//!
//! `vec![0f32; n]` zeroes the whole buffer on the thread that asks for it, and
//! `Tensor::to_vec1` copies on that thread too, while the kernel that then fills the buffer
//! runs on all of them: in a training step of the paper's model (`img_train_b64`, `perf`)
//! zeroing and copying were a third of the main thread's samples (19 % and 17 %), with the
//! other cores waiting. Here each parallel task zeroes or copies its own part.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Values per task where the caller has no layout of its own to split along.
const CHUNK: usize = 1 << 16;

/// `len` zeros, zeroed on every thread.
pub fn zeroed(len: usize) -> Vec<f32> {
    zeroed_by_chunks(len, CHUNK, |_, _| {})
}

/// `len` values, made in parallel tasks of `chunk` values each (the last may be shorter): a
/// task zeroes its part, then `fill(task index, part)` writes it while it is in cache.
pub fn zeroed_by_chunks(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, part)| fill(i, zero(part)));
    // SAFETY: every chunk of the first `len` values was zeroed.
    unsafe { out.set_len(len) };
    out
}

/// A copy of `src`, made on every thread.
pub fn copied(src: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(src.len());
    out.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(to, from)| {
            to.write_copy_of_slice(from);
        });
    // SAFETY: every chunk of the first `src.len()` values was written.
    unsafe { out.set_len(src.len()) };
    out
}

/// `part` zeroed, as initialised values.
fn zero(part: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    part.fill(MaybeUninit::new(0.0));
    // SAFETY: every value of `part` was just written, and `MaybeUninit<f32>` has the layout of
    // `f32`.
    unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer of `len` nonzero values freed just before: the allocator hands its memory out
    /// again, so a zeroing that did not happen shows (fresh pages would read zero anyway).
    fn dirty_memory(len: usize) {
        drop(std::hint::black_box(vec![7f32; len]));
    }

    #[test]
    fn chunks_are_zeroed_then_filled_in_place() {
        // 2.5 chunks: the last task gets the shorter rest.
        dirty_memory(10);
        let out = zeroed_by_chunks(10, 4, |i, part| {
            assert!(part.iter().all(|&v| v == 0.0));
            part[0] = i as f32 + 1.0;
        });
        assert_eq!(out, [1., 0., 0., 0., 2., 0., 0., 0., 3., 0.]);
        dirty_memory(CHUNK + 3);
        assert_eq!(zeroed(CHUNK + 3), vec![0f32; CHUNK + 3]);
        assert!(zeroed(0).is_empty());
    }

    #[test]
    fn copies_every_value() {
        let src: Vec<f32> = (0..2 * CHUNK + 5).map(|i| i as f32 * 0.5).collect();
        assert_eq!(copied(&src), src);
        assert!(copied(&[]).is_empty());
    }
}
