//! Gradients summed over the ranks of a data-parallel job: flattened into buckets in a fixed
//! order (the same on every rank), each bucket one all-reduce, so that a step costs a few
//! large messages instead of one per parameter.

use crate::kernels::grad_slot::RowGrad;

use super::Collective;

/// Floats per all-reduce: 4 MiB messages, large enough to run at the network's bandwidth and
/// small enough that the staging copy stays in cache-sized pieces.
pub const BUCKET_FLOATS: usize = 1 << 20;

/// Replaces every slice of `parts` by its sum over the ranks, packing consecutive parts into
/// buckets of at most [`BUCKET_FLOATS`] (a larger part is reduced in place on its own).
/// Returns the bytes reduced.
pub fn all_reduce_in_buckets(parts: &mut [&mut [f32]], c: &dyn Collective) -> usize {
    let mut bucket: Vec<f32> = Vec::with_capacity(BUCKET_FLOATS);
    let mut pending: Vec<usize> = Vec::new();
    let flush = |bucket: &mut Vec<f32>, pending: &mut Vec<usize>, parts: &mut [&mut [f32]]| {
        if bucket.is_empty() {
            return;
        }
        c.all_reduce_sum_f32(bucket);
        let mut at = 0;
        for &i in pending.iter() {
            let n = parts[i].len();
            parts[i].copy_from_slice(&bucket[at..at + n]);
            at += n;
        }
        bucket.clear();
        pending.clear();
    };
    let mut bytes = 0;
    for i in 0..parts.len() {
        let n = parts[i].len();
        bytes += 4 * n;
        if n > BUCKET_FLOATS {
            c.all_reduce_sum_f32(parts[i]);
            continue;
        }
        if bucket.len() + n > BUCKET_FLOATS {
            flush(&mut bucket, &mut pending, parts);
        }
        bucket.extend_from_slice(parts[i]);
        pending.push(i);
    }
    flush(&mut bucket, &mut pending, parts);
    bytes
}

/// Makes a table's row gradient hold the rows that any rank's lookup touched (zero where this
/// rank's did not), so that its values line up across ranks and sum as the dense gradients
/// would: every other row's gradient is zero on every rank. `table_rows` is the table's height.
pub fn union_rows(
    rows: &mut RowGrad,
    table_rows: usize,
    c: &dyn Collective,
) -> candle_core::Result<()> {
    let mut touched = vec![0f32; table_rows];
    for &r in rows.rows() {
        touched[r as usize] = 1.0;
    }
    c.all_reduce_sum_f32(&mut touched);
    let union: Vec<u32> = (0..table_rows as u32)
        .filter(|&r| touched[r as usize] > 0.0)
        .collect();
    rows.include(&union, rows.width())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::threads::ThreadGroup;

    #[test]
    fn buckets_sum_every_part_in_place_whatever_its_size() {
        let sizes = [3, BUCKET_FLOATS - 2, 5, BUCKET_FLOATS + 1, 1];
        let sums = ThreadGroup::run(2, |c| {
            let mut parts: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(p, &n)| (0..n).map(|i| (p * 7 + i % 13 + c.rank()) as f32).collect())
                .collect();
            let mut views: Vec<&mut [f32]> = parts.iter_mut().map(Vec::as_mut_slice).collect();
            let bytes = all_reduce_in_buckets(&mut views, c);
            assert_eq!(bytes, 4 * sizes.iter().sum::<usize>());
            parts
        });
        for (p, &n) in sizes.iter().enumerate() {
            let want: Vec<f32> = (0..n).map(|i| (2 * (p * 7 + i % 13) + 1) as f32).collect();
            assert_eq!(sums[0][p], want, "part {p}");
            assert_eq!(sums[1][p], want, "part {p}");
        }
    }

    #[test]
    fn row_gradients_sum_over_the_union_of_touched_rows() {
        let summed = ThreadGroup::run(2, |c| {
            let mut rows = RowGrad::default();
            let ids: &[u32] = [&[1, 4][..], &[4, 6]][c.rank()];
            let grad: Vec<f32> = ids
                .iter()
                .flat_map(|&i| [i as f32, c.rank() as f32])
                .collect();
            rows.add(ids, &grad, 2).unwrap();
            union_rows(&mut rows, 8, c).unwrap();
            c.all_reduce_sum_f32(rows.values_mut());
            rows
        });
        for rows in &summed {
            assert_eq!(rows.rows(), &[1, 4, 6]);
            assert_eq!(rows.row(1), Some(&[1.0, 0.0][..]));
            assert_eq!(rows.row(4), Some(&[8.0, 1.0][..]));
            assert_eq!(rows.row(6), Some(&[6.0, 1.0][..]));
        }
    }
}
