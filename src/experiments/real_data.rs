//! `spikeclip reproduce` on a user's data: a CLIP teacher, a pre-training cache (D-text and
//! images, written by `spikeclip cache`) and evaluation caches named after datasets of a
//! prompts file. Zero-shot across datasets after pre-training (Table 8) and robustness to
//! enlarged and replaced label sets (Table 2, distractors and replacements from the prompts
//! file's other datasets) need only these; with a labelled fine-tuning cache the stage and KL
//! ablations (Tables 3 and 4) run too, scored on every evaluation dataset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use serde::Serialize;

use super::labels::Label;
use super::report::{Cell, ChosenLabels, Report, Table};
use super::reproduce::{write_report, Experiment};
use super::robustness::{labelled, LabelSettings, Robustness};
use super::weights::Snapshot;
use crate::data::cache::Cache;
use crate::data::prompts::{DatasetPrompts, PromptSet};
use crate::data::ImageFeatureSet;
use crate::eval::zeroshot::class_embeddings;
use crate::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use crate::model::config::SpikeClipConfig;
use crate::model::text::copy_clip_embeddings;
use crate::progress::Progress;
use crate::recipe::{
    distill_image, distill_text, finetune, student_class_embeddings, teacher_zero_shot, zero_shot,
    FinetuneTargets, Student,
};
use crate::teacher::clip::ClipTeacher;
use crate::teacher::{TextTeacher, Tokenize};
use crate::train::loss::DualLossConfig;
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
    /// `(dataset, cache)`: a labelled set for the fine-tuning ablations (Tables 3 and 4).
    pub finetune: Option<(String, PathBuf)>,
    pub finetune_stage: StageConfig,
    pub dual_loss: DualLossConfig,
    /// KL weights of Table 4.
    pub lambdas: Vec<f64>,
    pub label_seeds: Vec<u64>,
    pub labels: LabelSettings,
    /// Continue interrupted trainings from their last checkpoints.
    pub resume: bool,
}

/// The experiments this module runs without a fine-tuning set, and with one.
pub const SUPPORTED: [Experiment; 2] = [Experiment::Table2, Experiment::Table8];
pub const WITH_FINETUNING: [Experiment; 2] = [Experiment::Table3, Experiment::Table4];

/// Marks the evaluation column of the dataset the ablations fine-tune on.
pub const FINE_TUNED: &str = " (fine-tuned on)";

/// CLIP's learned temperature for the teacher's class distribution (OpenAI's models: 100).
const TEACHER_LOGIT_SCALE: f64 = 100.0;

/// One evaluation dataset: its name, images and prompts.
struct EvalSet {
    name: String,
    images: Cache,
    prompts: DatasetPrompts,
}

/// A pre-trained student, with its weights before and after pre-training.
struct Trained {
    name: &'static str,
    student: Box<dyn Student>,
    init: Snapshot,
    pretrained: Snapshot,
}

fn eval_sets(cfg: &RealDataConfig, file: &PromptSet) -> anyhow::Result<Vec<EvalSet>> {
    anyhow::ensure!(!cfg.evals.is_empty(), "real data needs at least one --eval");
    cfg.evals.iter().map(|e| open_set(cfg, file, e)).collect()
}

/// A labelled cache with its prompt set, their class counts checked.
fn open_set(
    cfg: &RealDataConfig,
    file: &PromptSet,
    (name, dir): &(String, PathBuf),
) -> anyhow::Result<EvalSet> {
    let prompts = file
        .find(name)
        .map(|(_, d)| d.clone())
        .with_context(|| format!("{}: dataset {name:?}", cfg.prompts.display()))?;
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
}

/// A stage run under `dir` that resumes from its last checkpoint when asked and one exists.
fn stage_run<'a>(
    cfg: &RealDataConfig,
    student: &'a dyn Student,
    (stage, config): (&'a str, &'a StageConfig),
    dir: &'a Path,
    progress: bool,
) -> StageRun<'a> {
    let run = StageRun {
        name: stage,
        out_dir: dir,
        varmap: student.varmap(),
        config,
        resume: false,
        show_progress: progress,
        observer: None,
    };
    StageRun {
        resume: cfg.resume && run.last_path().exists(),
        ..run
    }
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
    dev: &Device,
) -> anyhow::Result<Trained> {
    let student = card.build_seeded(cfg.pretrain_stage.seed, dev)?;
    copy_clip_embeddings(
        student.varmap(),
        teacher.model.token_embedding(),
        teacher.model.position_embedding(),
    )
    .with_context(|| format!("{name}: copying CLIP's embeddings"))?;
    let init = Snapshot::take(student.as_ref())?;
    let dir = out.join(name);
    let run = |stage| {
        stage_run(
            cfg,
            student.as_ref(),
            (stage, &cfg.pretrain_stage),
            &dir,
            progress,
        )
    };
    distill_text(student.as_ref(), texts, run("distill_text"), dev, None)
        .with_context(|| format!("{name}: text distillation"))?;
    distill_image(student.as_ref(), images, run("distill_image"), dev, None)
        .with_context(|| format!("{name}: image distillation"))?;
    checkpoint::save(&dir, student.as_ref(), card)?;
    Ok(Trained {
        name,
        pretrained: Snapshot::take(student.as_ref())?,
        student,
        init,
    })
}

