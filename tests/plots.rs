//! The plots decoded back: the spike raster's dark cells are exactly the spikes drawn, and each
//! panel of a panel plot holds its own curve at its own scale.

use std::path::Path;

use image::RgbImage;
use spikeclip::plot::{
    line_plot, panel_plot, raster_plot, Labels, Panel, PixelRect, Raster, RasterLayout, Series,
    SILENT, SPIKE,
};

fn decode(path: &Path) -> RgbImage {
    image::open(path).unwrap().to_rgb8()
}

fn pixels(img: &RgbImage, (x0, y0, x1, y1): PixelRect) -> impl Iterator<Item = [u8; 3]> + '_ {
    (y0..y1).flat_map(move |y| (x0..x1).map(move |x| img.get_pixel(x, y).0))
}

/// A layer of `neurons` neurons over `steps` steps whose spikes `fires(i, t)` says.
fn layer(name: &str, neurons: usize, steps: usize, fires: impl Fn(usize, usize) -> bool) -> Raster {
    let spikes: Vec<Vec<bool>> = (0..neurons)
        .map(|i| (0..steps).map(|t| fires(i, t)).collect())
        .collect();
    let fired = spikes.iter().flatten().filter(|&&s| s).count();
    Raster {
        layer: name.into(),
        firing_rate: fired as f64 / (neurons * steps) as f64,
        neurons: (0..neurons).map(|i| 3 * i).collect(),
        spikes,
    }
}

/// Every pixel of every cell is the spike colour where the layer spiked and the silent colour
/// where it did not; returns the number of dark pixels inside the blocks.
fn check_cells(img: &RgbImage, layers: &[Raster]) -> usize {
    let layout = RasterLayout::new(layers);
    assert_eq!(img.dimensions(), layout.size());
    let mut dark = 0;
    for (l, r) in layers.iter().enumerate() {
        for (i, row) in r.spikes.iter().enumerate() {
            for (t, &spike) in row.iter().enumerate() {
                let c = if spike { SPIKE } else { SILENT };
                let want = [c.0, c.1, c.2];
                for p in pixels(img, layout.cell(l, i, t)) {
                    assert_eq!(p, want, "layer {l} neuron {i} step {t}");
                }
            }
        }
        dark += pixels(img, layout.block(l))
            .filter(|p| p.iter().all(|&c| c < 100))
            .count();
    }
    dark
}

#[test]
fn the_raster_is_dark_exactly_where_neurons_spiked() {
    let dir = tempfile::tempdir().unwrap();
    let layers = [
        layer("tokenizer.lif1", 256, 4, |i, t| (i + t) % 7 == 0),
        layer("tokenizer.lif2", 5, 4, |i, t| i == t),
        layer("silent", 40, 4, |_, _| false),
    ];
    let path = dir.path().join("raster.png");
    raster_plot(&path, "known pattern", &layers).unwrap();
    let img = decode(&path);
    let dark = check_cells(&img, &layers);
    let layout = RasterLayout::new(&layers);
    let cell_area = |l: usize| {
        let (x0, y0, x1, y1) = layout.cell(l, 0, 0);
        ((x1 - x0) * (y1 - y0)) as usize
    };
    let spikes = |l: usize| layers[l].spikes.iter().flatten().filter(|&&s| s).count();
    assert_eq!(
        dark,
        (0..3).map(|l| spikes(l) * cell_area(l)).sum::<usize>()
    );
    // A cell is at least 3 pixels wide at 256 neurons, so every spike is visible.
    assert!(cell_area(0) >= 3 * 10);

    let none = [layer("none", 256, 4, |_, _| false)];
    raster_plot(&path, "no spikes", &none).unwrap();
    assert_eq!(check_cells(&decode(&path), &none), 0);
    assert!(raster_plot(&path, "empty", &[]).is_err());
}

#[test]
fn each_panel_holds_its_own_curve_at_its_own_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("curves.png");
    let curve = |name: &str, from: f64, to: f64| Series {
        name: name.into(),
        points: (0..10)
            .map(|e| (e as f64, from + (to - from) * e as f64 / 9.0))
            .collect(),
    };
    let labels = |title| Labels {
        title,
        x: "epoch",
        y: "mean loss",
    };
    // The scales: distillation 0.6 down to 0.02, fine-tuning about 4.6.
    let panels = [
        Panel {
            labels: labels("distill_text"),
            series: vec![curve("SpikeCLIP", 0.6, 0.02)],
        },
        Panel {
            labels: labels("distill_image"),
            series: vec![curve("SpikeCLIP", 0.5, 0.1)],
        },
        Panel {
            labels: labels("finetune"),
            series: vec![curve("SpikeCLIP", 4.7, 4.5)],
        },
    ];
    let areas = panel_plot(&path, "Training loss per epoch", &panels).unwrap();
    assert_eq!(areas.len(), 3);
    let img = decode(&path);
    let colour = {
        use plotters::style::{Color, Palette, Palette99};
        let c = Palette99::pick(0).to_rgba();
        [c.0, c.1, c.2]
    };
    for (panel, &(x0, y0, x1, y1)) in panels.iter().zip(&areas) {
        let rows: Vec<u32> = (y0..y1)
            .filter(|&y| (x0..x1).any(|x| img.get_pixel(x, y).0 == colour))
            .collect();
        let title = panel.labels.title;
        assert!(!rows.is_empty(), "{title}: no curve in its panel");
        // Each curve spans most of its own panel's height instead of a sliver of a shared axis.
        let span = rows.last().unwrap() - rows.first().unwrap();
        assert!(
            span * 2 > y1 - y0,
            "{title}: the curve spans {span} of {} rows",
            y1 - y0
        );
    }
    // Panels do not overlap.
    for w in areas.windows(2) {
        assert!(w[0].2 <= w[1].0, "{areas:?}");
    }
    // A single panel is still a plain line plot.
    line_plot(&path, labels("one"), &[curve("a", 1.0, 2.0)]).unwrap();
    assert!(line_plot(&path, labels("none"), &[]).is_err());
}
