//! `spikeclip serve`: zero-shot classification as a local web service and page.
//!
//! A checkpoint is loaded once on a model thread behind a batching queue ([`queue`]); axum
//! handlers ([`routes`]) decode uploads, submit jobs and answer with the ranked labels, the
//! image's own firing rates, energy against the ANN twin and spike raster ([`engine`]).
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use spikeclip::serve::{self, EngineConfig, Limits};
//! let state = serve::start(EngineConfig::new("runs/demo/spikeclip".into()), Limits::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve::serve(listener, serve::router(state), async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```

pub mod card;
pub mod client;
pub mod engine;
pub mod image_input;
pub mod load;
pub mod page;
pub mod queue;
pub mod routes;
pub mod teacher;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub use engine::EngineConfig;
pub use queue::BatchConfig;
pub use routes::{api, guarded, router, AppState, Limits};

use crate::energy::EnergyConstants;

impl EngineConfig {
    /// A checkpoint served with the defaults: spike-driven, its default labels, fp32 energy,
    /// the default batching, on the CPU.
    pub fn new(checkpoint: PathBuf) -> Self {
        Self {
            checkpoint,
            dense: false,
            default_labels: Vec::new(),
            default_prompt_set: None,
            prompts: None,
            constants: EnergyConstants::fp32(),
            batch: BatchConfig::default(),
            teacher: None,
            device: candle_core::Device::Cpu,
        }
    }
}

/// Loads the model (and its teacher) on its thread and returns what the routes share.
pub fn start(config: EngineConfig, limits: Limits) -> anyhow::Result<AppState> {
    let samples = Arc::new(page::Samples::of_world()?);
    let (engine, ready) = engine::start(config, samples.clone())?;
    Ok(AppState {
        engine,
        info: Arc::new(ready.info),
        teacher: ready.teacher,
        samples,
        limits,
    })
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and returns once
/// the requests in flight have been answered.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
