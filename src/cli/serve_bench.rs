//! `spikeclip serve-bench`: requests/s and latency of `serve` on loopback at several client
//! counts, beside one-at-a-time classification in process, and the same load against a small
//! queue bound to show the 503s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;

use crate::recipe::classifier::{ranked_probabilities, LoadedStudent};
use crate::serve::load::{self, percentile, LoadResult};
use crate::serve::{self, image_input, BatchConfig, EngineConfig, Limits};

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (model.safetensors + model.json).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Client counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Requests per client count.
    #[arg(long, default_value_t = 256)]
    requests: usize,
    /// The measured server's batching; its queue bound should be above every client count,
    /// so that no 503 is expected.
    #[command(flatten)]
    batch: super::serve::BatchArgs,
    /// Queue bound of a second server loaded with the largest client count, to show 503s
    /// (0: skip).
    #[arg(long, default_value_t = 4)]
    small_queue: usize,
    /// Writes the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: Args, dev: &Device) -> anyhow::Result<()> {
    let samples = serve::page::Samples::of_world()?;
    let images: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..samples.len())
            .filter_map(|i| samples.png(i).map(<[u8]>::to_vec))
            .collect(),
    );
    let sequential = one_at_a_time(&args.checkpoint, &images, args.requests, dev)?;
    println!(
        "one-at-a-time classify (in process, batch of 1, no HTTP): {:.1} images/s, p50 {:.2} ms, \
         p99 {:.2} ms",
        sequential.requests_per_second, sequential.p50_ms, sequential.p99_ms
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let mut results = Vec::new();
    let largest = args.clients.iter().copied().max().unwrap_or(1);
    let mut levels: Vec<(usize, usize)> = args
        .clients
        .iter()
        .map(|&c| (c, args.batch.queue))
        .collect();
    if args.small_queue > 0 {
        levels.push((largest, args.small_queue));
    }
    println!(
        "\n| clients | queue bound | req/s | p50 ms | p99 ms | mean batch | 200 | 503 | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (clients, bound) in levels {
        let batch = BatchConfig {
            queue_bound: bound,
            ..args.batch.config()
        };
        let config = EngineConfig {
            batch,
            device: dev.clone(),
            ..EngineConfig::new(args.checkpoint.clone())
        };
        let r = runtime.block_on(measure(config, clients, args.requests, images.clone()))?;
        println!(
            "| {} | {bound} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            r.clients,
            r.requests_per_second,
            r.p50_ms,
            r.p99_ms,
            r.mean_batch,
            r.ok,
            r.busy,
            r.failed
        );
        results.push(serde_json::json!({ "queue_bound": bound, "result": r }));
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "device": crate::ops::device::name(dev),
            "one_at_a_time": sequential,
            "served": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One load level against a fresh server on 127.0.0.1, port 0, shut down afterwards.
async fn measure(
    config: EngineConfig,
    clients: usize,
    requests: usize,
    images: Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<LoadResult> {
    let state = serve::start(config, Limits::default())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve(listener, serve::router(state), async {
        let _ = stopped.await;
    }));
    // Warm-up: the first request pays for lazily built state.
    load::run(addr, 1, 2, images.clone()).await;
    let result = load::run(addr, clients, requests, images).await;
    let _ = stop.send(());
    server.await??;
    Ok(result)
}

/// What `classify` does per image, one image at a time: decode, student input, features and
/// ranking against the default labels.
fn one_at_a_time(
    checkpoint: &std::path::Path,
    images: &[Vec<u8>],
    requests: usize,
    dev: &Device,
) -> anyhow::Result<LoadResult> {
    let loaded = LoadedStudent::open(checkpoint, dev)?;
    let classes = loaded.class_embeddings(&loaded.prompts_for_labels(&[])?, dev)?;
    let inference = loaded.for_inference(false)?;
    let mut latencies = Vec::with_capacity(requests);
    let start = Instant::now();
    for i in 0..requests {
        let t = Instant::now();
        let x =
            image_input::student_input(&images[i % images.len()], image_input::DEFAULT_MAX_PIXELS)?
                .to_device(dev)?;
        let feats = inference.student().image_features(&x, false)?;
        ranked_probabilities(&feats, &classes)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok(LoadResult {
        clients: 1,
        requests,
        ok: requests,
        busy: 0,
        failed: 0,
        seconds,
        requests_per_second: requests as f64 / seconds.max(1e-9),
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        mean_batch: 1.0,
    })
}
