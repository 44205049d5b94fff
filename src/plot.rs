//! PNG plots for the reports (energy analysis, training curves), drawn with plotters on a
//! bitmap so that a report needs no browser or Python. The font ships inside the binary, since
//! plotters' ab_glyph backend has no system fonts to fall back on.

use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

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

/// Spikes of a sample of one layer's neurons for one input: `spikes[i][t]` is neuron
/// `neurons[i]` at step t.
#[derive(Debug, Clone, PartialEq)]
pub struct Raster {
    pub neurons: Vec<usize>,
    pub spikes: Vec<Vec<bool>>,
}

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
    anyhow::ensure!(
        series.iter().any(|s| !s.points.is_empty()),
        "line plot {}: no points to draw",
        path.display()
    );
    let all = || series.iter().flat_map(|s| s.points.iter());
    let xs = padded_range(all().map(|p| p.0));
    let ys = padded_range(all().map(|p| p.1));
    draw_png(path, (900, 560), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(labels.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(xs, ys)?;
        chart
            .configure_mesh()
            .x_desc(labels.x)
            .y_desc(labels.y)
            .label_style((FONT, 14))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    colour.stroke_width(2),
                ))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
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

/// A spike raster: a dot for every spike of every sampled neuron at every time step.
pub fn raster_plot(path: &Path, title: &str, raster: &Raster) -> anyhow::Result<()> {
    let steps = raster.spikes.iter().map(Vec::len).max().unwrap_or(0);
    anyhow::ensure!(
        steps > 0 && !raster.neurons.is_empty(),
        "raster plot {}: no neurons or no time steps",
        path.display()
    );
    let n = raster.neurons.len();
    draw_png(path, (900, 600), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((0..steps - 1).into_segmented(), (0..n - 1).into_segmented())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(steps.min(16))
            .x_label_formatter(&|v| segment_label(v, steps, |t| t.to_string()))
            .y_labels(n.min(16))
            .y_label_formatter(&|v| segment_label(v, n, |i| raster.neurons[i].to_string()))
            .x_desc("time step")
            .y_desc("sampled neuron")
            .label_style((FONT, 14))
            .draw()?;
        let dots = raster.spikes.iter().enumerate().flat_map(|(i, row)| {
            row.iter()
                .enumerate()
                .filter(|(_, &s)| s)
                .map(move |(t, _)| {
                    let mut dot = Rectangle::new(
                        [
                            (SegmentValue::Exact(t), SegmentValue::Exact(i)),
                            (SegmentValue::Exact(t + 1), SegmentValue::Exact(i + 1)),
                        ],
                        BLACK.filled(),
                    );
                    dot.set_margin(1, 1, 2, 2);
                    dot
                })
        });
        chart.draw_series(dots)?;
        Ok(())
    })
}
