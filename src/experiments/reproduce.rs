//! `spikeclip reproduce`: the paper's experiments on the built-in world. Each model is
//! pre-trained once; fine-tuning variants (the lambda sweep, without KL, without pre-training)
//! branch from copies of its weights, and every label-set evaluation reuses one pass of image
//! features per model.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use serde::Serialize;

use super::lab::{Arch, Features, Lab, Trained};
use super::report::{Cell, ChosenLabels, Report, Table};
use super::robustness::{teacher_classes, LabelSettings, Robustness};
use super::subsets::Mixture;
use crate::data::world::{Split, World, WorldConfig};
use crate::data::ImageFeatureSet;
use crate::model::config::{ReadoutKind, TextEncoderKind};
use crate::plot::{line_plot, Labels, Series};
use crate::progress::Progress;
use crate::recipe::demo::DemoConfig;

/// The experiments, named as `--only` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Experiment {
    Table2,
    Table3,
    Table4,
    Table5,
    Table6,
    Table8,
    Figure6,
}

impl Experiment {
    pub const ALL: [Experiment; 7] = [
        Self::Table2,
        Self::Table3,
        Self::Table4,
        Self::Table5,
        Self::Table6,
        Self::Table8,
        Self::Figure6,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Self::Table2 => "table2",
            Self::Table3 => "table3",
            Self::Table4 => "table4",
            Self::Table5 => "table5",
            Self::Table6 => "table6",
            Self::Table8 => "table8",
            Self::Figure6 => "figure6",
        }
    }

    /// A comma-separated list such as `table2,table6`.
    pub fn parse_list(list: &str) -> anyhow::Result<Vec<Self>> {
        let mut out = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match Self::ALL.iter().find(|e| e.id() == name) {
                Some(e) => out.push(*e),
                None => bail!(
                    "unknown experiment {name:?}; known: {}",
                    Self::ALL.map(Self::id).join(", ")
                ),
            }
        }
        out.sort_unstable();
        out.dedup();
        anyhow::ensure!(!out.is_empty(), "--only names no experiment");
        Ok(out)
    }
}

/// Sizes of a reproduction run.
#[derive(Debug, Clone, Serialize)]
pub struct ReproConfig {
    /// Model, world and schedules, as the demo's.
    pub demo: DemoConfig,
    /// Seeds of the label choices of Table 2 (mean ± std over them).
    pub label_seeds: Vec<u64>,
    pub labels: LabelSettings,
    /// KL weights of Table 4 (0 is also Table 3's "without KL").
    pub lambdas: Vec<f64>,
    /// Fractions of the training images used for image pre-training (Figure 6, left).
    pub pretrain_fractions: Vec<f64>,
    /// Fractions of the pre-training images drawn from the held-out pairs the evaluation uses
    /// (Figure 6, right), same total size.
    pub overlap_fractions: Vec<f64>,
}

impl ReproConfig {
    /// The default run: the demo's sizes and schedules, under which SpikeCLIP recognises
    /// held-out pairs (a smaller pre-training left it at chance on them), with fewer test
    /// images, since the suite trains about six models where the demo trains two.
    pub fn standard(seed: u64) -> Self {
        let mut demo = DemoConfig::standard(seed);
        demo.world.test_images = 200;
        let mut cfg = Self::with(demo, 3);
        cfg.overlap_fractions = vec![0.0, 0.5];
        cfg
    }

    /// A smoke run for tests.
    pub fn quick(seed: u64) -> Self {
        let mut demo = DemoConfig::quick(seed);
        demo.pretrain.epochs = 1;
        demo.world.train_images = 64;
        demo.world.test_images = 32;
        demo.world.dtext_sentences = 128;
        Self::with(demo, 2)
    }

    fn with(demo: DemoConfig, seeds: u64) -> Self {
        Self {
            demo,
            label_seeds: (0..seeds).collect(),
            labels: LabelSettings::paper(),
            lambdas: vec![0.0, 0.5, 1.0, 2.0],
            pretrain_fractions: vec![0.25, 0.5, 1.0],
            overlap_fractions: vec![0.0, 0.25, 0.5],
        }
    }
}

