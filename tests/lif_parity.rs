//! The fused and the portable LIF op against SpikingJelly's MultiStepLIFNode: fixtures written
//! by scripts/lif_fixtures.py. Spikes must be identical and input gradients within 1e-5.

use candle_core::{Device, Var};
use serde::Deserialize;
use spikeclip::neuron::{LifConfig, MultiStepLif, Surrogate};
use spikeclip::ops::device::DeviceArg;
use spikeclip::ops::Ops;

#[derive(Deserialize)]
struct Case {
    name: String,
    tau: f32,
    v_threshold: f32,
    v_reset: Option<f32>,
    detach_reset: bool,
    surrogate: String,
    decay_input: bool,
}

#[derive(Deserialize)]
struct Meta {
    cases: Vec<Case>,
}

/// Every fixture case run by `ops` on `device`: the spikes SpikingJelly gave, the input
/// gradient within 1e-5.
fn matches_spikingjelly_on_every_case(ops: Ops, device: &Device) -> candle_core::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let meta: Meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lif_spikingjelly.json"))?)
            .expect("fixture metadata");
    let tensors = candle_core::safetensors::load(dir.join("lif_spikingjelly.safetensors"), device)?;
    assert_eq!(meta.cases.len(), 96);
    for case in &meta.cases {
        let cfg = LifConfig {
            tau: case.tau,
            v_threshold: case.v_threshold,
            v_reset: case.v_reset,
            detach_reset: case.detach_reset,
            decay_input: case.decay_input,
            surrogate: match case.surrogate.as_str() {
                "sigmoid" => Surrogate::Sigmoid { alpha: 4.0 },
                "atan" => Surrogate::ATan { alpha: 2.0 },
                other => panic!("unknown surrogate {other}"),
            },
        };
        let get = |k: &str| tensors[&format!("{}.{k}", case.name)].clone();
        let x = Var::from_tensor(&get("x"))?;
        let spikes = ops.lif(&MultiStepLif::new(cfg), x.as_tensor())?;
        let grads = (&spikes * get("grad_out"))?.sum_all()?.backward()?;
        let want: Vec<f32> = get("spikes").flatten_all()?.to_vec1()?;
        let got: Vec<f32> = spikes.flatten_all()?.to_vec1()?;
        assert_eq!(
            got, want,
            "{ops:?}: spikes differ in {} ({cfg:?})",
            case.name
        );
        let gx = grads.get(x.as_tensor()).expect("input gradient");
        let err: f32 = (gx - get("grad_x"))?.abs()?.max_all()?.to_scalar()?;
        assert!(
            err <= 1e-5,
            "{ops:?} {}: gradient error {err} ({cfg:?})",
            case.name
        );
    }
    Ok(())
}

#[test]
fn the_fused_lif_matches_spikingjelly() -> candle_core::Result<()> {
    matches_spikingjelly_on_every_case(Ops::Fused, &Device::Cpu)
}

/// The portable LIF, on the device `SPIKECLIP_TEST_DEVICE` names (`cuda:0` in
/// scripts/gpu_check.sh; the CPU by default).
#[test]
fn the_portable_lif_matches_spikingjelly_on_the_test_device() -> anyhow::Result<()> {
    let device = match std::env::var("SPIKECLIP_TEST_DEVICE") {
        Ok(name) => name
            .parse::<DeviceArg>()
            .map_err(anyhow::Error::msg)?
            .open()?,
        Err(_) => Device::Cpu,
    };
    Ok(matches_spikingjelly_on_every_case(Ops::Portable, &device)?)
}

#[test]
fn fixture_cases_are_not_degenerate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lif_spikingjelly.json")).unwrap())
            .unwrap();
    for case in meta["cases"].as_array().unwrap() {
        let rate = case["firing_rate"].as_f64().unwrap();
        assert!(rate > 0.02 && rate < 0.98, "{case}");
    }
}
