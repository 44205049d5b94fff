//! `spikeclip reproduce` on a user's data: a CLIP teacher, a pre-training cache (D-text and
//! images, written by `spikeclip cache`) and evaluation caches named after datasets of a
//! prompts file. What needs no labelled fine-tuning set runs here: zero-shot across datasets
//! after pre-training (Table 8) and robustness to enlarged and replaced label sets (Table 2),
//! whose distractors and replacements come from the prompts file's other datasets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::labels::Label;
use super::report::{Cell, ChosenLabels, Report, Table};
use super::reproduce::{write_report, Experiment};
use super::robustness::{labelled, LabelSettings, Robustness};
use crate::data::cache::Cache;
use crate::data::prompts::{DatasetPrompts, PromptSet};
use crate::data::ImageFeatureSet;
use crate::eval::zeroshot::class_embeddings;
use crate::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use crate::model::config::SpikeClipConfig;
use crate::model::text::copy_clip_embeddings;
use crate::recipe::{
    distill_image, distill_text, student_class_embeddings, teacher_zero_shot, zero_shot, Student,
};
use crate::teacher::clip::ClipTeacher;
use crate::teacher::{TextTeacher, Tokenize};
use crate::train::stage::{StageConfig, StageRun};

/// The template that places pool labels for the similarity search: one sentence per label keeps
/// embedding a whole prompts file (thousands of class names) affordable.
const POOL_TEMPLATE: &str = "a photo of a {}.";

/// What a run on real data needs.
#[derive(Debug, Clone, Serialize)]
pub struct RealDataConfig {
    /// A CLIP checkpoint directory in Hugging Face layout (also the students' tokenizer).
    pub teacher: PathBuf,
    /// A cache with `texts/` (D-text) and `images/` for pre-training.
    pub pretrain: PathBuf,
    /// `(dataset, cache)`: each dataset is named as in the prompts file.
    pub evals: Vec<(String, PathBuf)>,
    pub prompts: PathBuf,
    /// Both students' architecture; the vocabulary is the tokenizer's.
    pub model: SpikeClipConfig,
    pub pretrain_stage: StageConfig,
    pub label_seeds: Vec<u64>,
    pub labels: LabelSettings,
    /// Continue interrupted trainings from their last checkpoints.
    pub resume: bool,
}

/// The experiments this module runs; the others need the built-in world's held-out pairs or a
/// labelled fine-tuning set.
pub const SUPPORTED: [Experiment; 2] = [Experiment::Table2, Experiment::Table8];

/// One evaluation dataset: its name, images and prompts.
struct EvalSet {
    name: String,
    images: Cache,
    prompts: DatasetPrompts,
}

/// A pre-trained student with what it needs to classify.
struct Trained {
    name: &'static str,
    student: Box<dyn Student>,
}

fn eval_sets(cfg: &RealDataConfig, file: &PromptSet) -> anyhow::Result<Vec<EvalSet>> {
    anyhow::ensure!(!cfg.evals.is_empty(), "real data needs at least one --eval");
    cfg.evals
        .iter()
        .map(|(name, dir)| {
            let prompts = file
                .datasets
                .get(name)
                .cloned()
                .with_context(|| format!("{}: no dataset {name:?}", cfg.prompts.display()))?;
            let images = Cache::open_images(dir)?;
            let classes = images.class_names().len();
            if classes != prompts.classes.len() {
                bail!(
                    "{}: the cache has {classes} classes but {name:?} in {} has {}",
                    dir.display(),
                    cfg.prompts.display(),
                    prompts.classes.len()
                )
            }
            Ok(EvalSet {
                name: name.clone(),
                images,
                prompts,
            })
        })
        .collect()
}

/// Pre-trains one student: CLIP's embeddings copied in, text then image distillation, saved to
/// `out/NAME` as a checkpoint the other commands read.
fn pretrain(
    cfg: &RealDataConfig,
    card: &ModelCard,
    name: &'static str,
    (teacher, texts, images): (&ClipTeacher, &Cache, &Cache),
    out: &Path,
    progress: bool,
) -> anyhow::Result<Trained> {
    let dev = Device::Cpu;
    let student = card.build_seeded(cfg.pretrain_stage.seed, &dev)?;
    copy_clip_embeddings(
        student.varmap(),
        teacher.model.token_embedding(),
        teacher.model.position_embedding(),
    )
    .with_context(|| format!("{name}: copying CLIP's embeddings"))?;
    let dir = out.join(name);
    let run = |stage| {
        let run = StageRun {
            name: stage,
            out_dir: &dir,
            varmap: student.varmap(),
            config: &cfg.pretrain_stage,
            resume: false,
            show_progress: progress,
        };
        StageRun {
            resume: cfg.resume && run.last_path().exists(),
            ..run
        }
    };
    distill_text(student.as_ref(), texts, run("distill_text"), &dev, None)
        .with_context(|| format!("{name}: text distillation"))?;
    distill_image(student.as_ref(), images, run("distill_image"), &dev, None)
        .with_context(|| format!("{name}: image distillation"))?;
    checkpoint::save(&dir, student.as_ref(), card)?;
    Ok(Trained { name, student })
}