/// Top-1 on seen pairs, unseen pairs and with every label renamed (the fine-tuning data, other
/// data, other labels).
#[derive(Debug, Clone, Copy)]
struct Scores {
    seen: f64,
    unseen: f64,
    renamed: f64,
}

impl Scores {
    fn cells(self) -> Vec<Cell> {
        vec![
            Cell::one(self.seen),
            Cell::one(self.unseen),
            Cell::one(self.renamed),
        ]
    }
}

const SCORE_COLUMNS: [&str; 3] = ["seen pairs", "unseen pairs", "renamed labels"];

/// What the suite holds between experiments: trained models and the label sets.
struct Suite {
    lab: Lab,
    cfg: ReproConfig,
    robustness: Robustness,
    spiking: Trained,
    ann: Option<Trained>,
    /// Scores after fine-tuning SpikeCLIP with each lambda (by its text form).
    by_lambda: BTreeMap<String, Scores>,
}

impl Suite {
    /// Zero-shot scores of the student's current weights.
    fn scores(&self, student: &dyn crate::recipe::Student) -> anyhow::Result<Scores> {
        let feats = self.lab.features(Some(student))?;
        self.scores_of(&feats, |p| self.lab.class_embeddings(student, p))
    }

    fn scores_of(
        &self,
        feats: &Features,
        mut classes: impl FnMut(
            &crate::data::prompts::DatasetPrompts,
        ) -> anyhow::Result<candle_core::Tensor>,
    ) -> anyhow::Result<Scores> {
        let [seen, unseen, _] = feats.top1(&classes(&self.lab.prompts)?)?;
        let renamed = feats.top1(&classes(self.robustness.renamed_all())?)?[2];
        Ok(Scores {
            seen,
            unseen,
            renamed,
        })
    }

    /// SpikeCLIP fine-tuned from its pre-trained weights with KL weight `lambda`.
    fn with_lambda(&mut self, lambda: f64) -> anyhow::Result<Scores> {
        let key = format!("{lambda}");
        if let Some(s) = self.by_lambda.get(&key) {
            return Ok(*s);
        }
        let student = self.spiking.student.as_ref();
        match &self.spiking.finetuned {
            Some(done) if lambda == self.cfg.demo.dual_loss.lambda => done.restore(student, "")?,
            _ => {
                self.spiking.pretrained.restore(student, "")?;
                self.lab
                    .finetune(student, lambda, &format!("spikeclip_lambda_{key}"))?;
            }
        }
        let s = self.scores(student)?;
        self.by_lambda.insert(key, s);
        Ok(s)
    }

    fn table2(&self, chosen: &mut Vec<ChosenLabels>) -> anyhow::Result<Table> {
        let mut models: Vec<(&str, Features, Option<&Trained>)> =
            vec![("CLIP teacher (analytic)", self.lab.features(None)?, None)];
        let mut trained = vec![("SpikeCLIP", &self.spiking)];
        if let Some(ann) = &self.ann {
            trained.push(("ScratchCLIP (ANN twin)", ann));
        }
        for (name, t) in trained {
            if let Some(w) = &t.finetuned {
                w.restore(t.student.as_ref(), "")?;
            }
            models.push((name, self.lab.features(Some(t.student.as_ref()))?, Some(t)));
        }
        let sets = self
            .robustness
            .label_sets(&self.cfg.label_seeds, &self.cfg.labels)?;
        let columns: Vec<&str> = sets.iter().map(|s| s.column.as_str()).collect();
        let mut table = Table::new(
            "table2",
            "Table 2: robustness to enlarged and replaced label sets (test images of all pairs)",
            &columns,
        );
        for (name, feats, t) in &models {
            let mut cells = Vec::new();
            for set in &sets {
                let mut accs = Vec::new();
                for prompts in &set.prompts {
                    let classes = match t {
                        Some(t) => self.lab.class_embeddings(t.student.as_ref(), prompts)?,
                        None => teacher_classes(&self.lab, prompts)?,
                    };
                    accs.push(feats.top1(&classes)?[2]);
                }
                cells.push(Cell::over(&accs));
            }
            table.push(name, cells);
        }
        table.notes.push(format!(
            "Distractors: labels of the world's text-only pool least similar to the originals \
             (teacher text similarity); replacements: each label's nearest unseen pool label. \
             {} label seeds; the models are not retrained per setting.",
            self.cfg.label_seeds.len()
        ));
        chosen.extend(sets.iter().filter_map(|s| s.chosen.clone()));
        Ok(table)
    }

