//! A wide result computed a block of columns at a time, so that the temporaries of its
//! computation are the size of a block, not of the result.

use std::ops::Range;

use candle_core::{Device, Result, Tensor};

use super::with_f32;

/// The `[rows, cols]` tensor whose columns `range`, in consecutive blocks of at most `width`,
/// are `block(range)` (`rows * range.len()` values in row-major order, any shape). Each block
/// is copied into place and dropped before the next is computed; a single block is the result
/// as it is, without a copy.
pub(crate) fn by_column_blocks(
    (rows, cols): (usize, usize),
    width: usize,
    mut block: impl FnMut(Range<usize>) -> Result<Tensor>,
) -> Result<Tensor> {
    let width = width.max(1);
    if cols <= width {
        return block(0..cols)?.reshape((rows, cols));
    }
    let mut out = vec![0f32; rows * cols];
    for start in (0..cols).step_by(width) {
        let range = start..(start + width).min(cols);
        let values = block(range.clone())?;
        if values.elem_count() != rows * range.len() {
            candle_core::bail!(
                "column block {range:?} of a [{rows}, {cols}] result has shape {:?}",
                values.shape()
            )
        }
        with_f32(&values, "column blocks", |values| {
            for (row, part) in out
                .chunks_exact_mut(cols)
                .zip(values.chunks_exact(range.len()))
            {
                row[range.clone()].copy_from_slice(part);
            }
            Ok(())
        })?;
    }
    Tensor::from_vec(out, (rows, cols), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_assemble_the_whole_and_a_single_block_is_kept() -> Result<()> {
        let dev = Device::Cpu;
        let whole = Tensor::arange(0f32, 35., &dev)?.reshape((5, 7))?;
        let mut seen = Vec::new();
        let assembled = by_column_blocks((5, 7), 3, |r| {
            seen.push(r.clone());
            whole.narrow(1, r.start, r.len())?.contiguous()
        })?;
        assert_eq!(seen, [0..3, 3..6, 6..7]);
        assert_eq!(assembled.to_vec2::<f32>()?, whole.to_vec2::<f32>()?);
        let single = by_column_blocks((5, 7), 7, |_| Ok(whole.clone()))?;
        assert_eq!(single.to_vec2::<f32>()?, whole.to_vec2::<f32>()?);
        assert!(by_column_blocks((5, 7), 3, |_| Ok(whole.clone())).is_err());
        Ok(())
    }
}
