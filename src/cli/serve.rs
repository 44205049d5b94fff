//! `spikeclip serve`: the zero-shot classifier as a local web service and page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;

use crate::data::prompts::PromptSet;
use crate::serve::{self, BatchConfig, EngineConfig, Limits};
use crate::teacher::ModelSpec;

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (model.safetensors + model.json), e.g. runs/demo/spikeclip.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Where to listen; loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Default label names, comma-separated (default: the world's classes for a world
    /// checkpoint).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// A prompts file (clip_prompts.json format) whose datasets requests may name.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// The prompts file's dataset to use when a request names no labels.
    #[arg(long, requires = "prompts", conflicts_with = "labels")]
    prompt_set: Option<String>,
    /// The teacher whose ranking each answer shows beside the student's (`clip:DIR`); without
    /// it a checkpoint trained on the built-in world is shown beside the world's analytic
    /// teacher, as `eval` scores it.
    #[arg(long)]
    teacher: Option<String>,
    /// Run a spiking image encoder on its dense path instead of the spike-driven one.
    #[arg(long)]
    dense: bool,
    /// Energy per operation: fp32, fp16, int8, or `MAC,AC` in pJ.
    #[arg(long, default_value = "fp32")]
    precision: String,
    #[command(flatten)]
    batch: BatchArgs,
    /// Most bytes of a request body, in MiB.
    #[arg(long, default_value_t = 8)]
    max_body_mib: usize,
    /// Most decoded pixels of an uploaded image.
    #[arg(long, default_value_t = serve::image_input::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
}

/// How the server batches requests; `serve-bench` measures a server set up the same way.
#[derive(clap::Args)]
pub(super) struct BatchArgs {
    /// How long the first request of a batch waits for others, in milliseconds.
    #[arg(long, default_value_t = 5)]
    window_ms: u64,
    /// Most images run through the model together (8: at 32 clients batches of 8 served more
    /// requests/s than batches of 32 on the demo checkpoint; see the README's serve section).
    #[arg(long, default_value_t = BatchConfig::default().max_batch)]
    max_batch: usize,
    /// Most requests waiting or running; beyond it the server answers 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub(super) queue: usize,
}

impl BatchArgs {
    pub(super) fn config(&self) -> BatchConfig {
        BatchConfig {
            window: Duration::from_millis(self.window_ms),
            max_batch: self.max_batch,
            queue_bound: self.queue,
        }
    }
}

impl Args {
    fn engine(&self, dev: &Device) -> anyhow::Result<EngineConfig> {
        let prompts = self
            .prompts
            .as_deref()
            .map(PromptSet::from_file)
            .transpose()?;
        if let (Some(set), Some(file), Some(p)) = (&self.prompt_set, &self.prompts, &prompts) {
            anyhow::ensure!(
                p.datasets.contains_key(set),
                "{}: no dataset {set:?} in the prompts file",
                file.display()
            );
        }
        Ok(EngineConfig {
            default_labels: self.labels.clone(),
            default_prompt_set: self.prompt_set.clone(),
            prompts,
            dense: self.dense,
            constants: self.precision.parse()?,
            batch: self.batch.config(),
            teacher: self.teacher.as_deref().map(ModelSpec::parse).transpose()?,
            device: dev.clone(),
            ..EngineConfig::new(self.checkpoint.clone())
        })
    }
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let limits = Limits {
        body_bytes: args.max_body_mib << 20,
        pixels: args.max_pixels,
    };
    let state = serve::start(args.engine(dev)?, limits)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            "serving {} ({} image path, on {}) on http://{addr}/",
            args.checkpoint.display(),
            state.info.image_path,
            state.info.device
        );
        serve::serve(listener, serve::router(state), shutdown_signal()).await?;
        tracing::info!("stopped: every request in flight was answered");
        anyhow::Ok(())
    })
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing the requests in flight");
}
