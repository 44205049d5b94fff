//! Each of several bench cases in a child process (this executable with `bench --case NAME`),
//! so that each case's peak RSS is its own: the allocator keeps freed pages resident, so in
//! one process a large case's high-water mark carries over to every case after it.

use anyhow::{bail, Context};
use candle_core::Device;

use crate::bench::BenchResult;
use crate::ops::{device, Ops};

/// Runs bench case `name` in a child process with the given budget overrides and returns its
/// result.
pub fn run_case(
    name: &str,
    iters: Option<usize>,
    warmup: Option<usize>,
    dev: &Device,
) -> anyhow::Result<BenchResult> {
    let exe = std::env::current_exe().context("finding the spikeclip executable")?;
    let json = std::env::temp_dir().join(format!(
        "spikeclip-bench-{}-{name}.json",
        std::process::id()
    ));
    let mut cmd = std::process::Command::new(&exe);
    // The run-wide choices travel with the case: where it runs and how its ops run.
    cmd.args(["--device", &device::name(dev)]);
    cmd.args(["--ops", Ops::for_device(dev).name()]);
    cmd.args(["bench", "--case", name, "--json"]).arg(&json);
    for (flag, value) in [("--iters", iters), ("--warmup", warmup)] {
        if let Some(v) = value {
            cmd.arg(flag).arg(v.to_string());
        }
    }
    // The child's table goes nowhere: the parent prints one table of all cases.
    let out = cmd
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("starting {} for bench case {name}", exe.display()))?;
    if !out.success() {
        bail!("bench case {name}: the child process failed ({out})");
    }
    let text = std::fs::read_to_string(&json)
        .with_context(|| format!("reading bench case {name}'s results {}", json.display()))?;
    std::fs::remove_file(&json).with_context(|| format!("removing {}", json.display()))?;
    let mut results: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a bench result", json.display()))?;
    let result = results
        .remove(name)
        .with_context(|| format!("{}: no result for case {name}", json.display()))?;
    Ok(serde_json::from_value(result)?)
}