    fn table3(&mut self) -> anyhow::Result<Table> {
        let mut table = Table::new(
            "table3",
            "Table 3: ablation of the training stages and the KL term (SpikeCLIP)",
            &SCORE_COLUMNS,
        );
        let full = self.with_lambda(self.cfg.demo.dual_loss.lambda)?;
        table.push("SpikeCLIP (full recipe)", full.cells());
        let student = self.spiking.student.as_ref();
        self.spiking.init.restore(student, "image.")?;
        self.spiking.pretrained.restore(student, "text.")?;
        self.lab.finetune(
            student,
            self.cfg.demo.dual_loss.lambda,
            "spikeclip_no_pretrain",
        )?;
        table.push("w/o pre-training", self.scores(student)?.cells());
        self.spiking.pretrained.restore(student, "")?;
        table.push("w/o fine-tuning", self.scores(student)?.cells());
        table.push("w/o KL (lambda = 0)", self.with_lambda(0.0)?.cells());
        if let Some(ann) = &self.ann {
            if let Some(w) = &ann.finetuned {
                w.restore(ann.student.as_ref(), "")?;
            }
            table.push(
                "ScratchCLIP (ANN twin)",
                self.scores(ann.student.as_ref())?.cells(),
            );
        }
        table.notes.push(
            "w/o pre-training: the image encoder starts from its initialisation (the text \
             encoder keeps its distillation, which the labels need). Renamed labels: every \
             label replaced by its nearest unseen synonym."
                .into(),
        );
        Ok(table)
    }

    fn table4(&mut self) -> anyhow::Result<Table> {
        let mut table = Table::new(
            "table4",
            "Table 4: KL weight lambda (fine-tuned on seen pairs; other data: unseen pairs)",
            &SCORE_COLUMNS,
        );
        for lambda in self.cfg.lambdas.clone() {
            let s = self.with_lambda(lambda)?;
            table.push(&format!("lambda = {lambda}"), s.cells());
        }
        Ok(table)
    }

    /// SpikeCLIP's full recipe as the first row, then each architecture variant trained through
    /// the full recipe (checkpoints in `out/DIR`), scored the same way. `same_image`: the
    /// variants differ only in the text tower and take SpikeCLIP's pre-trained image encoder.
    fn variants(
        &mut self,
        (id, title): (&str, &str),
        base: &str,
        variants: &[(&str, Arch, &str)],
        same_image: bool,
    ) -> anyhow::Result<Table> {
        let mut table = Table::new(id, title, &SCORE_COLUMNS);
        let full = self.with_lambda(self.cfg.demo.dual_loss.lambda)?;
        table.push(base, full.cells());
        for &(name, arch, dir) in variants {
            let image = same_image.then_some(&self.spiking.pretrained);
            let t = self.lab.recipe(arch, dir, true, image)?;
            table.push(name, self.scores(t.student.as_ref())?.cells());
        }
        Ok(table)
    }

