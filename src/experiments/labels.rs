//! Label sets perturbed for the robustness study (the paper's Table 2).
//!
//! The paper picked distractor and replacement labels with a chatbot; here they are chosen by
//! the teacher's text similarity over the class names of other datasets, deterministically for
//! a seed, and never equal to an original label.

use std::collections::HashSet;

use crate::train::rng::Rng;

/// A label with its unit-norm teacher text embedding.
#[derive(Debug, Clone)]
pub struct Label {
    pub name: String,
    pub embedding: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalised(name: &str) -> String {
    name.trim().to_lowercase()
}

/// Pool labels that are not (case-insensitively) one of the originals, deduplicated by name.
fn candidates<'a>(originals: &[Label], pool: &'a [Label]) -> Vec<&'a Label> {
    let mut seen: HashSet<String> = originals.iter().map(|l| normalised(&l.name)).collect();
    pool.iter()
        .filter(|l| seen.insert(normalised(&l.name)))
        .collect()
}

/// The first `k` items of a seeded shuffle of `0..n`.
fn sample(seed: u64, n: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut idx);
    idx.truncate(k.min(n));
    idx
}

/// The label set enlarged to `factor` times its size with distractors: labels of the pool least
/// similar to every original (lowest maximum cosine). The seed picks among the least similar
/// twice as many candidates as needed, so different seeds give different distractor sets.
pub fn enlarge(
    originals: &[Label],
    pool: &[Label],
    factor: usize,
    seed: u64,
) -> anyhow::Result<Vec<Label>> {
    anyhow::ensure!(factor >= 1, "enlargement factor must be at least 1");
    let needed = originals.len() * (factor - 1);
    let mut cands = candidates(originals, pool);
    anyhow::ensure!(
        cands.len() >= needed,
        "enlarging {} labels x{factor} needs {needed} distractors, the pool has {} new labels",
        originals.len(),
        cands.len()
    );
    let closeness = |l: &Label| {
        originals
            .iter()
            .map(|o| cosine(&o.embedding, &l.embedding))
            .fold(f32::NEG_INFINITY, f32::max)
    };
    cands.sort_by(|a, b| {
        closeness(a)
            .total_cmp(&closeness(b))
            .then(a.name.cmp(&b.name))
    });
    let shortlist = &cands[..(2 * needed).min(cands.len())];
    let mut picked = sample(seed, shortlist.len(), needed);
    picked.sort_unstable();
    let mut out = originals.to_vec();
    out.extend(picked.into_iter().map(|i| shortlist[i].clone()));
    Ok(out)
}

/// A label set with some labels replaced, and what replaced what, for the report.
#[derive(Debug, Clone)]
pub struct Replaced {
    pub labels: Vec<Label>,
    /// (original, replacement) per replaced position, in label order.
    pub changes: Vec<(String, String)>,
}

/// The label set with a fraction of its labels, chosen by the seed, each replaced by its most
/// similar label from the pool (an unseen synonym). Each pool label replaces at most one
/// original.
pub fn replace_with_nearest(
    originals: &[Label],
    pool: &[Label],
    fraction: f64,
    seed: u64,
) -> anyhow::Result<Replaced> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&fraction),
        "replacement fraction must be in [0, 1], got {fraction}"
    );
    let count = (fraction * originals.len() as f64).round() as usize;
    let cands = candidates(originals, pool);
    anyhow::ensure!(
        cands.len() >= count,
        "replacing {count} labels needs as many new labels, the pool has {}",
        cands.len()
    );
    let mut positions = sample(seed, originals.len(), count);
    positions.sort_unstable();
    let mut used = vec![false; cands.len()];
    let mut out = originals.to_vec();
    let mut changes = Vec::with_capacity(count);
    for p in positions {
        let best = (0..cands.len())
            .filter(|&i| !used[i])
            .max_by(|&a, &b| {
                let sa = cosine(&originals[p].embedding, &cands[a].embedding);
                let sb = cosine(&originals[p].embedding, &cands[b].embedding);
                sa.total_cmp(&sb).then(cands[b].name.cmp(&cands[a].name))
            })
            .expect("enough candidates were checked above");
        used[best] = true;
        changes.push((originals[p].name.clone(), cands[best].name.clone()));
        out[p] = cands[best].clone();
    }
    Ok(Replaced {
        labels: out,
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(name: &str, angle: f32) -> Label {
        Label {
            name: name.to_string(),
            embedding: vec![angle.cos(), angle.sin()],
        }
    }

    fn setup() -> (Vec<Label>, Vec<Label>) {
        let originals = vec![label("cat", 0.0), label("dog", 0.3)];
        let pool = vec![
            label("Cat", 0.0), // an original under another case: never picked
            label("kitten", 0.05),
            label("puppy", 0.32),
            label("truck", 2.0),
            label("ship", 2.5),
            label("cloud", 3.0),
            label("airplane", 1.6),
            label("tiger", 0.6),
        ];
        (originals, pool)
    }

    #[test]
    fn enlargement_takes_the_least_similar_and_is_seeded() -> anyhow::Result<()> {
        let (originals, pool) = setup();
        let set = enlarge(&originals, &pool, 2, 7)?;
        assert_eq!(set.len(), 4);
        let extra: Vec<&str> = set[2..].iter().map(|l| l.name.as_str()).collect();
        // Shortlist: the four least similar (cloud, ship, truck, airplane).
        for name in &extra {
            assert!(
                ["cloud", "ship", "truck", "airplane"].contains(name),
                "{name}"
            );
        }
        let again = enlarge(&originals, &pool, 2, 7)?;
        assert_eq!(
            set.iter().map(|l| &l.name).collect::<Vec<_>>(),
            again.iter().map(|l| &l.name).collect::<Vec<_>>()
        );
        assert!(enlarge(&originals, &pool, 9, 7).is_err());
        Ok(())
    }

    #[test]
    fn replacement_picks_nearest_unseen_labels() -> anyhow::Result<()> {
        let (originals, pool) = setup();
        let all = replace_with_nearest(&originals, &pool, 1.0, 3)?;
        assert_eq!(all.labels[0].name, "kitten");
        assert_eq!(all.labels[1].name, "puppy");
        assert_eq!(all.changes.len(), 2);
        let half = replace_with_nearest(&originals, &pool, 0.5, 3)?;
        assert_eq!(half.changes.len(), 1);
        let kept = half
            .labels
            .iter()
            .filter(|l| l.name == "cat" || l.name == "dog")
            .count();
        assert_eq!(kept, 1);
        for seed in 0..20 {
            let set = replace_with_nearest(&originals, &pool, 0.5, seed)?;
            assert!(set.labels.iter().all(|l| l.name != "Cat"));
        }
        Ok(())
    }
}
