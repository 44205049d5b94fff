//! The `spikeclip` command line: one subcommand per module, each in its own file.

mod bench;
mod cache;
mod classify;
mod demo;
mod embed;
mod energy;
mod eval;
mod import;
mod info;
mod prompt_args;
mod reproduce;
mod serve;
mod serve_bench;
mod train;
mod world;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::ops::device::DeviceArg;
use crate::ops::Ops;

#[derive(Parser)]
#[command(
    name = "spikeclip",
    version,
    about = "SpikeCLIP: spiking CLIP distillation, zero-shot classification and energy analysis"
)]
struct Cli {
    /// How the student's ops run: our fused CPU kernels, or candle's portable tensor ops (the
    /// reference the fused kernels are checked against; no spike-driven inference). Default:
    /// fused on the CPU, portable on a GPU.
    #[arg(long, global = true, value_enum)]
    ops: Option<Ops>,
    /// Where the tensors live: cpu, cuda (GPU 0), cuda:N, or auto (the GPU when the build has
    /// `cuda` and one is present). Preprocessing stays on the CPU.
    #[arg(long, global = true, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One stage of the recipe (distill-text, distill-image, finetune), resumable.
    Train(train::Args),
    /// Firing rates, operation counts and energy of a SpikeCLIP checkpoint vs its ANN twin.
    Energy(energy::Args),
    /// Rank label names for images with a trained checkpoint (zero-shot).
    Classify(classify::Args),
    /// Zero-shot top-1/top-5 of a checkpoint, beside the teacher's.
    Eval(eval::Args),
    /// Run the whole recipe on the built-in world: SpikeCLIP vs ScratchCLIP, report and plots.
    Demo(demo::Args),
    /// The paper's experiments (Tables 2, 3, 4, 6, 8, Figure 6) on the built-in world, with a report.
    Reproduce(reproduce::Args),
    /// Time the hot paths (median, min, max seconds per iteration and peak memory).
    Bench(bench::Args),
    /// Run the teacher once over a dataset and/or D-text and store features for training.
    Cache(cache::Args),
    /// Write a model's text and image features to a safetensors file.
    Embed(embed::Args),
    /// Turn the SpikeCLIP authors' PyTorch checkpoints into a checkpoint directory.
    Import(import::Args),
    /// Write sample images of the built-in world with their captions.
    World(world::Args),
    /// Zero-shot classification as a local web service and page (JSON API under /v1).
    Serve(serve::Args),
    /// Load test of `serve` on loopback: requests/s and p50/p99 latency at several client counts.
    ServeBench(serve_bench::Args),
    /// Print a preset's configuration (with overrides) and both encoders' layer tables.
    Info(info::Args),
}

/// Parses the arguments, runs the subcommand and reports any error with its chain of causes.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes are for a person at a terminal; in a redirected log they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    // Held to the end: MPI is finalised when it is dropped.
    let _job = match crate::dist::launch() {
        Ok(job) => job,
        Err(err) => {
            eprintln!("error: joining the MPI job: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().collect();
    let same_args = crate::dist::ensure_same(
        "the command line",
        crate::dist::Digest::default()
            .bytes(args.join("\0").as_bytes())
            .value(),
        crate::dist::collective(),
    );
    let device = same_args.and_then(|()| {
        let device = cli.device.open()?;
        Ops::choose_for_run(cli.ops, &device)?;
        Ok(device)
    });
    let result = device.and_then(|dev| match cli.command {
        Command::Bench(args) => bench::run(args, &dev),
        Command::Train(args) => train::run(args, &dev),
        Command::Energy(args) => energy::run(args, &dev),
        Command::Classify(args) => classify::run(args, &dev),
        Command::Eval(args) => eval::run(args, &dev),
        Command::Demo(args) => demo::run(args, &dev),
        Command::Reproduce(args) => reproduce::run(args, &dev),
        Command::Cache(args) => cache::run(args, &dev),
        Command::Embed(args) => embed::run(args, &dev),
        Command::Import(args) => import::run(args),
        Command::World(args) => world::run(args),
        Command::Info(args) => info::run(args, &dev),
        Command::Serve(args) => serve::run(args, &dev),
        Command::ServeBench(args) => serve_bench::run(args, &dev),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            crate::dist::fail_job(&err);
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
