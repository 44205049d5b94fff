//! Words the world's images never show: extra colours and shapes that make distractor labels,
//! and synonyms of the image colours and shapes that make unseen replacement labels. They exist
//! only in text (D-text and the teacher), so the robustness study (the paper's Table 2) can
//! enlarge the world's 24 labels eightfold and rename them without new images.

use super::concepts::{COLOURS, SHAPES};

/// Colours no image has.
pub const EXTRA_COLOURS: [&str; 14] = [
    "orange", "pink", "brown", "white", "black", "grey", "silver", "beige", "navy", "maroon",
    "olive", "lime", "magenta", "indigo",
];

/// Shapes no image has.
pub const EXTRA_SHAPES: [&str; 14] = [
    "star",
    "hexagon",
    "ring",
    "diamond",
    "heart",
    "arrow",
    "oval",
    "pentagon",
    "crescent",
    "spiral",
    "rectangle",
    "octagon",
    "moon",
    "cloud",
];

/// Synonyms of each image colour, in [`COLOURS`] order.
pub const COLOUR_SYNONYMS: [&[&str]; 6] = [
    &["crimson", "scarlet"],
    &["emerald"],
    &["azure"],
    &["golden"],
    &["violet"],
    &["turquoise"],
];

/// Synonyms of each image shape, in [`SHAPES`] order.
pub const SHAPE_SYNONYMS: [&[&str]; 4] = [&["disc"], &["box"], &["wedge"], &["plus"]];

/// Every lexicon word with the image word it is a synonym of, if any.
pub fn words() -> impl Iterator<Item = (&'static str, Option<&'static str>)> {
    let synonyms = |names: Vec<&'static str>, syns: &'static [&'static [&'static str]]| {
        names
            .into_iter()
            .zip(syns)
            .flat_map(|(base, s)| s.iter().map(move |w| (*w, Some(base))))
            .collect::<Vec<_>>()
    };
    let colours = synonyms(COLOURS.iter().map(|c| c.0).collect(), &COLOUR_SYNONYMS);
    let shapes = synonyms(SHAPES.to_vec(), &SHAPE_SYNONYMS);
    EXTRA_COLOURS
        .iter()
        .chain(&EXTRA_SHAPES)
        .map(|w| (*w, None))
        .chain(colours)
        .chain(shapes)
}

/// Colour-shape names of text-only labels, grouped like the datasets of a prompts file:
/// `synonyms` (an image class renamed in one word), `palette` (an extra colour on an image
/// shape), `shapes` (an image colour on an extra shape) and `novel` (both words extra).
pub fn label_groups() -> Vec<(&'static str, Vec<String>)> {
    let pairs = |cs: &[&str], ss: &[&str]| -> Vec<String> {
        cs.iter()
            .flat_map(|c| ss.iter().map(move |s| format!("{c} {s}")))
            .collect()
    };
    let image_colours: Vec<&str> = COLOURS.iter().map(|c| c.0).collect();
    let mut synonyms: Vec<String> = COLOUR_SYNONYMS
        .iter()
        .flat_map(|syns| pairs(syns, &SHAPES))
        .collect();
    for syns in SHAPE_SYNONYMS {
        synonyms.extend(pairs(&image_colours, syns));
    }
    vec![
        ("synonyms", synonyms),
        ("palette", pairs(&EXTRA_COLOURS, &SHAPES)),
        ("shapes", pairs(&image_colours, &EXTRA_SHAPES)),
        ("novel", pairs(&EXTRA_COLOURS, &EXTRA_SHAPES)),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::{World, WorldConfig};
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn a_synonym_is_nearest_to_its_word_and_extra_words_are_far() -> anyhow::Result<()> {
        let w = World::new(WorldConfig::default());
        let t = w.teacher();
        let colours: Vec<&str> = COLOURS.iter().map(|c| c.0).collect();
        for (word, base) in words() {
            let e = t.text_embedding(word)?;
            let sims: Vec<f32> = colours
                .iter()
                .chain(&SHAPES)
                .map(|c| Ok(cos(&e, &t.text_embedding(c)?)))
                .collect::<anyhow::Result<_>>()?;
            let (best, &sim) = sims
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("words exist");
            let nearest = colours.iter().chain(&SHAPES).nth(best).expect("in range");
            match base {
                Some(b) => assert!(*nearest == b && sim > 0.75, "{word}: {nearest} {sim}"),
                None => assert!(sim < 0.3, "{word} is close to {nearest}: {sim}"),
            }
        }
        Ok(())
    }

    #[test]
    fn dtext_stays_mostly_about_the_image_classes_and_teaches_the_lexicon() {
        let w = World::new(WorldConfig::default());
        let classes = World::class_names();
        let pool: Vec<String> = label_groups().into_iter().flat_map(|g| g.1).collect();
        let sentences: Vec<String> = (0..2000).map(|i| w.dtext_sentence(i)).collect();
        let about_classes = sentences
            .iter()
            .filter(|s| classes.iter().any(|c| s.contains(c.as_str())))
            .count();
        assert!(about_classes >= 1500, "{about_classes} of 2000");
        let lexicon = sentences
            .iter()
            .filter(|s| pool.iter().any(|p| s.contains(p.as_str())))
            .count();
        assert!(lexicon >= 200, "{lexicon} of 2000");
    }

    #[test]
    fn the_label_pool_is_new_labels_the_world_can_say() {
        let w = World::new(WorldConfig::default());
        let classes = World::class_names();
        let pool = World::label_pool();
        let mut total = 0;
        for prompts in pool.datasets.values() {
            for c in &prompts.classes {
                assert!(!classes.contains(&c[0]), "{} is an image class", c[0]);
                assert!(w.teacher().text_embedding(&c[0]).is_ok());
                total += 1;
            }
        }
        // x8 needs 7 x 24 distractors beyond the synonyms.
        assert!(total - pool.datasets["synonyms"].classes.len() >= 7 * 24);
        assert_eq!(classes.len(), 24);
    }
}
