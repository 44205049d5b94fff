//! `spikeclip demo`: the whole recipe on the built-in world, for SpikeCLIP and its ANN twin,
//! with zero-shot accuracy on seen and unseen colour-shape pairs after every stage, the energy
//! estimate, and a report a reader can check.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use candle_core::Device;

use crate::ops::{device, Ops};
use serde::{Deserialize, Serialize};

use super::energy::{measure_energy, prompt_token_ids};
use super::stages::{teacher_zero_shot, zero_shot};
use super::student::Student;
use super::world_recipe::{Arch, WorldRecipe};
use crate::data::world::{Split, World, WorldConfig, DATASET};
use crate::data::ImageFeatureSet;
use crate::energy::{EnergyConstants, EnergyReport};
use crate::eval::zeroshot::{class_embeddings, TopK};
use crate::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use crate::model::config::SpikeClipConfig;
use crate::plot::{panel_plot, Labels, Panel, Series};
use crate::teacher::{TextTeacher, Tokenize};
use crate::train::loss::DualLossConfig;
use crate::train::stage::{EpochRecord, StageConfig};

/// Sizes and schedules of a demo run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoConfig {
    /// Both students' architecture (the text vocabulary is the world's).
    pub model: SpikeClipConfig,
    pub world: WorldConfig,
    pub pretrain: StageConfig,
    pub finetune: StageConfig,
    pub dual_loss: DualLossConfig,
    /// CLIP's logit scale for the teacher's class distribution in the KL term.
    pub teacher_logit_scale: f64,
    /// Write each student's health log (`NAME/health.jsonl`, [`super::health`]).
    #[serde(default)]
    pub health: bool,
}

impl DemoConfig {
    /// The default demo: a few minutes on 2 cores.
    pub fn standard(seed: u64) -> Self {
        Self::sized(seed, (1600, 400, 4000), (5, 2))
    }

    /// A smoke run of under a minute, for tests: too short to learn the unseen pairs (both
    /// students need about four times its epochs to pass twice chance on them).
    pub fn quick(seed: u64) -> Self {
        Self::sized(seed, (512, 128, 768), (4, 2))
    }

    /// This configuration with `KEY=VALUE` overrides of its JSON form (`pretrain.epochs=10`,
    /// `finetune.amsgrad=true`, `model.image.embed_dim=64`, `world.train_images=800`).
    pub fn with_overrides(&self, sets: &[String]) -> anyhow::Result<Self> {
        crate::model::config::with_overrides(self, sets)
    }

    fn sized(seed: u64, sets: (usize, usize, usize), epochs: (usize, usize)) -> Self {
        let pretrain = StageConfig {
            epochs: epochs.0,
            // Smaller than the paper's 196: the world's sets are small, and held-out pairs
            // are recognised only after many steps.
            batch_size: 32,
            lr: 5e-3,
            eta_min: 5e-4,
            t_max: None,
            weight_decay: 0.0,
            amsgrad: false,
            seed,
        };
        let world = WorldConfig {
            seed,
            train_images: sets.0,
            test_images: sets.1,
            dtext_sentences: sets.2,
            ..WorldConfig::default()
        };
        let mut model = SpikeClipConfig::preset("tiny").expect("the tiny preset exists");
        // Narrower than `tiny` so both students train in minutes on 2 cores.
        model.image.embed_dim = 32;
        model.image.num_heads = 2;
        model.text.vocab_size = World::new(world.clone()).tokenizer().vocab_size();
        model.text.context_length = world.max_len;
        model.text.max_positions = world.max_len;
        model.out_dim = world.embed_dim;
        Self {
            model,
            world,
            finetune: StageConfig {
                epochs: epochs.1,
                lr: 5e-4,
                eta_min: 5e-5,
                ..pretrain.clone()
            },
            pretrain,
            dual_loss: DualLossConfig::default(),
            teacher_logit_scale: 100.0,
            health: false,
        }
    }
}

/// Zero-shot accuracy after one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageScore {
    pub stage: String,
    pub seen: TopK,
    pub unseen: TopK,
    pub seen_top1: f64,
    pub unseen_top1: f64,
}

impl StageScore {
    fn new(stage: &str, seen: TopK, unseen: TopK) -> Self {
        Self {
            stage: stage.to_string(),
            seen_top1: seen.top1(),
            unseen_top1: unseen.top1(),
            seen,
            unseen,
        }
    }
}

/// One model's run through the recipe.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub stages: Vec<StageScore>,
    /// Final zero-shot top-1 on seen and unseen pairs.
    pub seen_top1: f64,
    pub unseen_top1: f64,
    pub curves: Vec<EpochRecord>,
}