/// Runs Table 8 and/or Table 2 on the user's data and writes the report to `out`.
pub fn run_real_data(
    cfg: &RealDataConfig,
    only: &[Experiment],
    out: &Path,
    progress: bool,
    dev: &Device,
) -> anyhow::Result<Report> {
    if let Some(e) = only.iter().find(|e| !SUPPORTED.contains(e)) {
        if !WITH_FINETUNING.contains(e) {
            bail!(
                "{} needs the built-in world (it retrains architecture or data variants); on \
                 real data reproduce runs {} and, with --finetune, {}",
                e.id(),
                SUPPORTED.map(Experiment::id).join(", "),
                WITH_FINETUNING.map(Experiment::id).join(", ")
            )
        }
        anyhow::ensure!(
            cfg.finetune.is_some(),
            "{} on real data needs a labelled fine-tuning set: --finetune NAME=cache:DIR",
            e.id()
        );
    }
    let start = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let teacher = ClipTeacher::load(&cfg.teacher, dev)?;
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
        students.push(pretrain(cfg, &card, name, data, out, progress, dev)?);
    }
    let scorer = Scorer {
        teacher: &teacher,
        tokenizer: tok.as_ref(),
        context: config.text.context_length,
        students: &students,
        device: dev,
    };
    let mut ablations = match &cfg.finetune {
        Some(set) => Some(Ablations {
            cfg,
            scorer: &scorer,
            evals: &evals,
            data: open_set(cfg, &file, set)?,
            out,
            progress,
            by_lambda: BTreeMap::new(),
        }),
        None => None,
    };
    let mut tables = Vec::new();
    let mut chosen = Vec::new();
    let mut steps = Progress::steps("reproduce", only.len(), progress);
    for &e in only {
        tables.push(match (e, ablations.as_mut()) {
            (Experiment::Table8, _) => scorer.table8(&evals)?,
            (Experiment::Table2, _) => scorer.table2(cfg, &file, &evals, &mut chosen)?,
            (Experiment::Table3, Some(a)) => a.table3()?,
            (Experiment::Table4, Some(a)) => a.table4()?,
            _ => unreachable!("checked above: {} needs --finetune", e.id()),
        });
        steps.set_message(format!("{} done", e.id()));
        steps.inc(1);
    }
    steps.finish();
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
            "Tables 5 and 6 and Figure 6 on real data (each retrains an architecture or data \
             variant); run them on the built-in world."
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
    device: &'a Device,
}

