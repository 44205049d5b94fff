//! `spikeclip demo`: the whole recipe on the built-in world, SpikeCLIP against ScratchCLIP.

use std::path::PathBuf;

use crate::recipe::demo::{run_demo, DemoConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Where the report, plots and checkpoints go.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// A small, fast run (under a minute), for smoke tests.
    #[arg(long)]
    quick: bool,
    /// Seeds the world, the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = if args.quick {
        DemoConfig::quick(args.seed)
    } else {
        DemoConfig::standard(args.seed)
    };
    let start = std::time::Instant::now();
    let report = run_demo(&cfg, &args.out, true)?;
    print!("{}", crate::recipe::demo::markdown(&report));
    println!(
        "\nwrote {} in {:.0} s",
        args.out.join("report.md").display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
