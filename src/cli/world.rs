//! `spikeclip world`: writes sample images of the built-in world with their captions, so a
//! person can see what the student is trained and tested on.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use image::{Rgb, RgbImage};

use crate::data::world::render::SIDE;
use crate::data::world::{Split, World, WorldConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Directory for grid_train.png, grid_unseen.png and captions.txt (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The world's seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per grid.
    #[arg(long, default_value_t = 64)]
    count: usize,
}

/// Each 32x32 image is enlarged this many times in the grid.
const ZOOM: u32 = 4;
const GAP: u32 = 2;

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let world = World::new(WorldConfig {
        seed: args.seed,
        train_images: args.count,
        test_images: args.count,
        ..Default::default()
    });
    let mut captions = String::new();
    for (split, file) in [
        (Split::Pretrain, "grid_pretrain.png"),
        (Split::Train, "grid_train.png"),
        (Split::TestUnseen, "grid_unseen.png"),
    ] {
        let path = args.out.join(file);
        let columns = (args.count as f64).sqrt().ceil() as u32;
        let rows = (args.count as u32).div_ceil(columns);
        let tile = SIDE as u32 * ZOOM + GAP;
        let mut grid = RgbImage::from_pixel(columns * tile, rows * tile, Rgb([255, 255, 255]));
        for i in 0..args.count {
            let sample = world.sample(split, i);
            let (x0, y0) = ((i as u32 % columns) * tile, (i as u32 / columns) * tile);
            for (x, y, p) in image::imageops::resize(
                &sample.rgb_image(),
                SIDE as u32 * ZOOM,
                SIDE as u32 * ZOOM,
                image::imageops::FilterType::Nearest,
            )
            .enumerate_pixels()
            {
                grid.put_pixel(x0 + x, y0 + y, *p);
            }
            writeln!(
                captions,
                "{file} #{i} (row {}, column {}): {}",
                i as u32 / columns,
                i as u32 % columns,
                sample.description()
            )?;
        }
        grid.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let path = args.out.join("captions.txt");
    std::fs::write(&path, captions).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {} images per grid to {} (grid_pretrain.png: pre-training images, grid_train.png: seen pairs, grid_unseen.png: held-out pairs, captions.txt)",
        args.count,
        args.out.display()
    );
    Ok(())
}
