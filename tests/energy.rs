//! The energy engine against counts worked out by hand on a tiny network whose spikes are known
//! exactly, and the report's files.

use candle_core::{Device, Tensor};
use spikeclip::energy::{
    reduction_rate, sample_raster, write_report, EncoderOps, EnergyConstants, MonitorSet, Op,
    OpInput, ReportInputs,
};
use spikeclip::neuron::{LifConfig, MultiStepLif};
use spikeclip::plot::{line_plot, Labels, Series};
use std::path::Path;

/// Tiny network, T = 2, one sample. With tau 2, V_th 1 and hard reset to 0, a current of 4
/// charges a resting neuron to 2 (spike), a current of 3 to 1.5 (spike), 1.5 to 0.75 (none).
///
/// - `stem`: linear 4 -> 4 on real input, run once: 16 MACs.
/// - `lif1` sees [[4,4,0,0],[4,0,0,0]]: spikes [[1,1,0,0],[1,0,0,0]], rate 3/8.
/// - `fc`: linear 4 -> 2 (all weights 1.5) on lif1's spikes: 8 FLOPs, SOPs 3/8 x 2 x 8 = 6.
///   Its output [[3,3],[1.5,1.5]] drives `lif2`: spikes [[1,1],[0,0]], rate 1/2.
/// - `head`: linear 2 -> 3 on lif2's spikes: 6 FLOPs, SOPs 1/2 x 2 x 6 = 6.
/// - attention, H 1, N 2, d 2: q rate 4/8, k rate 6/8, v rate 2/8; 16 FLOPs;
///   SOPs = T x H x N x d^2 x (fr_q + min(fr_k, fr_v)) = 2 x 8 x (0.5 + 0.25) = 12.
struct Tiny {
    lif1: MultiStepLif,
    lif2: MultiStepLif,
    q: MultiStepLif,
    k: MultiStepLif,
    v: MultiStepLif,
}

const SNN_MACS: f64 = 16.0;
const SNN_SOPS: f64 = 6.0 + 12.0 + 6.0;
const ANN_MACS: f64 = 16.0 + 8.0 + 16.0 + 6.0;

fn lif() -> MultiStepLif {
    MultiStepLif::new(LifConfig::default())
}

fn currents(rows: &[[f32; 4]; 2]) -> Tensor {
    Tensor::new(rows, &Device::Cpu)
        .unwrap()
        .reshape((2, 1, 4))
        .unwrap()
}

impl Tiny {
    fn new() -> Self {
        Self {
            lif1: lif(),
            lif2: lif(),
            q: lif(),
            k: lif(),
            v: lif(),
        }
    }

    fn monitors(&self) -> MonitorSet {
        let mut m = MonitorSet::new();
        for (name, l) in [
            ("lif1", &self.lif1),
            ("lif2", &self.lif2),
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
        ] {
            m.push(name, l);
        }
        m
    }

    fn forward(&self) -> candle_core::Result<Tensor> {
        let s1 = self
            .lif1
            .forward(&currents(&[[4., 4., 0., 0.], [4., 0., 0., 0.]]))?;
        let w = Tensor::full(1.5f32, (4, 2), &Device::Cpu)?;
        let fc = s1.reshape((2, 4))?.matmul(&w)?.reshape((2, 1, 2))?;
        let s2 = self.lif2.forward(&fc)?;
        self.q.forward(&currents(&[[4.; 4], [0.; 4]]))?;
        self.k.forward(&currents(&[[4.; 4], [4., 4., 0., 0.]]))?;
        self.v.forward(&currents(&[[4., 4., 0., 0.], [0.; 4]]))?;
        Ok(s2)
    }

    fn ops(&self) -> EncoderOps {
        let snn = vec![
            Op::linear("stem", 1, (4, 4), OpInput::Real),
            Op::linear("fc", 1, (4, 2), OpInput::Spikes("lif1".into())),
            Op::spike_attention("attention", 1, 2, 2, ("q", "k", "v")),
            Op::linear("head", 1, (2, 3), OpInput::Spikes("lif2".into())),
        ];
        let ann = snn.iter().map(Op::as_ann).collect();
        EncoderOps {
            name: "tiny".into(),
            snn,
            ann,
            monitors: self.monitors(),
        }
    }
}

fn report_inputs(ops: &[EncoderOps]) -> ReportInputs<'_> {
    ReportInputs {
        encoders: ops,
        time_steps: 2,
        samples: 1,
        constants: EnergyConstants::fp32(),
        rasters: Vec::new(),
    }
}

#[test]
fn tiny_network_counts_match_the_hand_calculation() {
    let net = Tiny::new();
    let monitors = net.monitors();
    let (_, rates) = monitors.record(|| Ok(net.forward()?)).unwrap();
    let fr = |n: &str| rates[n].firing_rate();
    assert_eq!(
        [fr("lif1"), fr("lif2"), fr("q"), fr("k"), fr("v")],
        [0.375, 0.5, 0.5, 0.75, 0.25]
    );

    let ops = [net.ops()];
    let dir = tempfile::tempdir().unwrap();
    let report = write_report(&report_inputs(&ops), dir.path()).unwrap();
    let tiny = &report.encoders[0];
    let sops: Vec<f64> = tiny.snn.rows.iter().map(|r| r.sops).collect();
    assert_eq!(sops, [0.0, 6.0, 12.0, 6.0]);
    assert_eq!(tiny.snn.rows[2].input_firing_rate, Some(0.75));
    assert_eq!(
        (tiny.snn.totals.macs, tiny.snn.totals.sops),
        (SNN_MACS, SNN_SOPS)
    );
    assert_eq!(
        (tiny.ann.totals.macs, tiny.ann.totals.sops),
        (ANN_MACS, 0.0)
    );

    let e_snn = (4.6 * SNN_MACS + 0.9 * SNN_SOPS) * 1e-9;
    let e_ann = 4.6 * ANN_MACS * 1e-9;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    assert!(close(tiny.snn.totals.energy_mj, e_snn));
    assert!(close(tiny.ann.totals.energy_mj, e_ann));
    assert!(close(tiny.reduction_rate, 1.0 - e_snn / e_ann));
}

