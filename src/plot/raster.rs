//! The spike raster: each LIF layer a block of sampled neurons (across) by time steps (down),
//! one cell per neuron and step, dark where it spiked, on a light block so that a silent layer
//! still shows as a block. Cells are whole pixels of a fixed layout, so a reader sees every
//! spike however many neurons a layer has, and a test can check each cell's pixels.

use plotters::prelude::*;
use std::path::Path;

use super::{draw_png, DrawResult, PixelRect, FONT};

/// One LIF layer's spikes for one input: `spikes[i][t]` is neuron `neurons[i]` (an index into
/// the layer's flattened neurons) at step t, a sample of the layer; `firing_rate` is the whole
/// layer's for that input.
#[derive(Debug, Clone, PartialEq)]
pub struct Raster {
    pub layer: String,
    pub firing_rate: f64,
    pub neurons: Vec<usize>,
    pub spikes: Vec<Vec<bool>>,
}

impl Raster {
    fn steps(&self) -> usize {
        self.spikes.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// Colour of a spike.
pub const SPIKE: RGBColor = RGBColor(0, 0, 0);
/// Colour of a block's cells without a spike.
pub const SILENT: RGBColor = RGBColor(228, 228, 228);

/// Widest block, in pixels: 256 neurons at 3 pixels each.
const BLOCK_WIDTH: u32 = 768;
/// Widest cell, for layers with few sampled neurons.
const MAX_CELL_WIDTH: u32 = 24;
const CELL_HEIGHT: u32 = 10;
/// Left margin, where the time-step labels go.
const LEFT: u32 = 44;
/// Right margin, where the firing rates go.
const RIGHT: u32 = 130;
/// Title and axis note above the first block.
const TOP: u32 = 56;
/// Layer name above each block.
const LABEL: u32 = 22;
const GAP: u32 = 14;
const BOTTOM: u32 = 16;

/// Where [`raster_plot`] puts each layer's block and each cell, in pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct RasterLayout {
    /// Per layer: the block's top-left corner, its cell width, neurons and steps.
    blocks: Vec<Block>,
    size: (u32, u32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Block {
    x: u32,
    y: u32,
    cell_width: u32,
    neurons: usize,
    steps: usize,
}

impl RasterLayout {
    pub fn new(layers: &[Raster]) -> Self {
        let mut y = TOP;
        let blocks = layers
            .iter()
            .map(|r| {
                let neurons = r.neurons.len().max(1) as u32;
                let block = Block {
                    x: LEFT,
                    y: y + LABEL,
                    cell_width: (BLOCK_WIDTH / neurons).clamp(1, MAX_CELL_WIDTH),
                    neurons: r.neurons.len(),
                    steps: r.steps(),
                };
                y += LABEL + block.steps as u32 * CELL_HEIGHT + GAP;
                block
            })
            .collect();
        Self {
            blocks,
            size: (LEFT + BLOCK_WIDTH + RIGHT, y + BOTTOM),
        }
    }

    /// The image's width and height.
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// The block of layer `l`.
    pub fn block(&self, l: usize) -> PixelRect {
        let b = &self.blocks[l];
        (
            b.x,
            b.y,
            b.x + b.cell_width * b.neurons as u32,
            b.y + CELL_HEIGHT * b.steps as u32,
        )
    }

    /// The cell of sampled neuron `i` at step `t` of layer `l`.
    pub fn cell(&self, l: usize, i: usize, t: usize) -> PixelRect {
        let b = &self.blocks[l];
        let x = b.x + b.cell_width * i as u32;
        let y = b.y + CELL_HEIGHT * t as u32;
        (x, y, x + b.cell_width, y + CELL_HEIGHT)
    }
}

/// Paints exactly the pixels of `r`, one by one: drawn as plotters' filled rectangles, the
/// 3-pixel spike cells came out narrower than their cells (`tests/plots.rs` saw it).
fn fill_pixels(
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    (x0, y0, x1, y1): PixelRect,
    colour: RGBColor,
) -> DrawResult {
    for y in y0..y1 {
        for x in x0..x1 {
            root.draw_pixel((x as i32, y as i32), &colour)?;
        }
    }
    Ok(())
}

/// Draws `layers` (each one input's spikes of one LIF layer) as stacked blocks, laid out as
/// [`RasterLayout::new`] says, with each layer's name above its block and its firing rate
/// beside it.
pub fn raster_plot(path: &Path, title: &str, layers: &[Raster]) -> anyhow::Result<()> {
    let drawable = |r: &Raster| {
        (1..=BLOCK_WIDTH as usize).contains(&r.neurons.len())
            && r.steps() > 0
            && r.spikes.len() == r.neurons.len()
    };
    anyhow::ensure!(
        !layers.is_empty() && layers.iter().all(drawable),
        "raster plot {}: every layer needs 1 to {BLOCK_WIDTH} neurons, time steps, and one spike \
         row per neuron",
        path.display()
    );
    let layout = RasterLayout::new(layers);
    draw_png(path, layout.size(), |root| -> DrawResult {
        let text = |size: u32| (FONT, size).into_font().color(&BLACK);
        root.draw(&Text::new(title, (LEFT as i32, 8), text(20)))?;
        root.draw(&Text::new(
            "each block: sampled neurons across, time steps down; dark = spike",
            (LEFT as i32, 34),
            text(13),
        ))?;
        for (l, r) in layers.iter().enumerate() {
            let (x0, y0, x1, _) = layout.block(l);
            root.draw(&Text::new(
                format!("{} ({} of its neurons)", r.layer, r.neurons.len()),
                (x0 as i32, (y0 - LABEL + 4) as i32),
                text(14),
            ))?;
            root.draw(&Text::new(
                format!("{:.1} % fired", 100.0 * r.firing_rate),
                ((x1 + 10) as i32, y0 as i32),
                text(14),
            ))?;
            fill_pixels(root, layout.block(l), SILENT)?;
            for t in 0..r.steps() {
                root.draw(&Text::new(
                    format!("t{t}"),
                    (8, (y0 + CELL_HEIGHT * t as u32) as i32),
                    text(10),
                ))?;
            }
            for (i, row) in r.spikes.iter().enumerate() {
                for (t, _) in row.iter().enumerate().filter(|(_, &s)| s) {
                    fill_pixels(root, layout.cell(l, i, t), SPIKE)?;
                }
            }
        }
        Ok(())
    })
}
