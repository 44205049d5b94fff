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
