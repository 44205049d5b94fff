//! Timing for `spikeclip bench`: medians over repeated iterations after warm-up, and the peak
//! resident memory of each case measured on its own.

use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub warmup: usize,
    pub iters: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Peak resident set of the process while the case ran (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
    pub iters: usize,
    /// Items (images, texts) per second at the median, for cases that process a batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_per_s: Option<f64>,
    /// Case-specific measurements beyond one timing, such as a sweep's table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl BenchResult {
    /// The same result with the throughput of `items` per step.
    pub fn per_step(self, items: usize) -> Self {
        Self {
            throughput_per_s: Some(items as f64 / self.median_s),
            ..self
        }
    }
}

/// Runs `step` `warmup` times untimed, then `iters` times timed.
pub fn measure(
    budget: Budget,
    step: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<BenchResult> {
    measure_on(&Device::Cpu, budget, step)
}

/// [`measure`] of a step whose work runs on `device`: each step ends when the device has
/// finished it, not when its kernels were queued (a GPU runs them asynchronously).
pub fn measure_on(
    device: &Device,
    budget: Budget,
    mut step: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<BenchResult> {
    reset_peak_rss();
    for _ in 0..budget.warmup {
        step()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(budget.iters);
    for _ in 0..budget.iters.max(1) {
        let start = Instant::now();
        step()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    Ok(BenchResult {
        median_s: median,
        min_s: times[0],
        max_s: times[n - 1],
        peak_rss_mib: peak_rss_mib(),
        iters: n,
        throughput_per_s: None,
        details: None,
    })
}

/// Resets the kernel's high-water mark of resident memory, so each case reports its own peak.
fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere this is a no-op.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Sets the shift (bias) of every BatchNorm in `varmap` to `shift`: the same as lowering every
/// LIF threshold behind a BatchNorm by `shift`, a knob for the firing rate of a random model.
pub fn set_batch_norm_shift(varmap: &VarMap, shift: f32) -> candle_core::Result<()> {
    for (name, var) in varmap.data().lock().expect("VarMap lock").iter() {
        if name.ends_with("_bn.bias") {
            var.set(&var.as_tensor().ones_like()?.affine(shift.into(), 0.0)?)?;
        }
    }
    Ok(())
}
