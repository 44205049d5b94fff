//! The SpikeCLIP recipe: (0) distil the text encoder from the teacher's text features on
//! D-text, (1) distil the image encoder from the teacher's image features, (2) fine-tune the
//! image encoder with the dual loss against the frozen text encoder's class embeddings, and
//! zero-shot evaluation in between. Every step works through the [`Student`] trait, so the
//! spiking SpikeCLIP and its ANN twin ScratchCLIP run the same code.

pub mod classifier;
pub mod dead_features;
pub mod demo;
pub mod energy;
pub mod health;
pub mod seeds;
pub mod stages;
pub mod student;
pub mod world_recipe;

pub use stages::{
    distill_image, distill_text, finetune, student_class_embeddings, teacher_zero_shot, zero_shot,
    FinetuneTargets,
};
pub use student::Student;
