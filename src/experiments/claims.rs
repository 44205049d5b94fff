//! The paper's claims, each checked against our tables. Thresholds are ours, stated in the
//! claim's wording, so a reader sees what "held" means.

use super::real_data::FINE_TUNED;
use super::report::{Claim, Table};

/// Points (of top-1 %) that count as "within a few points".
const FEW_POINTS: f64 = 5.0;

fn find<'a>(tables: &'a [Table], id: &str) -> Option<&'a Table> {
    tables.iter().find(|t| t.id == id)
}

fn claim(table: &str, text: &str, held: bool, evidence: String) -> Claim {
    Claim {
        table: table.into(),
        claim: text.into(),
        held,
        evidence,
    }
}

/// The columns of a fine-tuning table that hold the fine-tuning data: the world's seen pairs,
/// or on real data the dataset marked as fine-tuned on.
fn own_data(t: &Table) -> Vec<String> {
    t.columns
        .iter()
        .filter(|c| *c == "seen pairs" || c.ends_with(FINE_TUNED))
        .cloned()
        .collect()
}

/// The columns that hold other data: `world` on the built-in world, every other dataset on
/// real data.
fn other_data(t: &Table, world: &str) -> Vec<String> {
    if t.columns.iter().any(|c| c == world) {
        return vec![world.to_string()];
    }
    let own = own_data(t);
    t.columns
        .iter()
        .filter(|c| !own.contains(c))
        .cloned()
        .collect()
}

/// Mean of a row over `cols`; none when a column is missing or none is given.
fn mean(t: &Table, row: &str, cols: &[String]) -> Option<f64> {
    let v: Option<Vec<f64>> = cols.iter().map(|c| t.get(row, c)).collect();
    let v = v.filter(|v| !v.is_empty())?;
    Some(v.iter().sum::<f64>() / v.len() as f64)
}

/// Verdicts for the claims whose tables were run.
pub fn judge(tables: &[Table]) -> Vec<Claim> {
    let mut out = Vec::new();
    if let Some(t) = find(tables, "table2") {
        // "SpikeCLIP" on the world, "SpikeCLIP on DATASET" on real data.
        for row in t.rows.iter().filter(|r| r.name.starts_with("SpikeCLIP")) {
            let row = row.name.as_str();
            if let (Some(orig), Some(x8), Some(all)) = (
                t.get(row, "original"),
                t.get(row, "x8 labels"),
                t.get(row, "100% replaced"),
            ) {
                out.push(claim(
                    "Table 2",
                    &format!("{row} loses under 10 points with x8 labels"),
                    orig - x8 < 10.0,
                    format!("{orig:.1} -> {x8:.1}"),
                ));
                out.push(claim(
                    "Table 2",
                    &format!(
                        "{row} loses under 20 points with every label replaced by its nearest \
                         unseen label"
                    ),
                    orig - all < 20.0,
                    format!("{orig:.1} -> {all:.1}"),
                ));
            }
        }
    }
    if let Some(t) = find(tables, "table3") {
        let full = "SpikeCLIP (full recipe)";
        let own = own_data(t);
        if let (Some(snn), Some(ann)) =
            (mean(t, full, &own), mean(t, "ScratchCLIP (ANN twin)", &own))
        {
            out.push(claim(
                "Table 3",
                &format!(
                    "the SNN is within 5 points of its ANN twin ({})",
                    own.join(", ")
                ),
                (ann - snn) <= FEW_POINTS,
                format!("SpikeCLIP {snn:.1}, ScratchCLIP {ann:.1}"),
            ));
        }
        for (row, cols, text) in [
            ("w/o pre-training", &own, "pre-training helps"),
            ("w/o fine-tuning", &own, "fine-tuning helps on its labels"),
            (
                "w/o KL (lambda = 0)",
                &other_data(t, "renamed labels"),
                "the KL term helps on unseen labels",
            ),
        ] {
            if let (Some(with), Some(without)) = (mean(t, full, cols), mean(t, row, cols)) {
                out.push(claim(
                    "Table 3",
                    text,
                    with > without,
                    format!("{}: full {with:.1}, {row} {without:.1}", cols.join(", ")),
                ));
            }
        }
    }
    if let Some(t) = find(tables, "table4") {
        let cols = other_data(t, "unseen pairs");
        let zero = mean(t, "lambda = 0", &cols);
        let best = t
            .rows
            .iter()
            .filter(|r| r.name != "lambda = 0")
            .filter_map(|r| mean(t, &r.name, &cols).map(|v| (r.name.clone(), v)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let (Some(zero), Some((name, v))) = (zero, best) {
            out.push(claim(
                "Table 4",
                "some lambda > 0 beats lambda = 0 on data other than the fine-tuning set",
                v > zero,
                format!(
                    "{}: lambda = 0 {zero:.1}, best {name} {v:.1}",
                    cols.join(", ")
                ),
            ));
        }
    }
    if let Some(t) = find(tables, "table5") {
        let col = "seen pairs";
        if let (Some(mlp), Some(transformer)) = (
            t.get("MLP (SpikeCLIP's)", col),
            t.get("spiking transformer", col),
        ) {
            out.push(claim(
                "Table 5",
                "the MLP text encoder is within 5 points of the spiking transformer",
                transformer - mlp <= FEW_POINTS,
                format!("{col}: MLP {mlp:.1}, transformer {transformer:.1}"),
            ));
        }
    }
    if let Some(t) = find(tables, "table6") {
        if let (Some(tdw), Some(mean)) = (t.get("TDW", "seen pairs"), t.get("Mean", "seen pairs")) {
            out.push(claim(
                "Table 6",
                "the TDW readout is at least as good as the mean",
                tdw >= mean,
                format!("seen pairs: TDW {tdw:.1}, mean {mean:.1}"),
            ));
        }
    }
    if let Some(t) = find(tables, "table8") {
        let mean = |col: &str| -> Option<f64> {
            let v: Vec<f64> = t.rows.iter().filter_map(|r| t.get(&r.name, col)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        if let (Some(snn), Some(ann)) = (mean("SpikeCLIP"), mean("ScratchCLIP")) {
            out.push(claim(
                "Table 8",
                "after pre-training only, SpikeCLIP is within 5 points of ScratchCLIP",
                ann - snn <= FEW_POINTS,
                format!(
                    "mean over the {} rows: SpikeCLIP {snn:.1}, ScratchCLIP {ann:.1}",
                    t.rows.len()
                ),
            ));
        }
    }
    if let Some(t) = find(tables, "figure6") {
        let series = |prefix: &str, col: &str| -> Vec<f64> {
            t.rows
                .iter()
                .filter(|r| r.name.starts_with(prefix))
                .filter_map(|r| t.get(&r.name, col))
                .collect()
        };
        let size = series("size", "seen pairs");
        if let (Some(first), Some(last)) = (size.first(), size.last()) {
            out.push(claim(
                "Figure 6",
                "more pre-training images give higher accuracy",
                last > first,
                format!("seen pairs: smallest set {first:.1}, largest {last:.1}"),
            ));
        }
        let overlap = series("overlap", "unseen pairs");
        if let (Some(first), Some(last)) = (overlap.first(), overlap.last()) {
            out.push(claim(
                "Figure 6",
                "overlap between pre-training and evaluation data raises accuracy",
                last > first,
                format!("unseen pairs: no overlap {first:.1}, most overlap {last:.1}"),
            ));
        }
    }
    out
}
