//! `spikeclip cache`: runs the teacher once over a dataset and/or D-text and stores its
//! features with the student's inputs, so training never runs the teacher again. Under
//! `mpirun` every rank runs the teacher on its own shards of the one cache.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::Device;

use crate::data::cache::{cache_images, cache_texts, CacheOptions};
use crate::data::prompts::PromptSet;
use crate::data::sources::DatasetSpec;
use crate::teacher::clip::ClipTeacher;
use crate::teacher::preprocess::Preprocessor;
use crate::teacher::ModelSpec;

#[derive(clap::Args)]
pub struct Args {
    /// The teacher, `clip:DIR`.
    #[arg(long)]
    teacher: String,
    /// Images to cache: `KIND:DIR[:SPLIT]`, KIND cifar10|cifar100|stl10|folder, SPLIT
    /// train|test (default test); folders split by seed: `folder:DIR:SPLIT:TEST_FRACTION:SEED`.
    #[arg(long)]
    dataset: Option<String>,
    /// A prompt file; its D-text (class names x templates, deduplicated) is cached too.
    #[arg(long)]
    dtext: Option<PathBuf>,
    /// Only these datasets of the prompt file (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    dtext_datasets: Vec<String>,
    /// Token ids stored for the student's text encoder.
    #[arg(long, default_value_t = 20)]
    text_len: usize,
    /// Output directory: `images/` and `texts/` caches inside.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 4096)]
    shard_rows: usize,
    /// Items per teacher call.
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

pub fn run(args: Args, dev: &Device) -> Result<()> {
    ensure!(
        args.dataset.is_some() || args.dtext.is_some(),
        "nothing to cache: give --dataset and/or --dtext"
    );
    let ModelSpec::Clip(dir) = ModelSpec::parse(&args.teacher)?;
    let teacher = ClipTeacher::load(&dir, dev)?;
    let opts = CacheOptions {
        shard_rows: args.shard_rows,
        batch: args.batch,
        progress: true,
    };
    if let Some(spec) = &args.dataset {
        let source = DatasetSpec::parse(spec)?.open()?;
        let size = teacher.model.config.vision_config.image_size as u32;
        let pre = Preprocessor::from_dir_or_square(&dir, size)?;
        let job = serde_json::json!({ "dataset": spec, "teacher": args.teacher });
        let (rows, skipped) = cache_images(
            source.as_ref(),
            &teacher,
            &pre,
            job,
            &args.out.join("images"),
            &opts,
        )?;
        if crate::dist::is_writer() {
            println!("cached {rows} images ({skipped} unreadable, skipped)");
        }
    }
    if let Some(path) = &args.dtext {
        let mut prompts = PromptSet::from_file(path)?;
        if !args.dtext_datasets.is_empty() {
            prompts = prompts.select(&args.dtext_datasets)?;
        }
        let texts = prompts.dtext();
        let job = serde_json::json!({
            "dtext": path, "datasets": args.dtext_datasets, "teacher": args.teacher, "text_len": args.text_len,
        });
        let rows = cache_texts(
            &texts,
            &teacher.tokenizer,
            &teacher,
            args.text_len,
            job,
            &args.out.join("texts"),
            &opts,
        )?;
        if crate::dist::is_writer() {
            println!("cached {rows} D-text sentences");
        }
    }
    Ok(())
}
