//! STL-10's binary version, read natively. Its pixel arrays were written from MATLAB, so
//! each 96x96 channel plane is column-major; the reader transposes them to row-major.

use std::path::Path;

use anyhow::{bail, Context};

use super::RawImages;

const SIDE: usize = 96;
const PLANE: usize = SIDE * SIDE;

/// Reads `train_X.bin`/`train_y.bin` or `test_X.bin`/`test_y.bin`; labels are stored 1..=10
/// and returned 0..=9. Mismatched counts, truncated images or labels out of range are errors
/// naming the file.
pub fn load(dir: &Path, train: bool) -> anyhow::Result<RawImages> {
    let split = if train { "train" } else { "test" };
    let x_path = dir.join(format!("{split}_X.bin"));
    let y_path = dir.join(format!("{split}_y.bin"));
    let x = std::fs::read(&x_path).with_context(|| format!("reading {}", x_path.display()))?;
    let y = std::fs::read(&y_path).with_context(|| format!("reading {}", y_path.display()))?;
    if !x.len().is_multiple_of(3 * PLANE) {
        bail!(
            "{}: {} bytes is not a whole number of 96x96 RGB images (truncated?)",
            x_path.display(),
            x.len()
        );
    }
    if x.len() / (3 * PLANE) != y.len() {
        bail!(
            "{} holds {} images but {} holds {} labels",
            x_path.display(),
            x.len() / (3 * PLANE),
            y_path.display(),
            y.len()
        );
    }
    let labels = y
        .iter()
        .enumerate()
        .map(|(i, &l)| match l {
            1..=10 => Ok(u32::from(l) - 1),
            _ => bail!("{}: label {i} is {l}, not in 1..=10", y_path.display()),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut pixels = vec![0u8; x.len()];
    for (src, dst) in x.chunks_exact(PLANE).zip(pixels.chunks_exact_mut(PLANE)) {
        for col in 0..SIDE {
            for row in 0..SIDE {
                dst[row * SIDE + col] = src[col * SIDE + row];
            }
        }
    }
    Ok(RawImages {
        pixels,
        height: SIDE,
        width: SIDE,
        labels,
    })
}
