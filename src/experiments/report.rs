//! The reproduction report: tables in the paper's layout (rows and columns named as there),
//! cells as mean and spread over seeds, and one verdict per claim of the paper.

use std::fmt::Write as _;

use serde::Serialize;

/// A table cell: top-1 accuracy in percent, with its standard deviation over seeds when there
/// were several.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cell {
    pub mean: f64,
    pub std: Option<f64>,
}

impl Cell {
    /// One measurement (a fraction in [0, 1]) as percent.
    pub fn one(fraction: f64) -> Self {
        Self {
            mean: 100.0 * fraction,
            std: None,
        }
    }

    /// Mean and sample standard deviation of several fractions, as percent.
    pub fn over(fractions: &[f64]) -> Self {
        let n = fractions.len().max(1) as f64;
        let mean = fractions.iter().sum::<f64>() / n;
        let std = (fractions.len() > 1).then(|| {
            let var = fractions.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / (n - 1.0);
            100.0 * var.sqrt()
        });
        Self {
            mean: 100.0 * mean,
            std,
        }
    }

    fn markdown(&self) -> String {
        match self.std {
            Some(s) => format!("{:.1} ± {:.1}", self.mean, s),
            None => format!("{:.1}", self.mean),
        }
    }
}

/// One row: its name and one cell per column.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    pub cells: Vec<Cell>,
}

/// A table of the paper, with our figures.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// `table2`, `table3`, ... as `--only` names them.
    pub id: String,
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    /// How the figures were obtained, for the reader.
    pub notes: Vec<String>,
}

impl Table {
    pub fn new(id: &str, title: &str, columns: &[&str]) -> Self {
        Self {
            id: id.to_string(),
            title: title.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn push(&mut self, name: &str, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(Row {
            name: name.to_string(),
            cells,
        });
    }

    /// The mean of the cell in row `row`, column `col` (both by name).
    pub fn get(&self, row: &str, col: &str) -> Option<f64> {
        let c = self.columns.iter().position(|n| n == col)?;
        let r = self.rows.iter().find(|r| r.name == row)?;
        Some(r.cells.get(c)?.mean)
    }

    fn markdown(&self, s: &mut String) {
        let _ = writeln!(s, "## {}\n", self.title);
        let _ = writeln!(s, "| | {} |", self.columns.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(self.columns.len()));
        for r in &self.rows {
            let cells: Vec<String> = r.cells.iter().map(Cell::markdown).collect();
            let _ = writeln!(s, "| {} | {} |", r.name, cells.join(" | "));
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n- {n}");
        }
        let _ = writeln!(s);
    }
}

/// A claim of the paper and whether our figures bear it out.
#[derive(Debug, Clone, Serialize)]
pub struct Claim {
    pub table: String,
    pub claim: String,
    pub held: bool,
    /// The figures the verdict rests on.
    pub evidence: String,
}

/// Everything `report.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub data: String,
    pub tables: Vec<Table>,
    pub claims: Vec<Claim>,
    /// The labels the robustness study chose, per setting, so a reader can judge them.
    pub chosen_labels: Vec<ChosenLabels>,
    pub omitted: Vec<String>,
    pub seconds: f64,
    pub config: serde_json::Value,
}

/// The labels one robustness setting added or substituted, for its first seed.
#[derive(Debug, Clone, Serialize)]
pub struct ChosenLabels {
    pub setting: String,
    /// Added distractors, or `original -> replacement` pairs.
    pub labels: Vec<String>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# SpikeCLIP reproduction on {}\n", self.data);
        let _ = writeln!(
            s,
            "Zero-shot top-1 accuracy (%); `a ± b` is mean ± standard deviation over seeds. \
             Run time {:.0} s.\n",
            self.seconds
        );
        if !self.claims.is_empty() {
            let _ = writeln!(s, "## Claims\n");
            let _ = writeln!(s, "| | claim | held | evidence |");
            let _ = writeln!(s, "|---|---|---|---|");
            for c in &self.claims {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    c.table,
                    c.claim,
                    if c.held { "yes" } else { "**no**" },
                    c.evidence
                );
            }
            let _ = writeln!(s);
        }
        for t in &self.tables {
            t.markdown(&mut s);
        }
        if !self.chosen_labels.is_empty() {
            let _ = writeln!(s, "## Labels chosen for Table 2 (first seed)\n");
            for c in &self.chosen_labels {
                let _ = writeln!(s, "- **{}**: {}", c.setting, c.labels.join(", "));
            }
            let _ = writeln!(s);
        }
        for o in &self.omitted {
            let _ = writeln!(s, "- Not run: {o}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_give_percent_and_sample_std() {
        let c = Cell::over(&[0.5, 0.7]);
        assert!((c.mean - 60.0).abs() < 1e-9);
        assert!((c.std.unwrap() - 100.0 * 0.02f64.sqrt()).abs() < 1e-9);
        assert_eq!(Cell::over(&[0.25]).std, None);
        assert_eq!(Cell::one(0.25).markdown(), "25.0");
    }

    #[test]
    fn tables_render_in_their_layout_and_look_up_by_name() {
        let mut t = Table::new("table6", "Readouts", &["seen", "unseen"]);
        t.push("TDW", vec![Cell::one(0.5), Cell::over(&[0.1, 0.3])]);
        assert_eq!(t.get("TDW", "unseen"), Some(20.0));
        assert_eq!(t.get("Mean", "seen"), None);
        let mut s = String::new();
        t.markdown(&mut s);
        assert!(s.contains("| | seen | unseen |"), "{s}");
        assert!(s.contains("| TDW | 50.0 | 20.0 ± 14.1 |"), "{s}");
    }
}
