//! A bounded load test on loopback: N clients share a fixed count of classify requests, each
//! client sending its next request when the last one is answered, and the run stops by itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::client::{multipart, post};

/// What one load level measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub clients: usize,
    pub requests: usize,
    pub ok: usize,
    /// 503 answers (the queue was full).
    pub busy: usize,
    /// Anything else: other statuses, connection errors.
    pub failed: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    /// Latency of the answered (200) requests.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean batch the answered requests ran in.
    pub mean_batch: f64,
}

/// Sends `requests` classify requests of `images` (PNG/JPEG bytes, round robin) from `clients`
/// concurrent clients to the server at `addr`.
pub async fn run(
    addr: SocketAddr,
    clients: usize,
    requests: usize,
    images: Arc<Vec<Vec<u8>>>,
) -> LoadResult {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let (next, images) = (next.clone(), images.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests {
                        return seen;
                    }
                    let (ct, body) = multipart(&images[i % images.len()], &[]);
                    let sent = Instant::now();
                    let outcome = post(addr, "/v1/classify", &ct, &body).await;
                    let latency = sent.elapsed();
                    seen.push(match outcome {
                        Ok(r) if r.status == 200 => {
                            let batch = r
                                .json()
                                .ok()
                                .and_then(|v| v["timing"]["batch_size"].as_u64())
                                .unwrap_or(0);
                            Outcome::Ok(latency, batch as usize)
                        }
                        Ok(r) if r.status == 503 => Outcome::Busy,
                        _ => Outcome::Failed,
                    });
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        match t.await {
            Ok(seen) => outcomes.extend(seen),
            Err(_) => outcomes.push(Outcome::Failed),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    summarise(clients, requests, seconds, &outcomes)
}

enum Outcome {
    Ok(Duration, usize),
    Busy,
    Failed,
}

fn summarise(clients: usize, requests: usize, seconds: f64, outcomes: &[Outcome]) -> LoadResult {
    let mut latencies: Vec<f64> = Vec::new();
    let (mut busy, mut failed, mut batches) = (0, 0, 0);
    for o in outcomes {
        match o {
            Outcome::Ok(l, b) => {
                latencies.push(l.as_secs_f64() * 1e3);
                batches += b;
            }
            Outcome::Busy => busy += 1,
            Outcome::Failed => failed += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    let ok = latencies.len();
    LoadResult {
        clients,
        requests,
        ok,
        busy,
        failed,
        seconds,
        requests_per_second: ok as f64 / seconds.max(1e-9),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        mean_batch: batches as f64 / ok.max(1) as f64,
    }
}

/// The `q` quantile of sorted values (nearest rank); 0 for none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
