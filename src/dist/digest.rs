//! Checks that every rank holds the same thing (arguments, dataset, parameters): a 64-bit
//! digest per rank, gathered and compared, so that a mismatch is an error at the step it
//! appears instead of a silently wrong model.

use super::Collective;

/// FNV-1a over bytes: cheap, and enough to tell apart what should be equal (not a defence
/// against anyone).
#[derive(Debug, Clone, Copy)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// The values' bits, in order.
    pub fn f32s(self, values: &[f32]) -> Self {
        values.iter().fold(self, |d, v| d.bytes(&v.to_le_bytes()))
    }

    pub fn value(self) -> u64 {
        self.0
    }
}

/// Fails on every rank, naming the ranks that differ from rank 0, unless every rank's `digest`
/// of `what` is the same.
pub fn ensure_same(what: &str, digest: u64, c: &dyn Collective) -> anyhow::Result<()> {
    let all = c.all_gather_u64(digest);
    let differ: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, &d)| d != all[0])
        .map(|(rank, d)| format!("rank {rank} {d:016x}"))
        .collect();
    anyhow::ensure!(
        differ.is_empty(),
        "{what} differs between ranks: rank 0 {:016x}, {}",
        all[0],
        differ.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::threads::ThreadGroup;

    #[test]
    fn a_rank_that_differs_is_named_on_every_rank() {
        let same = ThreadGroup::run(3, |c| ensure_same("the data", 9, c).is_ok());
        assert_eq!(same, [true; 3]);
        let errors = ThreadGroup::run(3, |c| {
            let d = Digest::default().f32s(&[c.rank().min(1) as f32]).value();
            ensure_same("the data", d, c).unwrap_err().to_string()
        });
        for e in &errors {
            assert!(
                e.starts_with("the data differs between ranks")
                    && e.contains("rank 1 ")
                    && e.contains("rank 2 "),
                "{e}"
            );
        }
        assert_ne!(
            Digest::default().f32s(&[0.0]).value(),
            Digest::default().f32s(&[-0.0]).value()
        );
    }
}
