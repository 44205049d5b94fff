//! Line plots in panels side by side, each with its own axes: curves of very different scales
//! (distillation losses of 0.02-0.6 beside a fine-tuning loss of 4.6) each fill their panel
//! instead of one squashing the others into the floor.

use plotters::prelude::*;
use std::path::Path;

use super::{draw_png, padded_range, DrawResult, Labels, PixelRect, Series, FONT};

/// One panel: its caption and axis titles, and its curves.
#[derive(Debug, Clone)]
pub struct Panel<'a> {
    pub labels: Labels<'a>,
    pub series: Vec<Series>,
}

/// Height of the legend strip below the panels.
const LEGEND: u32 = 36;

/// The colour of each series name, in first-seen order over the panels, so that a name has
/// one colour in every panel and one legend entry.
fn series_colours(panels: &[Panel]) -> Vec<(String, RGBAColor)> {
    let mut names: Vec<String> = Vec::new();
    for s in panels.iter().flat_map(|p| &p.series) {
        if !names.contains(&s.name) {
            names.push(s.name.clone());
        }
    }
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, Palette99::pick(i).to_rgba()))
        .collect()
}

/// Draws `panels` side by side under `title`, a legend of every series below them, and returns
/// each panel's plotting area in pixels (where its curves lie).
pub fn panel_plot(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<Vec<PixelRect>> {
    anyhow::ensure!(
        panels
            .iter()
            .flat_map(|p| &p.series)
            .any(|s| !s.points.is_empty()),
        "line plot {}: no points to draw",
        path.display()
    );
    let colours = series_colours(panels);
    let colour_of = |name: &str| {
        colours
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| *c)
            .expect("every series has a colour")
    };
    let panel_width = if panels.len() == 1 { 900 } else { 440 };
    let size = (panel_width * panels.len() as u32, 560 + LEGEND);
    let mut areas = Vec::new();
    draw_png(path, size, |root| -> DrawResult {
        let root = root.titled(title, (FONT, 22))?;
        let (plots, legend) = root.split_vertically(root.dim_in_pixel().1 - LEGEND);
        for (panel, area) in panels.iter().zip(plots.split_evenly((1, panels.len()))) {
            let all = || panel.series.iter().flat_map(|s| s.points.iter());
            let mut chart = ChartBuilder::on(&area)
                .caption(panel.labels.title, (FONT, 17))
                .margin(12)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(
                    padded_range(all().map(|p| p.0)),
                    padded_range(all().map(|p| p.1)),
                )?;
            chart
                .configure_mesh()
                .x_desc(panel.labels.x)
                .y_desc(panel.labels.y)
                .label_style((FONT, 14))
                .draw()?;
            for s in &panel.series {
                let colour = colour_of(&s.name);
                chart.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    colour.stroke_width(2),
                ))?;
            }
            let (xs, ys) = chart.plotting_area().get_pixel_range();
            areas.push((
                xs.start as u32,
                ys.start as u32,
                xs.end as u32,
                ys.end as u32,
            ));
        }
        let mut x = 16;
        for (name, colour) in &colours {
            let y = (LEGEND / 2) as i32;
            legend.draw(&PathElement::new(
                vec![(x, y), (x + 24, y)],
                colour.stroke_width(3),
            ))?;
            legend.draw(&Text::new(name.as_str(), (x + 30, y - 8), (FONT, 14)))?;
            x += 50 + 8 * name.len() as i32;
        }
        Ok(())
    })?;
    Ok(areas)
}
