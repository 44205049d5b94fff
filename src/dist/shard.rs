//! Which part of a global batch each rank trains or scores, as PyTorch's
//! `DistributedSampler`.

use super::Collective;

/// This rank's part of `items`: consecutive, the parts' sizes differing by at most one, in rank
/// order (every rank holds the same `items`, drawn from the same seed).
pub fn shard<'a, T>(items: &'a [T], c: &dyn Collective) -> &'a [T] {
    let (rank, size, len) = (c.rank(), c.size(), items.len());
    &items[rank * len / size..(rank + 1) * len / size]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::threads::ThreadGroup;
    use crate::dist::SingleProcess;

    #[test]
    fn parts_cover_the_batch_in_order_and_differ_by_at_most_one() {
        let items: Vec<usize> = (0..11).collect();
        assert_eq!(shard(&items, &SingleProcess), &items[..]);
        let parts = ThreadGroup::run(3, |c| shard(&items, c).to_vec());
        assert_eq!(parts.concat(), items);
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 4, 4]);
    }
}