/// Runs Table 8 and/or Table 2 on the user's data and writes the report to `out`.
pub fn run_real_data(
    cfg: &RealDataConfig,
    only: &[Experiment],
    out: &Path,
    progress: bool,
) -> anyhow::Result<Report> {
    if let Some(e) = only.iter().find(|e| !SUPPORTED.contains(e)) {
        bail!(
            "{} needs the built-in world (held-out pairs, a labelled fine-tuning split); on \
             real data reproduce runs {}",
            e.id(),
            SUPPORTED.map(Experiment::id).join(", ")
        )
    }
    let start = Instant::now();
    let dev = Device::Cpu;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let teacher = ClipTeacher::load(&cfg.teacher, &dev)?;
    let file = PromptSet::from_file(&cfg.prompts)?;
    let evals = eval_sets(cfg, &file)?;
    let tokenizer = TokenizerSpec::Clip {
        path: cfg.teacher.clone(),
    };
    let tok = tokenizer.open()?;
    let mut config = cfg.model.clone();
    config.text.vocab_size = tok.vocab_size();
    config.out_dim = teacher.model.config.projection_dim;
    let texts = Cache::open(&cfg.pretrain.join("texts"))?;
    let images = Cache::open_images(&cfg.pretrain)?;
    for (what, cache) in [("texts", &texts), ("images", &images)] {
        if let Some(dim) = cache.teacher_dim().filter(|&d| d != config.out_dim) {
            bail!(
                "{}: the cached {what} hold {dim}-d teacher features but {} projects to {}-d; \
                 was the cache built with another CLIP?",
                cfg.pretrain.display(),
                cfg.teacher.display(),
                config.out_dim
            )
        }
    }
    let mut students = Vec::new();
    for (name, kind) in [
        ("spikeclip", ModelKind::SpikeClip),
        ("scratchclip", ModelKind::ScratchClip),
    ] {
        let card = ModelCard {
            kind,
            config: config.clone(),
            tokenizer: tokenizer.clone(),
        };
        let data = (&teacher, &texts, &images);
        students.push(pretrain(cfg, &card, name, data, out, progress)?);
    }
    let scorer = Scorer {
        teacher: &teacher,
        tokenizer: tok.as_ref(),
        context: config.text.context_length,
        students: &students,
    };
    let mut tables = Vec::new();
    let mut chosen = Vec::new();
    for &e in only {
        tables.push(match e {
            Experiment::Table8 => scorer.table8(&evals)?,
            _ => scorer.table2(cfg, &file, &evals, &mut chosen)?,
        });
    }
    let report = Report {
        data: format!(
            "CLIP {} as teacher; pre-training cache {}; evaluation on {}",
            cfg.teacher.display(),
            cfg.pretrain.display(),
            evals
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        claims: super::claims::judge(&tables),
        tables,
        chosen_labels: chosen,
        omitted: vec![
            "Tables 3-6 and Figure 6 on real data (they need a labelled fine-tuning set and \
             retraining per variant); run them on the built-in world."
                .into(),
        ],
        seconds: start.elapsed().as_secs_f64(),
        config: serde_json::to_value(cfg)?,
    };
    write_report(&report, out)?;
    Ok(report)
}

/// Zero-shot top-1 of the teacher and the students against any label set.
struct Scorer<'a> {
    teacher: &'a ClipTeacher,
    tokenizer: &'a dyn Tokenize,
    context: usize,
    students: &'a [Trained],
}

