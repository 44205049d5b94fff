//! `spikeclip reproduce`: the paper's experiments on the built-in world, with a report.

use std::path::PathBuf;

use crate::experiments::reproduce::{run_reproduce, Experiment, ReproConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Where report.md, report.json, the plots and the trainings' checkpoints go.
    #[arg(long, default_value = "runs/reproduce")]
    out: PathBuf,
    /// A small, fast run (about a minute), for smoke tests.
    #[arg(long)]
    quick: bool,
    /// A subset of the experiments, comma-separated: table2,table3,table4,table5,table6,table8,figure6.
    #[arg(long)]
    only: Option<String>,
    /// Seeds the world, the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let only = match &args.only {
        Some(list) => Experiment::parse_list(list)?,
        None => Experiment::ALL.to_vec(),
    };
    let cfg = if args.quick {
        ReproConfig::quick(args.seed)
    } else {
        ReproConfig::standard(args.seed)
    };
    let report = run_reproduce(&cfg, &only, &args.out, true)?;
    print!("{}", report.markdown());
    println!(
        "\nwrote {} in {:.0} s",
        args.out.join("report.md").display(),
        report.seconds
    );
    Ok(())
}
