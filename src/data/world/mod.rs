//! The built-in world: procedurally generated 32x32 images of colour-shape concepts, captions
//! from templates, and an analytic teacher that is a perfect CLIP for them. It lets the whole
//! recipe run with nothing downloaded, and because some colour-shape pairs appear only in
//! text, zero-shot accuracy on those pairs measures real generalisation.

pub mod concepts;
pub mod lexicon;
pub mod render;
pub mod sets;
pub mod teacher;
pub mod tokenizer;

use std::sync::{Arc, OnceLock};

use concepts::{Concept, COLOURS, SHAPES, SIZES};
use render::{Sample, Subject};
pub use sets::{WorldImages, WorldText};
use teacher::AnalyticTeacher;
use tokenizer::{words, WorldTokenizer};

use crate::data::prompts::{DatasetPrompts, PromptSet};
use crate::train::rng::Rng;

/// Name of the world's dataset in its [`PromptSet`].
pub const DATASET: &str = "world";

/// Zero-shot prompt templates (prompt ensembling averages over them).
pub const PROMPT_TEMPLATES: [&str; 6] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a {} on a plain background.",
    "a rendering of the {}.",
];

/// Caption forms of D-text: different wording from the prompts, with an optional size word.
pub const CAPTION_TEMPLATES: [&str; 6] = [
    "there is a {} in the picture.",
    "this is a {}.",
    "an image showing a {}.",
    "a {} drawn on a background.",
    "look at the {}.",
    "a photo of one {}.",
];

/// One D-text sentence in this many is about a text-only label of the lexicon, so the student
/// learns those words while D-text stays mostly (80 %) about the image classes.
const LEXICON_EVERY: usize = 5;

/// Sizes of the generated sets; each is generated on the fly, item by item.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorldConfig {
    pub seed: u64,
    pub train_images: usize,
    /// Size of each test split (seen and unseen pairs), and of each validation split.
    pub test_images: usize,
    pub dtext_sentences: usize,
    /// Share of the pre-training images that show one attribute alone (half colour splashes,
    /// half grey shapes); the rest are objects of seen pairs.
    pub attribute_share: f64,
    pub embed_dim: usize,
    /// Sequence length of token ids.
    pub max_len: usize,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train_images: 3000,
            test_images: 600,
            dtext_sentences: 4000,
            attribute_share: 0.5,
            embed_dim: 512,
            max_len: 20,
        }
    }
}

/// The image splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Labelled objects of the seen colour-shape pairs only, for fine-tuning.
    Train,
    /// Other images of the seen pairs.
    TestSeen,
    /// Images of the held-out pairs, never in training.
    TestUnseen,
    /// Unlabelled images for image distillation: objects of the seen pairs, and with
    /// [`WorldConfig::attribute_share`] colour splashes and grey shapes that show one attribute.
    Pretrain,
    /// Other images of the seen pairs than the test split's, for choices made while studying
    /// the recipe (settings, budgets), so the test pairs stay unseen by every such choice.
    ValSeen,
    /// Other images of the held-out pairs than the test split's, likewise.
    ValUnseen,
}

impl Split {
    /// The concepts this split draws from.
    pub fn concepts(self) -> Vec<Concept> {
        // Pre-training never shows a held-out pair either: a splash or grey shape shows one
        // attribute of a seen pair, and every colour and shape occurs in a seen pair.
        let unseen = matches!(self, Split::TestUnseen | Split::ValUnseen);
        Concept::all()
            .into_iter()
            .filter(|c| c.is_unseen() == unseen)
            .collect()
    }

    /// The label set of the split, in label order. Fine-tuning data are labelled with the pairs
    /// they show, so its cross-entropy never pushes the held-out pairs down; the test splits
    /// and the validation splits are scored against every pair (generalised zero-shot);
    /// pre-training is unlabelled.
    pub fn classes(self) -> Vec<Concept> {
        match self {
            Split::Pretrain => Vec::new(),
            Split::Train => self.concepts(),
            Split::TestSeen | Split::TestUnseen | Split::ValSeen | Split::ValUnseen => {
                Concept::all()
            }
        }
    }
}

/// One world, cheap to clone (the teacher is shared).
#[derive(Debug, Clone)]
pub struct World {
    cfg: WorldConfig,
    rng: Rng,
    teacher: Arc<AnalyticTeacher>,
    tokenizer: Arc<WorldTokenizer>,
}

/// Every word the world's prompts and captions use.
fn vocabulary() -> Vec<String> {
    let concept_words = COLOURS
        .iter()
        .map(|c| c.0)
        .chain(SHAPES)
        .chain(SIZES)
        .chain(lexicon::words().map(|(w, _)| w))
        .map(str::to_string);
    let template_words = PROMPT_TEMPLATES
        .iter()
        .chain(&CAPTION_TEMPLATES)
        .flat_map(|t| words(&t.replace("{}", " ")));
    concept_words.chain(template_words).collect()
}

