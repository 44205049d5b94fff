//! The world's vocabulary of concepts: a class is a colour and a shape; size is an extra
//! attribute that captions may mention but labels ignore. A fixed, documented set of
//! colour-shape pairs is held out of image training.

/// Shape names, in class order.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];

/// Colour names with their nominal RGB in `[0, 1]`, in class order.
pub const COLOURS: [(&str, [f32; 3]); 6] = [
    ("red", [0.90, 0.15, 0.15]),
    ("green", [0.15, 0.80, 0.20]),
    ("blue", [0.20, 0.30, 0.95]),
    ("yellow", [0.95, 0.90, 0.15]),
    ("purple", [0.60, 0.20, 0.80]),
    ("cyan", [0.10, 0.85, 0.90]),
];

/// Size words; index 0 is small.
pub const SIZES: [&str; 2] = ["small", "large"];

/// A class of the world: one colour and one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Concept {
    pub colour: usize,
    pub shape: usize,
}

impl Concept {
    pub fn count() -> usize {
        COLOURS.len() * SHAPES.len()
    }

    /// All concepts in label order (colour-major).
    pub fn all() -> Vec<Concept> {
        (0..Self::count()).map(Self::from_label).collect()
    }

    pub fn from_label(label: usize) -> Concept {
        Concept {
            colour: label / SHAPES.len(),
            shape: label % SHAPES.len(),
        }
    }

    pub fn label(self) -> usize {
        self.colour * SHAPES.len() + self.shape
    }

    /// The class name used in prompts, e.g. "red circle".
    pub fn name(self) -> String {
        format!("{} {}", COLOURS[self.colour].0, SHAPES[self.shape])
    }

    /// Held-out pairs: each colour misses exactly one shape (colour index modulo the number of
    /// shapes), so every colour and every shape still appears in training images, only some
    /// of their combinations do not.
    pub fn is_unseen(self) -> bool {
        self.colour % SHAPES.len() == self.shape
    }
}
