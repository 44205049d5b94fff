//! `spikeclip reproduce`: the paper's experiments with a report, on the built-in world or, with
//! `--teacher`, on a user's CLIP and cached datasets.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::Device;

use crate::experiments::real_data::{run_real_data, RealDataConfig, SUPPORTED, WITH_FINETUNING};
use crate::experiments::report::Report;
use crate::experiments::reproduce::{run_reproduce, Experiment, ReproConfig};
use crate::experiments::robustness::LabelSettings;
use crate::model::config::SpikeClipConfig;
use crate::teacher::ModelSpec;
use crate::train::loss::DualLossConfig;
use crate::train::stage::StageConfig;

#[derive(clap::Args)]
pub struct Args {
    /// Where report.md, report.json, the plots and the trainings' checkpoints go.
    #[arg(long, default_value = "runs/reproduce")]
    out: PathBuf,
    /// A small, fast run on the built-in world (about a minute), for smoke tests.
    #[arg(long)]
    quick: bool,
    /// A subset of the experiments, comma-separated: table2,table3,table4,table5,table6,table8,figure6
    /// (on real data: table2,table8).
    #[arg(long)]
    only: Option<String>,
    /// Seeds the world, the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Real data: the CLIP teacher (`clip:DIR`, Hugging Face layout; also the tokenizer).
    #[arg(long)]
    teacher: Option<String>,
    /// Real data: the pre-training cache (`cache:DIR` from `spikeclip cache`, with D-text in
    /// DIR/texts and images in DIR/images).
    #[arg(long)]
    data: Option<String>,
    /// Real data: an evaluation dataset, `NAME=cache:DIR`, NAME as in --prompts; repeatable.
    #[arg(long = "eval", value_name = "NAME=cache:DIR")]
    evals: Vec<String>,
    /// Real data: the prompts file (clip_prompts.json format) naming the evaluation datasets;
    /// its other datasets' class names are Table 2's distractors and replacements.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Real data: the students' preset, with `--set KEY=VALUE` overrides.
    #[arg(long, default_value = "paper")]
    preset: String,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Real data: pre-training epochs and batch size (the paper's: 100, 196).
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Real data: a labelled set for the fine-tuning ablations (Tables 3 and 4),
    /// `NAME=cache:DIR`, NAME as in --prompts.
    #[arg(long, value_name = "NAME=cache:DIR")]
    finetune: Option<String>,
    /// Real data: fine-tuning epochs and batch size (the paper's: 100, 196), and Table 4's KL
    /// weights.
    #[arg(long)]
    finetune_epochs: Option<usize>,
    #[arg(long)]
    finetune_batch_size: Option<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,1,2")]
    lambdas: Vec<f64>,
    /// Real data: seeds of Table 2's label choices.
    #[arg(long, default_value_t = 3)]
    label_seeds: u64,
    /// Real data: continue interrupted trainings from their last checkpoints in --out.
    #[arg(long)]
    resume: bool,
}

fn cache_dir(spec: &str, flag: &str) -> anyhow::Result<PathBuf> {
    match spec.strip_prefix("cache:") {
        Some(dir) if !dir.is_empty() => Ok(dir.into()),
        _ => bail!("{flag} {spec:?}: expected cache:DIR"),
    }
}

/// `NAME=cache:DIR`.
fn named_cache(spec: &str, flag: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, cache) = spec
        .split_once('=')
        .with_context(|| format!("{flag} {spec:?}: expected NAME=cache:DIR"))?;
    Ok((name.to_string(), cache_dir(cache, flag)?))
}

fn real_data_config(args: &Args, teacher: &str) -> anyhow::Result<RealDataConfig> {
    let ModelSpec::Clip(teacher) = ModelSpec::parse(teacher)?;
    let data = args
        .data
        .as_deref()
        .context("reproduce on real data needs --data cache:DIR (the pre-training cache)")?;
    let evals = args
        .evals
        .iter()
        .map(|e| named_cache(e, "--eval"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        !evals.is_empty(),
        "reproduce on real data needs at least one --eval NAME=cache:DIR"
    );
    let base = StageConfig::paper_pretrain();
    let fine = StageConfig::paper_finetune();
    Ok(RealDataConfig {
        teacher,
        pretrain: cache_dir(data, "--data")?,
        evals,
        prompts: args
            .prompts
            .clone()
            .context("reproduce on real data needs --prompts FILE")?,
        model: SpikeClipConfig::preset(&args.preset)?.with_overrides(&args.sets)?,
        pretrain_stage: StageConfig {
            epochs: args.epochs.unwrap_or(base.epochs),
            batch_size: args.batch_size.unwrap_or(base.batch_size),
            seed: args.seed,
            ..base
        },
        finetune: args
            .finetune
            .as_deref()
            .map(|f| named_cache(f, "--finetune"))
            .transpose()?,
        finetune_stage: StageConfig {
            epochs: args.finetune_epochs.unwrap_or(fine.epochs),
            batch_size: args.finetune_batch_size.unwrap_or(fine.batch_size),
            seed: args.seed,
            ..fine
        },
        dual_loss: DualLossConfig::default(),
        lambdas: args.lambdas.clone(),
        label_seeds: (0..args.label_seeds).collect(),
        labels: LabelSettings::paper(),
        resume: args.resume,
    })
}

fn run_world(args: &Args, only: &[Experiment], dev: &Device) -> anyhow::Result<Report> {
    let real_only = args.data.is_some()
        || !args.evals.is_empty()
        || args.prompts.is_some()
        || args.finetune.is_some();
    if real_only {
        bail!(
            "--data, --eval, --prompts and --finetune are for real data, which needs --teacher \
             clip:DIR"
        );
    }
    let cfg = if args.quick {
        ReproConfig::quick(args.seed)
    } else {
        ReproConfig::standard(args.seed)
    };
    run_reproduce(&cfg, only, &args.out, true, dev)
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let mut only = match (&args.only, &args.teacher) {
        (Some(list), _) => Experiment::parse_list(list)?,
        (None, Some(_)) if args.finetune.is_some() => [SUPPORTED, WITH_FINETUNING].concat(),
        (None, Some(_)) => SUPPORTED.to_vec(),
        (None, None) => Experiment::ALL.to_vec(),
    };
    only.sort_unstable();
    let report = match &args.teacher {
        Some(teacher) => run_real_data(
            &real_data_config(&args, teacher)?,
            &only,
            &args.out,
            true,
            dev,
        )?,
        None => run_world(&args, &only, dev)?,
    };
    print!("{}", report.markdown());
    println!(
        "\nwrote {} in {:.0} s",
        args.out.join("report.md").display(),
        report.seconds
    );
    Ok(())
}