impl World {
    pub fn new(cfg: WorldConfig) -> Self {
        let rng = Rng::new(cfg.seed);
        let vocab = vocabulary();
        let vocab = vocab.iter().map(String::as_str);
        Self {
            teacher: Arc::new(AnalyticTeacher::new(vocab.clone(), cfg.embed_dim, &rng)),
            tokenizer: Arc::new(WorldTokenizer::new(vocab)),
            rng,
            cfg,
        }
    }

    pub fn config(&self) -> &WorldConfig {
        &self.cfg
    }

    pub fn teacher(&self) -> &AnalyticTeacher {
        &self.teacher
    }

    pub fn tokenizer(&self) -> &WorldTokenizer {
        &self.tokenizer
    }

    /// Class names in label order (all pairs, seen and unseen: zero-shot picks among all).
    pub fn class_names() -> Vec<String> {
        Concept::all().into_iter().map(Concept::name).collect()
    }

    /// The label set as prompts, under [`DATASET`].
    pub fn prompts() -> PromptSet {
        PromptSet {
            datasets: [(DATASET.to_string(), Self::split_prompts(Split::TestSeen))].into(),
        }
    }

    /// Prompts of a split's label set ([`Split::classes`]).
    pub fn split_prompts(split: Split) -> DatasetPrompts {
        DatasetPrompts {
            classes: split
                .classes()
                .into_iter()
                .map(|c| vec![c.name()])
                .collect(),
            templates: PROMPT_TEMPLATES.iter().map(|t| t.to_string()).collect(),
        }
    }

    pub fn split_len(&self, split: Split) -> usize {
        match split {
            Split::Pretrain | Split::Train => self.cfg.train_images,
            Split::TestSeen | Split::TestUnseen | Split::ValSeen | Split::ValUnseen => {
                self.cfg.test_images
            }
        }
    }

    fn split_rng(&self, split: Split) -> Rng {
        self.rng.fork(10 + split as u64)
    }

    /// The attributes of image `index` of `split`, independent of every other index.
    pub fn sample(&self, split: Split, index: usize) -> Sample {
        let concepts = split.concepts();
        let mut rng = self.split_rng(split).fork(index as u64);
        let concept = concepts[rng.below(concepts.len())];
        let subject = match split {
            Split::Pretrain if rng.range(0.0, 1.0) < self.cfg.attribute_share => {
                match rng.below(2) {
                    0 => Subject::ColourSplash,
                    _ => Subject::GreyShape,
                }
            }
            _ => Subject::Object,
        };
        Sample::draw(concept, subject, &mut rng)
    }

    /// The teacher's feature of image `index` of `split`.
    pub fn image_feature(&self, split: Split, index: usize, sample: &Sample) -> Vec<f32> {
        let key = (split as u64) << 48 | index as u64;
        self.teacher.image_embedding(sample, key)
    }

    /// D-text sentence `index`: a caption of any concept, unseen pairs included, sometimes
    /// with its size, or (one in [`LEXICON_EVERY`]) of a text-only label of [`Self::label_pool`].
    pub fn dtext_sentence(&self, index: usize) -> String {
        let mut rng = self.rng.fork(20).fork(index as u64);
        let template = CAPTION_TEMPLATES[rng.below(CAPTION_TEMPLATES.len())];
        if rng.below(LEXICON_EVERY) == 0 {
            static NAMES: OnceLock<Vec<String>> = OnceLock::new();
            let names = NAMES.get_or_init(|| {
                lexicon::label_groups()
                    .into_iter()
                    .flat_map(|g| g.1)
                    .collect()
            });
            return template.replace("{}", &names[rng.below(names.len())]);
        }
        let concept = Concept::from_label(rng.below(Concept::count()));
        let name = match rng.below(SIZES.len() + 1) {
            0 => concept.name(),
            s => format!("{} {}", SIZES[s - 1], concept.name()),
        };
        template.replace("{}", &name)
    }

    /// Text-only labels for the robustness study, one dataset per group of
    /// [`lexicon::label_groups`], with the world's prompt templates (as `clip_prompts.json`
    /// gives other datasets' class names).
    pub fn label_pool() -> PromptSet {
        let templates: Vec<String> = PROMPT_TEMPLATES.iter().map(|t| t.to_string()).collect();
        let datasets = lexicon::label_groups()
            .into_iter()
            .map(|(name, classes)| {
                let prompts = DatasetPrompts {
                    classes: classes.into_iter().map(|c| vec![c]).collect(),
                    templates: templates.clone(),
                };
                (name.to_string(), prompts)
            })
            .collect();
        PromptSet { datasets }
    }

    pub fn images(&self, split: Split) -> WorldImages {
        WorldImages::new(self.clone(), split)
    }

    pub fn dtext(&self) -> WorldText {
        WorldText::new(self.clone())
    }
}