    fn table5(&mut self) -> anyhow::Result<Table> {
        let model = &self.cfg.demo.model;
        let transformer = Arch::Spiking {
            readout: model.readout,
            text: TextEncoderKind::Transformer,
        };
        let c = &model.text;
        let note = format!(
            "Text encoder parameters: MLP {}, spiking transformer {} ({} block(s), {} heads, \
             width {}); the image encoder is SpikeCLIP's after image distillation (which never \
             sees the text tower), then fine-tuned against each text encoder.",
            self.lab.config(Arch::spiking(model)).text_param_count(),
            self.lab.config(transformer).text_param_count(),
            c.depth,
            c.num_heads,
            c.width
        );
        let mut table = self.variants(
            (
                "table5",
                "Table 5: MLP vs spiking-transformer text encoder (full recipe, each its own \
                 training)",
            ),
            "MLP (SpikeCLIP's)",
            &[("spiking transformer", transformer, "text_transformer")],
            true,
        )?;
        table.notes.push(note);
        Ok(table)
    }

    fn table6(&mut self) -> anyhow::Result<Table> {
        let text = self.cfg.demo.model.text.kind;
        let variants = [
            ("Mean", ReadoutKind::Mean, "readout_mean"),
            ("AD", ReadoutKind::Ad, "readout_ad"),
            ("AR", ReadoutKind::Ar, "readout_ar"),
        ]
        .map(|(name, readout, dir)| (name, Arch::Spiking { readout, text }, dir));
        self.variants(
            (
                "table6",
                "Table 6: readout over time steps (full recipe, each its own training)",
            ),
            "TDW",
            &variants,
            false,
        )
    }

    fn table8(&self) -> anyhow::Result<Table> {
        let mut models = vec![("SpikeCLIP", &self.spiking)];
        if let Some(ann) = &self.ann {
            models.push(("ScratchCLIP", ann));
        }
        let mut columns = Vec::new();
        let mut scores = Vec::new();
        for (name, t) in &models {
            t.pretrained.restore(t.student.as_ref(), "")?;
            columns.push(*name);
            scores.push(self.scores(t.student.as_ref())?);
        }
        let mut table = Table::new(
            "table8",
            "Table 8: zero-shot after pre-training only, per dataset",
            &columns,
        );
        let row = |get: fn(&Scores) -> f64| scores.iter().map(|s| Cell::one(get(s))).collect();
        table.push("world: seen pairs", row(|s| s.seen));
        table.push("world: unseen pairs", row(|s| s.unseen));
        table.push("world: renamed labels", row(|s| s.renamed));
        Ok(table)
    }

    fn figure6(&self) -> anyhow::Result<Table> {
        let mut table = Table::new(
            "figure6",
            "Figure 6: image pre-training set size and overlap with the evaluation pairs \
             (after pre-training only)",
            &SCORE_COLUMNS,
        );
        let t = &self.spiking;
        let student = t.student.as_ref();
        let train = self.lab.world.images(Split::Pretrain);
        let n = train.len();
        let test = self.lab.world.config().test_images;
        // Same seed, longer unseen split: images test.. are never evaluated.
        let extended = World::new(WorldConfig {
            test_images: test + n,
            ..self.lab.world.config().clone()
        });
        let unseen = extended.images(Split::TestUnseen);
        let mut plots = Vec::new();
        for (label, fractions, overlap) in [
            ("size", &self.cfg.pretrain_fractions, false),
            ("overlap", &self.cfg.overlap_fractions, true),
        ] {
            let mut seen = Vec::new();
            let mut unseen_pts = Vec::new();
            for &f in fractions {
                anyhow::ensure!((0.0..=1.0).contains(&f), "fraction {f} outside [0, 1]");
                let k = (f * n as f64).round() as usize;
                let parts: Vec<(&dyn ImageFeatureSet, std::ops::Range<usize>)> = if overlap {
                    vec![(&train, 0..n - k), (&unseen, test..test + k)]
                } else {
                    vec![(&train, 0..k.max(1))]
                };
                let whole = (overlap && k == 0) || (!overlap && k == n);
                if whole {
                    t.pretrained.restore(student, "")?;
                } else {
                    t.init.restore(student, "image.")?;
                    t.pretrained.restore(student, "text.")?;
                    let set = Mixture::new(parts)?;
                    self.lab
                        .distill_image(student, &set, &format!("figure6_{label}_{f}"))?;
                }
                let s = self.scores(student)?;
                table.push(&format!("{label} {:.0}%", 100.0 * f), s.cells());
                seen.push((100.0 * f, 100.0 * s.seen));
                unseen_pts.push((100.0 * f, 100.0 * s.unseen));
            }
            plots.push((label, seen, unseen_pts));
        }
        for (label, seen, unseen) in plots {
            let x = if label == "size" {
                "pre-training images (% of the training split)"
            } else {
                "pre-training images from the evaluated unseen pairs (%)"
            };
            line_plot(
                &self.lab.out.join(format!("figure6_{label}.png")),
                Labels {
                    title: "Figure 6: zero-shot top-1 after pre-training",
                    x,
                    y: "top-1 (%)",
                },
                &[
                    Series {
                        name: "seen pairs".into(),
                        points: seen,
                    },
                    Series {
                        name: "unseen pairs".into(),
                        points: unseen,
                    },
                ],
            )?;
        }
        table.notes.push(
            "size: the first x% of the training split; overlap: x% of the same number of images \
             drawn from the held-out pairs (other images than the evaluated ones). Text encoder \
             shared; plots figure6_size.png, figure6_overlap.png."
                .into(),
        );
        Ok(table)
    }
}