impl Scorer<'_> {
    fn teacher_classes(&self, prompts: &DatasetPrompts) -> anyhow::Result<Tensor> {
        class_embeddings(prompts, |t| self.teacher.text_features(t))
    }

    /// Top-1 of the teacher, then of each student, on `set` with label set `prompts`.
    fn top1(&self, set: &EvalSet, prompts: &DatasetPrompts) -> anyhow::Result<Vec<f64>> {
        let dev = Device::Cpu;
        let mut out =
            vec![teacher_zero_shot(&set.images, &self.teacher_classes(prompts)?, &dev)?.top1()];
        for t in self.students {
            let s = t.student.as_ref();
            let classes = student_class_embeddings(s, self.tokenizer, prompts, self.context, &dev)?;
            out.push(zero_shot(s, &set.images, &classes, &dev)?.top1());
        }
        Ok(out)
    }

    fn row_names(&self) -> Vec<String> {
        std::iter::once("CLIP (teacher)".to_string())
            .chain(self.students.iter().map(|t| display_name(t.name)))
            .collect()
    }

    fn table8(&self, evals: &[EvalSet]) -> anyhow::Result<Table> {
        let names = self.row_names();
        let columns: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut table = Table::new(
            "table8",
            "Table 8: zero-shot top-1 after pre-training only, per dataset",
            &columns,
        );
        for set in evals {
            let cells = self.top1(set, &set.prompts)?;
            table.push(&set.name, cells.into_iter().map(Cell::one).collect());
        }
        table.notes.push(
            "Prompt-ensembled with each dataset's templates from the prompts file; the students \
             saw no labels."
                .into(),
        );
        Ok(table)
    }

    /// Each dataset's labels against the class names of every other dataset in the file.
    fn robustness(&self, file: &PromptSet, set: &EvalSet) -> anyhow::Result<Robustness> {
        let single = |names: &[String]| -> anyhow::Result<Vec<Label>> {
            let prompts = DatasetPrompts {
                classes: names.iter().map(|n| vec![n.clone()]).collect(),
                templates: vec![POOL_TEMPLATE.to_string()],
            };
            labelled(names.to_vec(), &self.teacher_classes(&prompts)?)
        };
        let first = |p: &DatasetPrompts| -> Vec<String> {
            p.classes.iter().map(|c| c[0].clone()).collect()
        };
        let pool_names: Vec<String> = file
            .datasets
            .iter()
            .filter(|(name, _)| **name != set.name)
            .flat_map(|(_, p)| first(p))
            .collect();
        Robustness::new(
            single(&first(&set.prompts))?,
            single(&pool_names)?,
            set.prompts.templates.clone(),
        )
    }

    fn table2(
        &self,
        cfg: &RealDataConfig,
        file: &PromptSet,
        evals: &[EvalSet],
        chosen: &mut Vec<ChosenLabels>,
    ) -> anyhow::Result<Table> {
        let mut table: Option<Table> = None;
        for set in evals {
            let sets = self
                .robustness(file, set)?
                .label_sets(&cfg.label_seeds, &cfg.labels)?;
            let table = table.get_or_insert_with(|| {
                let columns: Vec<&str> = sets.iter().map(|s| s.column.as_str()).collect();
                Table::new(
                    "table2",
                    "Table 2: robustness to enlarged and replaced label sets",
                    &columns,
                )
            });
            let mut per_model = vec![Vec::new(); self.students.len() + 1];
            for column in &sets {
                let mut runs = vec![Vec::new(); per_model.len()];
                for prompts in &column.prompts {
                    for (acc, run) in self.top1(set, prompts)?.into_iter().zip(&mut runs) {
                        run.push(acc);
                    }
                }
                for (cells, run) in per_model.iter_mut().zip(runs) {
                    cells.push(Cell::over(&run));
                }
            }
            for (model, cells) in self.row_names().iter().zip(per_model) {
                table.push(&format!("{model} on {}", set.name), cells);
            }
            chosen.extend(sets.iter().filter_map(|s| {
                s.chosen.clone().map(|c| ChosenLabels {
                    setting: format!("{}: {}", set.name, c.setting),
                    ..c
                })
            }));
        }
        let mut table = table.context("Table 2 needs at least one evaluation dataset")?;
        table.notes.push(format!(
            "Distractors: class names of the prompts file's other datasets least similar to the \
             originals (CLIP text similarity, \"{POOL_TEMPLATE}\"); replacements: each label's \
             nearest such name. {} label seeds; the models are not retrained per setting.",
            cfg.label_seeds.len()
        ));
        Ok(table)
    }
}

/// The report's name for a student directory.
fn display_name(dir: &str) -> String {
    match dir {
        "spikeclip" => "SpikeCLIP".into(),
        "scratchclip" => "ScratchCLIP".into(),
        other => other.into(),
    }
}