#[test]
fn monitors_count_nothing_outside_record() {
    let net = Tiny::new();
    let monitors = net.monitors();
    monitors.record(|| Ok(net.forward()?)).unwrap();
    net.forward().unwrap();
    assert_eq!(monitors.counts()["lif1"].spikes, 3);
    // A second recording starts from zero.
    let (_, again) = monitors.record(|| Ok(net.forward()?)).unwrap();
    assert_eq!(again["lif1"].spikes, 3);
}

fn report_error(ops: EncoderOps) -> String {
    let err = write_report(&report_inputs(&[ops]), Path::new("/nonexistent")).unwrap_err();
    format!("{err:#}")
}

#[test]
fn an_op_fed_by_an_unmonitored_layer_is_a_named_error() {
    let net = Tiny::new();
    net.monitors().record(|| Ok(net.forward()?)).unwrap();
    let mut ops = net.ops();
    ops.snn.push(Op::linear(
        "extra",
        1,
        (2, 2),
        OpInput::Spikes("lif9".into()),
    ));
    let msg = report_error(ops);
    assert!(msg.contains("extra") && msg.contains("lif9"), "{msg}");
}

#[test]
fn monitors_that_saw_no_forward_pass_are_an_error() {
    let net = Tiny::new();
    let msg = report_error(net.ops());
    assert!(msg.contains("recorded 0 time steps, expected 2"), "{msg}");
}

#[test]
fn reduction_rate_is_one_minus_the_energy_ratio() {
    assert_eq!(reduction_rate(1.0, 4.0), 0.75);
    assert_eq!(reduction_rate(2.0, 2.0), 0.0);
    assert_eq!(reduction_rate(3.0, 2.0), -0.5);
}

#[test]
fn energy_json_totals_are_the_sums_of_its_rows() {
    let net = Tiny::new();
    let monitors = net.monitors();
    monitors.record(|| Ok(net.forward()?)).unwrap();
    let ops = [net.ops()];
    let dir = tempfile::tempdir().unwrap();
    write_report(&report_inputs(&ops), dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("energy.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["constants"]["e_mac_pj"], 4.6);
    assert_eq!(json["constants"]["e_ac_pj"], 0.9);
    let encoder = &json["encoders"][0];
    for net in ["snn", "ann"] {
        let rows = encoder[net]["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 4);
        for col in ["flops", "macs", "sops", "energy_mj"] {
            let sum: f64 = rows.iter().map(|r| r[col].as_f64().unwrap()).sum();
            let total = encoder[net]["totals"][col].as_f64().unwrap();
            assert!((sum - total).abs() <= 1e-12 * total.abs(), "{net} {col}");
        }
    }
    let table = std::fs::read_to_string(dir.path().join("energy.txt")).unwrap();
    assert!(table.contains("Memory access and data movement are not counted"));
    assert!(table.contains("fr_q + min(fr_k, fr_v)"));
}

/// A PNG that decodes, has the expected size and draws more than a blank canvas.
fn assert_real_png(path: &Path, min_bytes: u64) {
    let bytes = std::fs::metadata(path).unwrap().len();
    assert!(bytes >= min_bytes, "{}: only {bytes} bytes", path.display());
    let img = image::open(path).unwrap().to_rgb8();
    assert!(img.width() >= 400 && img.height() >= 100);
    let dark = img
        .pixels()
        .filter(|p| p.0.iter().all(|&c| c < 100))
        .count();
    assert!(dark > 500, "{}: only {dark} dark pixels", path.display());
}

#[test]
fn plots_are_valid_pngs() {
    let net = Tiny::new();
    let monitors = net.monitors();
    monitors.record(|| Ok(net.forward()?)).unwrap();
    let spikes = net
        .lif1
        .forward(&currents(&[[4., 4., 0., 0.], [4., 0., 0., 0.]]))
        .unwrap();
    let raster = sample_raster("lif1", &spikes, 3).unwrap();
    assert_eq!(raster.neurons, [0, 2]);
    assert_eq!(raster.spikes, [[true, true], [false, false]]);
    assert_eq!(raster.firing_rate, 3.0 / 8.0);

    let ops = [net.ops()];
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = report_inputs(&ops);
    inputs.rasters = vec![raster];
    write_report(&inputs, dir.path()).unwrap();
    assert_real_png(&dir.path().join("firing_rates.png"), 5_000);
    assert_real_png(&dir.path().join("spike_raster.png"), 5_000);

    let curves = dir.path().join("curves.png");
    let series = |name: &str, f: fn(f64) -> f64| Series {
        name: name.into(),
        points: (0..50).map(|i| (i as f64, f(i as f64))).collect(),
    };
    line_plot(
        &curves,
        Labels {
            title: "training",
            x: "step",
            y: "value",
        },
        &[
            series("loss", |x| (-x / 10.0).exp()),
            series("accuracy", |x| x / 50.0),
        ],
    )
    .unwrap();
    assert_real_png(&curves, 5_000);
}