/// What `report.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub chance: f64,
    pub teacher: StageScore,
    pub spikeclip: ModelReport,
    pub scratchclip: ModelReport,
    /// Energy of SpikeCLIP's encoders against the ANN twin's, per sample.
    pub energy: Option<EnergyReport>,
    pub config: DemoConfig,
    /// Where the students trained and were scored (`cpu`, `cuda:0`), and how their ops ran.
    pub device: String,
    pub ops: &'static str,
}

/// Runs the recipe for SpikeCLIP and its ANN twin, then writes `report.md`, `report.json`,
/// `curves.png`, the energy files (`energy/`) and each model's checkpoint
/// (`spikeclip/model.safetensors` + `model.json`, likewise `scratchclip/`) to `out`.
pub fn run_demo(
    cfg: &DemoConfig,
    out: &Path,
    show_progress: bool,
    dev: &Device,
) -> anyhow::Result<DemoReport> {
    let recipe = WorldRecipe::new(cfg.clone(), out, show_progress, dev);
    let world = &recipe.world;
    let prompts = &World::prompts().datasets[DATASET];
    let teacher_classes = class_embeddings(prompts, |t| world.teacher().text_features(t))?;
    let teacher = StageScore::new(
        "teacher",
        teacher_zero_shot(&world.images(Split::TestSeen), &teacher_classes, dev)?,
        teacher_zero_shot(&world.images(Split::TestUnseen), &teacher_classes, dev)?,
    );
    let (spiking, spikeclip) = train_and_save(&recipe, Arch::spiking(&cfg.model), "spikeclip")?;
    let (_, scratchclip) = train_and_save(&recipe, Arch::Ann, "scratchclip")?;
    let energy = world_energy(spiking.as_ref(), world, &out.join("energy"), dev)?;
    let report = DemoReport {
        chance: 1.0 / World::class_names().len() as f64,
        teacher,
        spikeclip,
        scratchclip,
        energy,
        config: cfg.clone(),
        device: device::name(dev),
        ops: Ops::for_device(dev).name(),
    };
    write_files(&report, out)?;
    Ok(report)
}

/// Trains a fresh student through the three stages, scoring seen and unseen pairs after each,
/// and saves it as a checkpoint in `out/NAME` (the demo's `spikeclip/` and `scratchclip/`).
pub fn train_and_save(
    recipe: &WorldRecipe,
    arch: Arch,
    name: &str,
) -> anyhow::Result<(Box<dyn Student>, ModelReport)> {
    let student = recipe.build(arch)?;
    let report =
        train_stages(recipe, student.as_ref(), name).with_context(|| format!("training {name}"))?;
    let kind = match arch {
        Arch::Spiking { .. } => ModelKind::SpikeClip,
        Arch::Ann => ModelKind::ScratchClip,
    };
    let card = ModelCard {
        kind,
        config: recipe.config(arch),
        tokenizer: TokenizerSpec::World,
    };
    checkpoint::save(&recipe.out.join(name), student.as_ref(), &card)?;
    Ok((student, report))
}

fn train_stages(
    recipe: &WorldRecipe,
    student: &dyn Student,
    name: &str,
) -> anyhow::Result<ModelReport> {
    let dev = &recipe.device;
    let world = &recipe.world;
    let prompts = &World::prompts().datasets[DATASET];
    let (seen, unseen) = (
        world.images(Split::TestSeen),
        world.images(Split::TestUnseen),
    );
    let score = |stage: &str| -> anyhow::Result<StageScore> {
        let classes = recipe.class_embeddings(student, prompts)?;
        Ok(StageScore::new(
            stage,
            zero_shot(student, &seen, &classes, dev)?,
            zero_shot(student, &unseen, &classes, dev)?,
        ))
    };
    let mut curves = recipe.distill_text(student, name)?;
    let mut stages = vec![score("distill_text")?];
    curves.extend(recipe.distill_image(student, &world.images(Split::Pretrain), name)?);
    stages.push(score("distill_image")?);
    curves.extend(recipe.finetune(student, recipe.demo.dual_loss.lambda, name)?);
    stages.push(score("finetune")?);
    let last = stages.last().expect("three stages");
    Ok(ModelReport {
        seen_top1: last.seen_top1,
        unseen_top1: last.unseen_top1,
        stages,
        curves,
    })
}

