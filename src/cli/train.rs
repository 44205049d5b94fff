//! `spikeclip train`: one stage of the recipe on the built-in world or a teacher-feature cache,
//! resumable, ending in a checkpoint the other commands read.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::Device;

use super::prompt_args::PromptFileArgs;
use crate::data::cache::Cache;
use crate::data::prefix::{first_images, first_texts, Prefix};
use crate::data::world::{Split, World, WorldConfig};
use crate::data::{ImageFeatureSet, TextFeatureSet};
use crate::dist;
use crate::eval::zeroshot::class_embeddings;
use crate::model::checkpoint::{self, ModelCard, ModelKind, TokenizerSpec};
use crate::model::config::SpikeClipConfig;
use crate::model::text::copy_clip_embeddings;
use crate::recipe::classifier::LoadedStudent;
use crate::recipe::dead_features::Probe;
use crate::recipe::{distill_image, distill_text, finetune, FinetuneTargets};
use crate::teacher::clip::{ClipModel, ClipTeacher};
use crate::teacher::{ModelSpec, TextTeacher, Tokenize};
use crate::train::data_parallel::ensure_same_data;
use crate::train::loss::DualLossConfig;
use crate::train::stage::{AfterEpoch, EpochRecord, StageConfig, StageRun};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stage {
    /// (0) the text encoder from the teacher's text features on D-text.
    DistillText,
    /// (1) the image encoder from the teacher's image features.
    DistillImage,
    /// (2) the image encoder with the dual loss on a labelled set.
    Finetune,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    stage: Stage,
    /// `world` or `cache:DIR` (from `spikeclip cache`: `DIR/texts` for D-text, `DIR/images`).
    #[arg(long, default_value = "world")]
    data: String,
    /// Start from this checkpoint (its card fixes model, config and tokenizer).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Without --init: spikeclip or scratchclip, with a preset.
    #[arg(long, default_value = "spikeclip")]
    model: String,
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Without --init: override a preset setting, e.g. `--set text.kind=transformer` (the
    /// world's vocabulary size still wins on the built-in world).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Without --init, on a cache: the CLIP tokenizer the cache was built with (tokenizer.json,
    /// a CLIP directory or bpe_simple_vocab_16e6.txt.gz).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Without --init: copy CLIP's token and position embeddings (`clip:DIR`) into the fresh
    /// student's text encoder before training, as the paper does; needs `--set text.width=` CLIP's
    /// text hidden size (512 for ViT-B/32, the paper preset's).
    #[arg(long, value_name = "clip:DIR")]
    embeddings_from: Option<String>,
    /// Fine-tuning on a cache: the label prompts and the CLIP teacher (`clip:DIR`).
    #[command(flatten)]
    prompts: PromptFileArgs,
    #[arg(long)]
    teacher: Option<String>,
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Continue from OUT/{stage}_last.safetensors.
    #[arg(long)]
    resume: bool,
    /// Defaults: the paper's (lr 5e-3 annealed to 5e-4 for distillation, 5e-4 for fine-tuning,
    /// batch 196).
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    eta_min: Option<f64>,
    #[arg(long)]
    amsgrad: bool,
    /// Weight of the KL term of the dual loss.
    #[arg(long, default_value_t = 1.0)]
    lambda: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Under MPI: each rank's BatchNorm normalises its own part of the batch, instead of using
    /// the statistics of the whole global batch (the default, as PyTorch's `SyncBatchNorm`).
    #[arg(long)]
    no_sync_bn: bool,
    /// Train on the first N items of the data only (short runs, smoke tests).
    #[arg(long, value_name = "N")]
    items: Option<usize>,
}

fn stage_config(args: &Args) -> StageConfig {
    let base = if args.stage == Stage::Finetune {
        StageConfig::paper_finetune()
    } else {
        StageConfig::paper_pretrain()
    };
    StageConfig {
        epochs: args.epochs.unwrap_or(base.epochs),
        batch_size: args.batch_size.unwrap_or(base.batch_size),
        lr: args.lr.unwrap_or(base.lr),
        eta_min: args.eta_min.unwrap_or(base.eta_min),
        amsgrad: args.amsgrad,
        seed: args.seed,
        ..base
    }
}

/// The student to train: from --init, or fresh from a preset sized for the data's tokenizer.
fn student(
    args: &Args,
    world: Option<&World>,
    teacher_dim: Option<usize>,
    dev: &Device,
) -> anyhow::Result<LoadedStudent> {
    if let Some(init) = &args.init {
        if !args.sets.is_empty() || args.embeddings_from.is_some() {
            bail!(
                "--set and --embeddings-from build a fresh model; with --init the checkpoint's \
                 card fixes the config and the weights"
            );
        }
        return LoadedStudent::open(init, dev);
    }
    let mut config = SpikeClipConfig::preset(&args.preset)?.with_overrides(&args.sets)?;
    if let Some(dim) = teacher_dim {
        config.out_dim = dim;
    }
    let tokenizer = match world {
        Some(w) => {
            config.text.vocab_size = w.tokenizer().vocab_size();
            TokenizerSpec::World
        }
        None => {
            let spec = TokenizerSpec::Clip {
                path: args
                    .tokenizer
                    .clone()
                    .context("training from a cache without --init needs --tokenizer")?,
            };
            config.text.vocab_size = spec.open()?.vocab_size();
            spec
        }
    };
    let kind = match args.model.as_str() {
        "spikeclip" => ModelKind::SpikeClip,
        "scratchclip" => ModelKind::ScratchClip,
        other => bail!("--model {other:?}: expected spikeclip or scratchclip"),
    };
    let dir = args.out.join("init");
    let card = ModelCard {
        kind,
        config,
        tokenizer,
    };
    let fresh = card.build_seeded(args.seed, dev)?;
    if let Some(spec) = &args.embeddings_from {
        let ModelSpec::Clip(clip_dir) = ModelSpec::parse(spec)?;
        let clip = ClipModel::load(&clip_dir, dev)?;
        copy_clip_embeddings(
            fresh.varmap(),
            clip.token_embedding(),
            clip.position_embedding(),
        )
        .with_context(|| format!("copying CLIP's embeddings from {}", clip_dir.display()))?;
    }
    if dist::is_writer() {
        checkpoint::save(&dir, fresh.as_ref(), &card)?;
    }
    dist::collective().barrier();
    LoadedStudent::open(&dir, dev)
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    dist::set_sync_batch_norm(!args.no_sync_bn);
    let world = (args.data == "world").then(|| World::new(WorldConfig::default()));
    let cache_dir = match args.data.strip_prefix("cache:") {
        Some(d) => Some(PathBuf::from(d)),
        None if world.is_some() => None,
        None => bail!("--data {:?}: expected world or cache:DIR", args.data),
    };
    // The student's output space is the teacher's, whose width the cache records (a cache that
    // does not open is reported by the stage that reads it).
    let teacher_dim = match (&cache_dir, args.stage) {
        (Some(d), Stage::DistillText) => Cache::open(&d.join("texts")).ok(),
        (Some(d), _) => Cache::open_images(d).ok(),
        (None, _) => None,
    }
    .and_then(|c| c.teacher_dim());
    let loaded = student(&args, world.as_ref(), teacher_dim, dev)?;
    if let Some(dim) = teacher_dim.filter(|&d| d != loaded.card.config.out_dim) {
        bail!(
            "the cache's teacher features are {dim}-d but the student's out_dim is {}",
            loaded.card.config.out_dim
        );
    }
    let cfg = stage_config(&args);
    let stage_name = match args.stage {
        Stage::DistillText => "distill_text",
        Stage::DistillImage => "distill_image",
        Stage::Finetune => "finetune",
    };
    let probe = match (&world, &cache_dir) {
        (Some(w), _) => Probe::from_sets(Some(&w.images(Split::TestSeen)), Some(&w.dtext()), dev)?,
        (None, Some(d)) => {
            let images = Cache::open_images(d).ok();
            let texts = Cache::open(&d.join("texts")).ok();
            Probe::from_sets(
                images.as_ref().map(|c| c as &dyn ImageFeatureSet),
                texts.as_ref().map(|c| c as &dyn TextFeatureSet),
                dev,
            )?
        }
        (None, None) => unreachable!("data is world or a cache"),
    };
    let warn_if_dead = |record: &EpochRecord| -> anyhow::Result<()> {
        for w in probe.silent_encoders(loaded.student.as_ref())? {
            tracing::warn!("{stage_name} epoch {}: {w}", record.epoch);
        }
        Ok(())
    };
    let run = StageRun {
        name: stage_name,
        out_dir: &args.out,
        varmap: loaded.student.varmap(),
        config: &cfg,
        resume: args.resume,
        show_progress: true,
        observer: Some(Box::new(AfterEpoch(warn_if_dead))),
    };
    let s = loaded.student.as_ref();
    let items = args.items;
    let outcome = match (args.stage, &world, &cache_dir) {
        (Stage::DistillText, Some(w), _) => {
            distill_text(s, &training_texts(&w.dtext(), items, dev)?, run, dev, None)?
        }
        (Stage::DistillText, None, Some(d)) => {
            let set = Cache::open(&d.join("texts"))?;
            distill_text(s, &training_texts(&set, items, dev)?, run, dev, None)?
        }
        (Stage::DistillImage, Some(w), _) => distill_image(
            s,
            &training_images(&w.images(Split::Pretrain), items, dev)?,
            run,
            dev,
            None,
        )?,
        (Stage::DistillImage, None, Some(d)) => distill_image(
            s,
            &training_images(&Cache::open_images(d)?, items, dev)?,
            run,
            dev,
            None,
        )?,
        (Stage::Finetune, Some(w), _) => {
            let prompts = &World::split_prompts(Split::Train);
            let targets = FinetuneTargets {
                student_classes: loaded.class_embeddings(prompts, dev)?,
                teacher_classes: class_embeddings(prompts, |t| w.teacher().text_features(t))?,
                teacher_logit_scale: 100.0,
            };
            let loss = DualLossConfig {
                lambda: args.lambda,
                ..DualLossConfig::default()
            };
            let set = w.images(Split::Train);
            finetune(
                s,
                &training_images(&set, items, dev)?,
                &targets,
                &loss,
                run,
                dev,
                None,
            )?
        }
        (Stage::Finetune, None, Some(d)) => {
            let Some(teacher) = &args.teacher else {
                bail!("fine-tuning on a cache needs --prompts FILE --prompt-set NAME --teacher clip:DIR");
            };
            let set = Cache::open_images(d)?;
            let images = training_images(&set, items, dev)?;
            let prompts = args.prompts.for_images(&set, "fine-tuning")?;
            let ModelSpec::Clip(tdir) = ModelSpec::parse(teacher)?;
            let clip = ClipTeacher::load(&tdir, dev)?;
            let targets = FinetuneTargets {
                student_classes: loaded.class_embeddings(&prompts, dev)?,
                teacher_classes: class_embeddings(&prompts, |t| clip.text_features(t))?,
                teacher_logit_scale: 100.0,
            };
            let loss = DualLossConfig {
                lambda: args.lambda,
                ..DualLossConfig::default()
            };
            finetune(s, &images, &targets, &loss, run, dev, None)?
        }
        _ => unreachable!("data is world or a cache"),
    };
    if !dist::is_writer() {
        return Ok(());
    }
    let path = checkpoint::save(&args.out, s, &loaded.card)?;
    if let Some(last) = outcome.epochs.last() {
        println!("{stage_name}: epoch {} loss {:.4}", last.epoch, last.loss);
    }
    println!("wrote {}", path.display());
    Ok(())
}

/// The texts to train on (`--items`), after checking under MPI that every rank reads the same
/// ones (a sample of them).
fn training_texts<'a>(
    set: &'a (dyn TextFeatureSet + 'a),
    limit: Option<usize>,
    dev: &Device,
) -> anyhow::Result<Prefix<'a, dyn TextFeatureSet + 'a>> {
    let set = first_texts(set, limit);
    if dist::is_distributed() {
        let b = set.batch(&sample(set.len()), dev)?;
        ensure_same_data("the training texts", &[&b.token_ids, &b.teacher])?;
    }
    Ok(set)
}

/// The images to train on (`--items`), after checking under MPI that every rank reads the same
/// ones (a sample of them).
fn training_images<'a>(
    set: &'a (dyn ImageFeatureSet + 'a),
    limit: Option<usize>,
    dev: &Device,
) -> anyhow::Result<Prefix<'a, dyn ImageFeatureSet + 'a>> {
    let set = first_images(set, limit);
    if dist::is_distributed() {
        let b = set.batch(&sample(set.len()), dev)?;
        ensure_same_data("the training images", &[&b.inputs, &b.teacher])?;
    }
    Ok(set)
}

/// The first, middle and last items of a set of `len`.
fn sample(len: usize) -> Vec<usize> {
    let mut items = vec![0, len / 2, len.saturating_sub(1)];
    items.dedup();
    items
}