/// Runs the chosen experiments and writes `report.md`, `report.json` and the plots to `out`.
pub fn run_reproduce(
    cfg: &ReproConfig,
    only: &[Experiment],
    out: &Path,
    progress: bool,
    device: &Device,
) -> anyhow::Result<Report> {
    let start = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let lab = Lab::new(cfg.demo.clone(), out, progress, device)?;
    let wants = |e: Experiment| only.contains(&e);
    let fine_tune = [
        Experiment::Table2,
        Experiment::Table3,
        Experiment::Table4,
        Experiment::Table5,
        Experiment::Table6,
    ]
    .into_iter()
    .any(wants);
    let spiking = lab.recipe(Arch::spiking(&cfg.demo.model), "spikeclip", fine_tune, None)?;
    let ann = if [Experiment::Table2, Experiment::Table3, Experiment::Table8]
        .into_iter()
        .any(wants)
    {
        Some(lab.recipe(Arch::Ann, "scratchclip", fine_tune, None)?)
    } else {
        None
    };
    let robustness = Robustness::world(&lab)?;
    let mut suite = Suite {
        lab,
        cfg: cfg.clone(),
        robustness,
        spiking,
        ann,
        by_lambda: BTreeMap::new(),
    };
    let mut tables = Vec::new();
    let mut chosen = Vec::new();
    let mut steps = Progress::steps("reproduce", only.len(), progress);
    for &e in only {
        let table = match e {
            Experiment::Table2 => suite.table2(&mut chosen)?,
            Experiment::Table3 => suite.table3()?,
            Experiment::Table4 => suite.table4()?,
            Experiment::Table5 => suite.table5()?,
            Experiment::Table6 => suite.table6()?,
            Experiment::Table8 => suite.table8()?,
            Experiment::Figure6 => suite.figure6()?,
        };
        tables.push(table);
        steps.set_message(format!("{} done", e.id()));
        steps.inc(1);
    }
    steps.finish();
    let report = Report {
        data: "the built-in world (6 colours x 4 shapes, analytic teacher)".into(),
        claims: super::claims::judge(&tables),
        tables,
        chosen_labels: chosen,
        omitted: Vec::new(),
        seconds: start.elapsed().as_secs_f64(),
        config: serde_json::to_value(cfg)?,
    };
    write_report(&report, out)?;
    Ok(report)
}

/// Writes `report.json` and `report.md` to `out`.
pub fn write_report(report: &Report, out: &Path) -> anyhow::Result<()> {
    let json = out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("report.md");
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))
}