/// Firing rates of the spiking student over the seen test images and the class prompts, and
/// the energy report they give.
fn world_energy(
    student: &dyn Student,
    world: &World,
    dir: &Path,
    dev: &Device,
) -> anyhow::Result<Option<EnergyReport>> {
    let images = world.images(Split::TestSeen);
    let idx: Vec<usize> = (0..images.len().min(256)).collect();
    let batch = images.batch(&idx, dev)?;
    let prompts = &World::prompts().datasets[DATASET];
    let ids = prompt_token_ids(prompts, world.tokenizer(), world.config().max_len, 256, dev)?;
    measure_energy(student, &batch.inputs, &ids, EnergyConstants::fp32(), dir)
}

fn write_files(report: &DemoReport, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(out.join("report.json"), json)
        .with_context(|| format!("writing {}", out.join("report.json").display()))?;
    std::fs::write(out.join("report.md"), markdown(report))
        .with_context(|| format!("writing {}", out.join("report.md").display()))?;
    let stages = ["distill_text", "distill_image", "finetune"];
    let panels: Vec<Panel> = stages
        .iter()
        .map(|&stage| Panel {
            labels: Labels {
                title: stage,
                x: "epoch",
                y: "mean loss",
            },
            series: [
                ("SpikeCLIP", &report.spikeclip),
                ("ScratchCLIP", &report.scratchclip),
            ]
            .into_iter()
            .map(|(model, r)| Series {
                name: model.to_string(),
                points: r
                    .curves
                    .iter()
                    .filter(|e| e.stage == stage)
                    .map(|e| (e.epoch as f64, e.loss))
                    .collect(),
            })
            .collect(),
        })
        .collect();
    // One panel per stage: the fine-tuning loss (~4.6) would squash the distillation losses
    // (0.02-0.6) on a shared axis.
    panel_plot(&out.join("curves.png"), "Training loss per epoch", &panels)?;
    Ok(())
}

/// The demo's summary table and energy totals as Markdown.
pub fn markdown(r: &DemoReport) -> String {
    let mut s = String::new();
    let pct = |x: f64| format!("{:.1}", 100.0 * x);
    let _ = writeln!(s, "# spikeclip demo on the built-in world\n");
    let _ = writeln!(
        s,
        "Zero-shot top-1 (%) over {} classes (chance {}%). Unseen pairs never appear in image \
         training, only in text.\n",
        World::class_names().len(),
        pct(r.chance)
    );
    let _ = writeln!(
        s,
        "Trained and scored on {} with the {} ops.\n",
        r.device, r.ops
    );
    let _ = writeln!(s, "| model | after stage | seen top-1 | unseen top-1 |");
    let _ = writeln!(s, "|---|---|---|---|");
    let _ = writeln!(
        s,
        "| CLIP teacher (analytic) | - | {} | {} |",
        pct(r.teacher.seen_top1),
        pct(r.teacher.unseen_top1)
    );
    for (name, m) in [
        ("SpikeCLIP (SNN)", &r.spikeclip),
        ("ScratchCLIP (ANN)", &r.scratchclip),
    ] {
        for st in &m.stages {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} |",
                st.stage,
                pct(st.seen_top1),
                pct(st.unseen_top1)
            );
        }
    }
    if let Some(e) = &r.energy {
        let _ = writeln!(s, "\n## Energy per sample (45 nm, fp32)\n");
        let _ = writeln!(s, "| encoder | SNN (mJ) | ANN twin (mJ) | reduction |");
        let _ = writeln!(s, "|---|---|---|---|");
        for enc in &e.encoders {
            let _ = writeln!(
                s,
                "| {} | {:.6} | {:.6} | {:.1}% |",
                enc.name,
                enc.snn.totals.energy_mj,
                enc.ann.totals.energy_mj,
                100.0 * enc.reduction_rate
            );
        }
        let _ = writeln!(s, "\nPer-layer rows, firing rates and plots: `energy/`.");
        for note in &e.notes {
            let _ = writeln!(s, "\n- {note}");
        }
    }
    let _ = writeln!(
        s,
        "\nTraining curves: `curves.png`; per-epoch metrics: `*/metrics.jsonl`."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_reach_any_field_and_unknown_keys_are_refused() {
        let sets = [
            "pretrain.epochs=9",
            "finetune.amsgrad=true",
            "world.train_images=77",
        ];
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = DemoConfig::quick(0).with_overrides(&sets).unwrap();
        assert_eq!(cfg.pretrain.epochs, 9);
        assert!(cfg.finetune.amsgrad && !cfg.pretrain.amsgrad);
        assert_eq!(cfg.world.train_images, 77);
        let err = DemoConfig::quick(0)
            .with_overrides(&["pretrain.epoch=3".to_string()])
            .unwrap_err();
        assert!(format!("{err:#}").contains("pretrain.epochs"), "{err:#}");
    }
}
