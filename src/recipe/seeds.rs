//! The demo over several seeds (`demo --seeds 0,1,2`): on this small world one run's unseen
//! column moves by up to 10 points with the seed (or the float summation order) alone, so the
//! figures worth quoting are the mean and standard deviation over runs.

use std::fmt::Write as _;

use serde::Serialize;

use super::demo::DemoReport;

/// Mean and sample standard deviation of one figure over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 for one run.
    pub sd: f64,
    pub values: Vec<f64>,
}

impl Spread {
    pub fn of(values: Vec<f64>) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n.max(1.0);
        let sd = if values.len() > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        Self { mean, sd, values }
    }

    /// `84.5 ± 3.2` in percent.
    pub fn percent(&self) -> String {
        format!("{:.1} ± {:.1}", 100.0 * self.mean, 100.0 * self.sd)
    }
}

/// One model after one stage, over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedRow {
    pub model: String,
    pub stage: String,
    pub seen_top1: Spread,
    pub unseen_top1: Spread,
}

/// What the several-seed `report.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedsReport {
    pub seeds: Vec<u64>,
    pub chance: f64,
    pub rows: Vec<SeedRow>,
    /// SpikeCLIP's image-encoder energy reduction against its ANN twin.
    pub image_energy_reduction: Option<Spread>,
    /// Where every seed trained and how its ops ran (one run: the same for all).
    pub device: String,
    pub ops: &'static str,
}

/// The figures of `reports` (one per seed, in `seeds` order) as mean ± sd.
pub fn summarise(seeds: &[u64], reports: &[DemoReport]) -> anyhow::Result<SeedsReport> {
    anyhow::ensure!(
        !reports.is_empty() && seeds.len() == reports.len(),
        "{} seeds for {} demo reports",
        seeds.len(),
        reports.len()
    );
    let mut rows = Vec::new();
    for (model, pick) in [
        (
            "SpikeCLIP (SNN)",
            (|r: &DemoReport| &r.spikeclip) as fn(&_) -> &_,
        ),
        ("ScratchCLIP (ANN)", |r: &DemoReport| &r.scratchclip),
    ] {
        for (i, stage) in pick(&reports[0]).stages.iter().enumerate() {
            let column = |f: fn(&super::demo::StageScore) -> f64| {
                Spread::of(reports.iter().map(|r| f(&pick(r).stages[i])).collect())
            };
            rows.push(SeedRow {
                model: model.to_string(),
                stage: stage.stage.clone(),
                seen_top1: column(|s| s.seen_top1),
                unseen_top1: column(|s| s.unseen_top1),
            });
        }
    }
    let reductions: Option<Vec<f64>> = reports
        .iter()
        .map(|r| {
            let e = r.energy.as_ref()?;
            e.encoders
                .iter()
                .find(|enc| enc.name == "image")
                .map(|enc| enc.reduction_rate)
        })
        .collect();
    Ok(SeedsReport {
        seeds: seeds.to_vec(),
        chance: reports[0].chance,
        rows,
        image_energy_reduction: reductions.map(Spread::of),
        device: reports[0].device.clone(),
        ops: reports[0].ops,
    })
}

/// The several-seed table as Markdown.
pub fn markdown(r: &SeedsReport) -> String {
    let mut s = String::new();
    let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(
        s,
        "# spikeclip demo on the built-in world, {} seeds\n",
        seeds.len()
    );
    let _ = writeln!(
        s,
        "Zero-shot top-1 (%) on the test splits, mean ± sample sd over seeds {} (chance {:.1} %); \
         each seed's own report is in `seed-N/`. Trained on {} with the {} ops.\n",
        seeds.join(", "),
        100.0 * r.chance,
        r.device,
        r.ops
    );
    let _ = writeln!(s, "| model | after stage | seen top-1 | unseen top-1 |");
    let _ = writeln!(s, "|---|---|---|---|");
    for row in &r.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            row.model,
            row.stage,
            row.seen_top1.percent(),
            row.unseen_top1.percent()
        );
    }
    if let Some(e) = &r.image_energy_reduction {
        let _ = writeln!(
            s,
            "\nSpikeCLIP's image encoder: {} % less energy than its ANN twin (45 nm, fp32).",
            e.percent()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_mean_and_sample_sd() {
        let s = Spread::of(vec![0.1, 0.2, 0.3]);
        assert!((s.mean - 0.2).abs() < 1e-12);
        assert!((s.sd - 0.1).abs() < 1e-12);
        assert_eq!(s.percent(), "20.0 ± 10.0");
        assert_eq!(Spread::of(vec![0.5]).sd, 0.0);
    }

    fn report(seen: f64, unseen: f64) -> DemoReport {
        use super::super::demo::{DemoConfig, ModelReport, StageScore};
        let score = |stage: &str, s: f64, u: f64| StageScore {
            stage: stage.to_string(),
            seen: Default::default(),
            unseen: Default::default(),
            seen_top1: s,
            unseen_top1: u,
        };
        let model = |s: f64, u: f64| ModelReport {
            stages: vec![
                score("distill_image", s / 2.0, u / 2.0),
                score("finetune", s, u),
            ],
            seen_top1: s,
            unseen_top1: u,
            curves: Vec::new(),
        };
        DemoReport {
            chance: 1.0 / 24.0,
            teacher: score("teacher", 1.0, 1.0),
            spikeclip: model(seen, unseen),
            scratchclip: model(seen + 0.1, unseen),
            energy: None,
            config: DemoConfig::quick(0),
            device: "cpu".into(),
            ops: "fused",
        }
    }

    #[test]
    fn summary_has_one_row_per_model_and_stage_over_the_seeds() {
        let reports = [report(0.8, 0.1), report(0.9, 0.2)];
        let s = summarise(&[0, 1], &reports).unwrap();
        let stages: Vec<(&str, &str)> = s
            .rows
            .iter()
            .map(|r| (r.model.as_str(), r.stage.as_str()))
            .collect();
        assert_eq!(
            stages,
            [
                ("SpikeCLIP (SNN)", "distill_image"),
                ("SpikeCLIP (SNN)", "finetune"),
                ("ScratchCLIP (ANN)", "distill_image"),
                ("ScratchCLIP (ANN)", "finetune"),
            ]
        );
        assert_eq!(s.rows[1].seen_top1.values, [0.8, 0.9]);
        assert!((s.rows[3].seen_top1.mean - 0.95).abs() < 1e-12);
        assert!((s.rows[1].unseen_top1.mean - 0.15).abs() < 1e-12);
        assert!(s.image_energy_reduction.is_none());
        let md = markdown(&s);
        assert!(
            md.contains("| SpikeCLIP (SNN) | finetune | 85.0 ± 7.1 | 15.0 ± 7.1 |"),
            "{md}"
        );
        assert!(summarise(&[0], &reports).is_err());
    }
}
