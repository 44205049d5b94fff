//! PNG plots for the reports (energy analysis, training curves), drawn with plotters on a
//! bitmap so that a report needs no browser or Python. The font ships inside the binary, since
//! plotters' ab_glyph backend has no system fonts to fall back on.

mod panels;
mod raster;

use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

pub use panels::{panel_plot, Panel};
pub use raster::{raster_plot, Raster, RasterLayout, SILENT, SPIKE};

const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// One named curve of a line plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Axis titles and the plot's caption.
#[derive(Debug, Clone, Copy)]
pub struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// A pixel rectangle of a drawn image: columns `x0..x1`, rows `y0..y1`.
pub type PixelRect = (u32, u32, u32, u32);

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    anyhow::ensure!(ok, "the bundled font assets/DejaVuSans.ttf did not load");
    Ok(())
}

/// Runs a drawing on a fresh white canvas of `size` pixels and saves it to `path`.
fn draw_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> DrawResult,
) -> anyhow::Result<()> {
    register_font()?;
    let result = (|| -> DrawResult {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    result.map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

/// Range of `values` padded so that a flat series still gets a visible axis.
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
    (lo - pad)..(hi + pad)
}

/// The label of the `i`-th of `n` categories at its centre, and none at the segment edges.
fn segment_label(v: &SegmentValue<usize>, n: usize, label: impl Fn(usize) -> String) -> String {
    match v {
        SegmentValue::CenterOf(i) if *i < n => label(*i),
        _ => String::new(),
    }
}

/// Curves such as loss or accuracy against step, one colour and legend entry per series.
pub fn line_plot(path: &Path, labels: Labels, series: &[Series]) -> anyhow::Result<()> {
    let panel = Panel {
        labels: Labels {
            title: "",
            ..labels
        },
        series: series.to_vec(),
    };
    panel_plot(path, labels.title, &[panel])?;
    Ok(())
}

/// One horizontal bar per named value in [0, 1] (e.g. firing rate per layer), top to bottom in
/// the given order; horizontal so that long layer names stay readable.
pub fn bar_plot(path: &Path, labels: Labels, bars: &[(String, f64)]) -> anyhow::Result<()> {
    anyhow::ensure!(!bars.is_empty(), "bar plot {}: no bars", path.display());
    let n = bars.len();
    let longest = bars.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let x_max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let height = (120 + 22 * n).min(4000) as u32;
    draw_png(path, (900, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(labels.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size((longest * 8 + 16) as u32)
            // plotters' integer ranges include their end: n rows are 0..n - 1.
            .build_cartesian_2d(0.0..x_max, (0..n - 1).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|v| segment_label(v, n, |i| bars[n - 1 - i].0.clone()))
            .x_desc(labels.x)
            .y_desc(labels.y)
            .label_style((FONT, 13))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, value))| {
            let row = n - 1 - i;
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(row)),
                    (*value, SegmentValue::Exact(row + 1)),
                ],
                BLUE.mix(0.7).filled(),
            );
            bar.set_margin(3, 3, 0, 0);
            bar
        }))?;
        Ok(())
    })
}