impl Scorer<'_> {
    fn teacher_classes(&self, prompts: &DatasetPrompts) -> anyhow::Result<Tensor> {
        class_embeddings(prompts, |t| self.teacher.text_features(t))
    }

    fn student_classes(
        &self,
        student: &dyn Student,
        prompts: &DatasetPrompts,
    ) -> anyhow::Result<Tensor> {
        student_class_embeddings(student, self.tokenizer, prompts, self.context, self.device)
    }

    fn student_top1(
        &self,
        student: &dyn Student,
        set: &EvalSet,
        prompts: &DatasetPrompts,
    ) -> anyhow::Result<f64> {
        let classes = self.student_classes(student, prompts)?;
        Ok(zero_shot(student, &set.images, &classes, self.device)?.top1())
    }

    /// Top-1 of the teacher, then of each student, on `set` with label set `prompts`.
    fn top1(&self, set: &EvalSet, prompts: &DatasetPrompts) -> anyhow::Result<Vec<f64>> {
        let teacher = self.teacher_classes(prompts)?;
        let mut out = vec![teacher_zero_shot(&set.images, &teacher, self.device)?.top1()];
        for t in self.students {
            out.push(self.student_top1(t.student.as_ref(), set, prompts)?);
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

/// Tables 3 and 4: fine-tuning variants of the pre-trained students on a labelled cache, each
/// scored on every evaluation dataset.
struct Ablations<'a> {
    cfg: &'a RealDataConfig,
    scorer: &'a Scorer<'a>,
    evals: &'a [EvalSet],
    data: EvalSet,
    out: &'a Path,
    progress: bool,
    /// SpikeCLIP's scores after fine-tuning with each lambda (by its text form).
    by_lambda: BTreeMap<String, Vec<f64>>,
}

impl Ablations<'_> {
    fn columns(&self) -> Vec<String> {
        self.evals
            .iter()
            .map(|e| match e.name == self.data.name {
                true => format!("{}{FINE_TUNED}", e.name),
                false => e.name.clone(),
            })
            .collect()
    }

    fn table(&self, id: &str, title: &str) -> Table {
        let columns = self.columns();
        let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
        Table::new(id, title, &columns)
    }

    /// `t`'s student on every evaluation dataset with its own labels.
    fn scores(&self, t: &Trained) -> anyhow::Result<Vec<Cell>> {
        self.evals
            .iter()
            .map(|e| {
                let acc = self
                    .scorer
                    .student_top1(t.student.as_ref(), e, &e.prompts)?;
                Ok(Cell::one(acc))
            })
            .collect()
    }

    /// Fine-tunes `t` from its pre-trained weights (the image encoder from its initialisation
    /// when `from_init`) with KL weight `lambda`, checkpoints in `out/DIR`, and scores it.
    fn finetuned(
        &self,
        t: &Trained,
        lambda: f64,
        from_init: bool,
        dir: &str,
    ) -> anyhow::Result<Vec<Cell>> {
        let student = t.student.as_ref();
        t.pretrained.restore(student, "")?;
        if from_init {
            t.init.restore(student, "image.")?;
        }
        let prompts = &self.data.prompts;
        let targets = FinetuneTargets {
            student_classes: self.scorer.student_classes(student, prompts)?,
            teacher_classes: self.scorer.teacher_classes(prompts)?,
            teacher_logit_scale: TEACHER_LOGIT_SCALE,
        };
        let loss = DualLossConfig {
            lambda,
            ..self.cfg.dual_loss.clone()
        };
        let dir = self.out.join(dir);
        let stage = ("finetune", &self.cfg.finetune_stage);
        let run = stage_run(self.cfg, student, stage, &dir, self.progress);
        finetune(
            student,
            &self.data.images,
            &targets,
            &loss,
            run,
            self.scorer.device,
            None,
        )
        .with_context(|| format!("{}: fine-tuning (lambda {lambda})", t.name))?;
        self.scores(t)
    }

    fn spiking(&self) -> &Trained {
        &self.scorer.students[0]
    }

    fn with_lambda(&mut self, lambda: f64) -> anyhow::Result<Vec<Cell>> {
        let key = format!("{lambda}");
        if !self.by_lambda.contains_key(&key) {
            let dir = format!("spikeclip_finetune_lambda_{key}");
            let cells = self.finetuned(self.spiking(), lambda, false, &dir)?;
            self.by_lambda
                .insert(key.clone(), cells.iter().map(|c| c.mean).collect());
        }
        Ok(self.by_lambda[&key]
            .iter()
            .map(|&m| Cell::one(m / 100.0))
            .collect())
    }

    fn table3(&mut self) -> anyhow::Result<Table> {
        let mut table = self.table(
            "table3",
            &format!(
                "Table 3: ablation of the training stages and the KL term (fine-tuned on {})",
                self.data.name
            ),
        );
        let lambda = self.cfg.dual_loss.lambda;
        table.push("SpikeCLIP (full recipe)", self.with_lambda(lambda)?);
        let no_pretrain = self.finetuned(self.spiking(), lambda, true, "spikeclip_no_pretrain")?;
        table.push("w/o pre-training", no_pretrain);
        self.spiking()
            .pretrained
            .restore(self.spiking().student.as_ref(), "")?;
        table.push("w/o fine-tuning", self.scores(self.spiking())?);
        table.push("w/o KL (lambda = 0)", self.with_lambda(0.0)?);
        let ann = &self.scorer.students[1];
        table.push(
            "ScratchCLIP (ANN twin)",
            self.finetuned(ann, lambda, false, "scratchclip_finetune")?,
        );
        table.notes.push(
            "w/o pre-training: the image encoder starts from its initialisation (the text \
             encoder keeps its distillation, which the labels need)."
                .into(),
        );
        Ok(table)
    }

    fn table4(&mut self) -> anyhow::Result<Table> {
        let mut table = self.table(
            "table4",
            &format!(
                "Table 4: KL weight lambda (fine-tuned on {})",
                self.data.name
            ),
        );
        for lambda in self.cfg.lambdas.clone() {
            let cells = self.with_lambda(lambda)?;
            table.push(&format!("lambda = {lambda}"), cells);
        }
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
