//! `spikeclip eval`: zero-shot top-1/top-5 of a checkpoint with prompt ensembling, with the
//! teacher's own accuracy beside it.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};

use crate::ops::device;
use serde_json::json;

use super::prompt_args::PromptFileArgs;
use crate::data::cache::Cache;
use crate::data::prompts::DatasetPrompts;
use crate::data::world::{Split, World, WorldConfig};
use crate::data::ImageFeatureSet;
use crate::eval::zeroshot::{class_embeddings, TopK};
use crate::progress::Progress;
use crate::recipe::classifier::LoadedStudent;
use crate::recipe::dead_features::{warn_each, PROBE_SIZE};
use crate::recipe::stages::zero_shot_with_progress;
use crate::recipe::{teacher_zero_shot, Student};
use crate::teacher::clip::ClipTeacher;
use crate::teacher::{ModelSpec, TextTeacher};

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (model.safetensors + model.json).
    #[arg(long)]
    checkpoint: PathBuf,
    /// `world` (the built-in world's seen and unseen test splits) or `cache:DIR` (a
    /// teacher-feature cache written by `spikeclip cache`).
    #[arg(long, default_value = "world")]
    data: String,
    /// Seed of the built-in world.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompts file and dataset name (required for a cache).
    #[command(flatten)]
    prompts: PromptFileArgs,
    /// The teacher, for its own zero-shot accuracy beside the student's (`clip:DIR`; the
    /// world's analytic teacher needs none).
    #[arg(long)]
    teacher: Option<String>,
    /// Run a spiking image encoder on the dense path instead of the spike-driven one
    /// (bit-packed spikes, accumulate-only layers), which gives the same predictions faster.
    #[arg(long)]
    dense: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Warns, before any score is printed, when the student's features do not depend on the
/// input: such a student scores what argmax's class 0 gets.
fn warn_if_dead(
    loaded: &LoadedStudent,
    student: &dyn Student,
    set: &dyn ImageFeatureSet,
    prompts: &DatasetPrompts,
    classes: &Tensor,
    dev: &Device,
) -> anyhow::Result<()> {
    let first: Vec<usize> = (0..set.len().min(PROBE_SIZE)).collect();
    let images = set.batch(&first, dev)?.inputs;
    warn_each(&loaded.feature_warnings(student, &images, prompts, classes, dev)?);
    Ok(())
}

/// The student's zero-shot scores on `set`, with progress shown.
fn student_zero_shot(
    student: &dyn Student,
    set: &dyn ImageFeatureSet,
    classes: &Tensor,
    name: &str,
    dev: &Device,
) -> anyhow::Result<TopK> {
    let mut progress = Progress::new(format!("eval {name}"), set.len(), true);
    let acc = zero_shot_with_progress(student, set, classes, dev, &mut progress)?;
    progress.finish();
    Ok(acc)
}

/// The row of a result, printed by rank 0 (under MPI every rank holds the same sums), with the
/// device that computed it.
fn row(name: &str, acc: &TopK, dev: &Device) -> serde_json::Value {
    if crate::dist::is_writer() {
        println!(
            "{name:<28} top-1 {:6.2}%  top-5 {:6.2}%  ({} images)",
            100.0 * acc.top1(),
            100.0 * acc.top5(),
            acc.total
        );
    }
    json!({
        "set": name, "top1": acc.top1(), "top5": acc.top5(), "images": acc.total,
        "device": device::name(dev),
    })
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let loaded = LoadedStudent::open(&args.checkpoint, dev)?;
    let inference = loaded.for_inference(args.dense)?;
    let student = inference.student();
    if crate::dist::is_writer() {
        println!(
            "image encoder: {} path, on {}",
            inference.image_path(),
            device::name(dev)
        );
    }
    let mut rows = Vec::new();
    if args.data == "world" {
        let world = World::new(WorldConfig {
            seed: args.seed,
            ..WorldConfig::default()
        });
        let prompts = &World::prompts().datasets[crate::data::world::DATASET];
        let classes = loaded.class_embeddings(prompts, dev)?;
        warn_if_dead(
            &loaded,
            student,
            &world.images(Split::TestSeen),
            prompts,
            &classes,
            dev,
        )?;
        let teacher = class_embeddings(prompts, |t| world.teacher().text_features(t))?;
        for (name, split) in [("seen", Split::TestSeen), ("unseen", Split::TestUnseen)] {
            let set = world.images(split);
            rows.push(row(
                &format!("student {name}"),
                &student_zero_shot(student, &set, &classes, name, dev)?,
                dev,
            ));
            rows.push(row(
                &format!("teacher {name}"),
                &teacher_zero_shot(&set, &teacher, dev)?,
                dev,
            ));
        }
    } else if let Some(dir) = args.data.strip_prefix("cache:") {
        let set = Cache::open_images(&PathBuf::from(dir))?;
        let prompts = args.prompts.for_images(&set, "evaluating")?;
        let classes = loaded.class_embeddings(&prompts, dev)?;
        warn_if_dead(&loaded, student, &set, &prompts, &classes, dev)?;
        let acc = student_zero_shot(student, &set, &classes, "images", dev)?;
        rows.push(row("student", &acc, dev));
        if let Some(spec) = &args.teacher {
            let ModelSpec::Clip(tdir) = ModelSpec::parse(spec)?;
            let clip = ClipTeacher::load(&tdir, dev)?;
            let teacher = class_embeddings(&prompts, |t| clip.text_features(t))?;
            rows.push(row(
                "teacher",
                &teacher_zero_shot(&set, &teacher, dev)?,
                dev,
            ));
        }
    } else {
        bail!("--data {:?}: expected world or cache:DIR", args.data);
    }
    if let Some(path) = args.json.filter(|_| crate::dist::is_writer()) {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
