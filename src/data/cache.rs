//! The teacher-feature cache: the teacher runs once per dataset, and training reads its
//! features (f16) and the 32x32 student inputs (f16, finer than the 8-bit pixels they come
//! from) from memory-mapped safetensors shards.
//!
//! Layout of a cache directory: `job.json` (what is being cached, checked on resume),
//! `shard-NNNNN.safetensors` (written atomically, so a killed run keeps its finished shards)
//! and `index.json` (shard files and row counts, written last).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::sources::ImageSource;
use super::{ImageBatch, ImageFeatureSet, TextBatch, TextFeatureSet};
use crate::dist;
use crate::progress::Progress;
use crate::teacher::preprocess::{self, Preprocessor, STUDENT_SIZE};
use crate::teacher::{ImageTeacher, TextTeacher, Tokenize};
use crate::train::checkpoint::write_atomic_with;

/// Rows per shard and per teacher call.
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    pub shard_rows: usize,
    pub batch: usize,
    pub progress: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            shard_rows: 4096,
            batch: 64,
            progress: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Index {
    /// Identifies the job (dataset, teacher, sizes); a resume must match it.
    job: serde_json::Value,
    class_names: Vec<String>,
    shards: Vec<ShardEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ShardEntry {
    file: String,
    rows: usize,
}

/// One shard's tensors, keyed by field name.
type ShardTensors = HashMap<String, Tensor>;

/// Runs `make` for each shard not yet on disk, then writes the index. Returns rows cached.
///
/// In a job of several processes (`mpirun`) shard `s` is made by rank `s % ranks`, so every
/// rank runs the teacher on its own part of the data; a shard's bytes depend only on its rows,
/// so the cache is the one a single process writes, and a resumed job (with any number of
/// ranks) skips the shards already on disk. Rank 0 writes `job.json` and `index.json`.
fn run_shards(
    out: &Path,
    job: serde_json::Value,
    class_names: Vec<String>,
    total: usize,
    opts: &CacheOptions,
    mut make: impl FnMut(std::ops::Range<usize>) -> Result<ShardTensors>,
) -> Result<usize> {
    ensure!(
        opts.shard_rows > 0 && opts.batch > 0,
        "shard and batch sizes must be positive"
    );
    let ranks = dist::collective();
    if dist::is_writer() {
        claim_job(out, &job)?;
    }
    ranks.barrier();
    if !dist::is_writer() {
        claim_job(out, &job)?;
    }
    let n_shards = total.div_ceil(opts.shard_rows);
    let mine: Vec<usize> = (ranks.rank()..n_shards).step_by(ranks.size()).collect();
    let range = |s: usize| s * opts.shard_rows..((s + 1) * opts.shard_rows).min(total);
    let mut bar = Progress::new(
        out.display().to_string(),
        mine.iter().map(|&s| range(s).len()).sum(),
        opts.progress,
    );
    // Rows kept per shard, this rank's shards filled in; summed over the ranks below (exact:
    // whole numbers far below 2^53).
    let mut rows = vec![0f64; n_shards];
    for &s in &mine {
        let path = out.join(shard_file(s));
        let len = range(s).len();
        rows[s] = if path.exists() {
            shard_rows(&path)?
        } else {
            let tensors = make(range(s))?;
            let kept = tensors
                .get("teacher")
                .map(|t| t.dim(0))
                .transpose()?
                .unwrap_or(0);
            write_atomic_with(&path, |p| Ok(candle_core::safetensors::save(&tensors, p)?))?;
            kept
        } as f64;
        bar.inc(len);
    }
    bar.finish();
    ranks.all_reduce_sum_f64(&mut rows);
    let index = Index {
        job,
        class_names,
        shards: rows
            .iter()
            .enumerate()
            .map(|(s, &r)| ShardEntry {
                file: shard_file(s),
                rows: r as usize,
            })
            .collect(),
    };
    if dist::is_writer() {
        write_atomic_with(&out.join("index.json"), |p| {
            Ok(std::fs::write(p, serde_json::to_string_pretty(&index)?)?)
        })?;
    }
    // No rank goes on (to read the cache, say) before the index is on disk.
    ranks.barrier();
    Ok(index.shards.iter().map(|s| s.rows).sum())
}

fn shard_file(s: usize) -> String {
    format!("shard-{s:05}.safetensors")
}

/// Makes `out` the directory of `job`: creates it and its `job.json`, or checks that the one
/// there describes the same job (a resume).
fn claim_job(out: &Path, job: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let job_path = out.join("job.json");
    if job_path.exists() {
        let text = std::fs::read_to_string(&job_path)
            .with_context(|| format!("reading {}", job_path.display()))?;
        let old: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a cache job file", job_path.display()))?;
        ensure!(
            &old == job,
            "{} holds a different job ({old}); use another --out",
            out.display()
        );
        Ok(())
    } else {
        write_atomic_with(&job_path, |p| {
            Ok(std::fs::write(p, serde_json::to_string_pretty(job)?)?)
        })
    }
}

fn shard_rows(path: &Path) -> Result<usize> {
    let t = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| {
        format!(
            "{}: unreadable shard (delete it to recompute)",
            path.display()
        )
    })?;
    Ok(t.get("teacher")
        .with_context(|| format!("{}: no teacher tensor", path.display()))?
        .dim(0)?)
}

/// Runs the image teacher over `source`, storing teacher features, student inputs and labels.
/// Unreadable images are skipped with a warning naming them; the count is returned.
pub fn cache_images(
    source: &dyn ImageSource,
    teacher: &dyn ImageTeacher,
    pre: &Preprocessor,
    job: serde_json::Value,
    out: &Path,
    opts: &CacheOptions,
) -> Result<(usize, usize)> {
    let (h, w) = (pre.crop_size.height as usize, pre.crop_size.width as usize);
    let mut skipped = 0;
    let rows = run_shards(
        out,
        job,
        source.class_names().to_vec(),
        source.len(),
        opts,
        |range| {
            let decoded: Vec<_> = range
                .clone()
                .into_par_iter()
                .map(|i| {
                    source
                        .image(i)
                        .map(|img| (pre.pixels_rgb(&img), source.label(i)))
                })
                .collect();
            let mut good = Vec::new();
            for (i, r) in range.zip(decoded) {
                match r {
                    Ok(x) => good.push(x),
                    Err(e) => {
                        skipped += 1;
                        tracing::warn!("skipping item {i}: {e:#}");
                    }
                }
            }
            let (mut inputs, mut feats) = (Vec::new(), Vec::new());
            let labels: Vec<u32> = good.iter().map(|g| g.1).collect();
            for chunk in good.chunks(opts.batch) {
                let pixels = preprocess::batch(
                    chunk.iter().map(|g| g.0.clone()).collect(),
                    h,
                    w,
                    &Device::Cpu,
                )?;
                feats.push(teacher.image_features(&pixels)?);
                inputs.push(preprocess::student_input(&pixels, STUDENT_SIZE)?);
            }
            let n = labels.len();
            let mut t = ShardTensors::new();
            t.insert("labels".into(), Tensor::from_vec(labels, n, &Device::Cpu)?);
            if n > 0 {
                t.insert(
                    "teacher".into(),
                    Tensor::cat(&feats, 0)?.to_dtype(DType::F16)?,
                );
                t.insert(
                    "inputs".into(),
                    Tensor::cat(&inputs, 0)?.to_dtype(DType::F16)?,
                );
            }
            Ok(t)
        },
    )?;
    let mut skipped = [skipped as f64];
    dist::collective().all_reduce_sum_f64(&mut skipped);
    Ok((rows, skipped[0] as usize))
}

/// Runs the text teacher over `texts`, storing its features and the student's `max_len` ids.
pub fn cache_texts(
    texts: &[String],
    tokenizer: &dyn Tokenize,
    teacher: &dyn TextTeacher,
    max_len: usize,
    job: serde_json::Value,
    out: &Path,
    opts: &CacheOptions,
) -> Result<usize> {
    run_shards(out, job, Vec::new(), texts.len(), opts, |range| {
        let part = &texts[range];
        let feats = part
            .chunks(opts.batch)
            .map(|c| teacher.text_features(c))
            .collect::<Result<Vec<_>>>()?;
        let ids = tokenizer.encode(part, max_len)?;
        let mut t = ShardTensors::new();
        t.insert(
            "token_ids".into(),
            Tensor::from_vec(ids.concat(), (part.len(), max_len), &Device::Cpu)?,
        );
        t.insert(
            "teacher".into(),
            Tensor::cat(&feats, 0)?.to_dtype(DType::F16)?,
        );
        Ok(t)
    })
}

/// A memory-mapped field of one shard: where its rows start and how many bytes each has.
struct Field {
    offset: usize,
    rows: usize,
    row_bytes: usize,
    row_shape: Vec<usize>,
}

/// The dtype each field is stored in (`cache_images`, `cache_texts`).
fn field_dtype(name: &str) -> Option<safetensors::Dtype> {
    match name {
        "teacher" | "inputs" => Some(safetensors::Dtype::F16),
        "labels" | "token_ids" => Some(safetensors::Dtype::U32),
        _ => None,
    }
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    fields: HashMap<String, Field>,
}

/// A finished cache directory, read through memory maps.
pub struct Cache {
    /// Named in errors.
    dir: PathBuf,
    class_names: Vec<String>,
    shards: Vec<Shard>,
    /// Global index of each shard's first row, plus the total at the end.
    starts: Vec<usize>,
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("index.json");
        let text = std::fs::read_to_string(&index_path).with_context(|| {
            format!("reading {} (is the cache finished?)", index_path.display())
        })?;
        let index: Index = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a cache index", index_path.display()))?;
        let mut starts: Vec<usize> = vec![0];
        let mut shards = Vec::new();
        for entry in &index.shards {
            let path = dir.join(&entry.file);
            let shard = Self::map(&path)
                .with_context(|| format!("a shard {} lists", index_path.display()))?;
            for (name, f) in &shard.fields {
                ensure!(
                    f.rows == entry.rows,
                    "{}: {name} has {} rows, {} says {}",
                    path.display(),
                    f.rows,
                    index_path.display(),
                    entry.rows
                );
            }
            let total = starts.last().copied().unwrap_or(0);
            let total = total
                .checked_add(entry.rows)
                .with_context(|| format!("{}: row counts overflow", index_path.display()))?;
            starts.push(total);
            shards.push(shard);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            class_names: index.class_names,
            shards,
            starts,
        })
    }

    fn map(path: &PathBuf) -> Result<Shard> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: shards are written once, atomically, and never modified afterwards.
        let map =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&map)
            .with_context(|| format!("{}: not a safetensors shard", path.display()))?;
        let base = map.as_ptr() as usize;
        let fields = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let Some((&rows, row_shape)) = view.shape().split_first() else {
                    bail!("{}: {name} is a scalar, not rows", path.display())
                };
                if let Some(want) = field_dtype(&name).filter(|&d| d != view.dtype()) {
                    bail!(
                        "{}: {name} is {:?}, the cache stores {want:?}",
                        path.display(),
                        view.dtype()
                    );
                }
                let field = Field {
                    offset: view.data().as_ptr() as usize - base,
                    rows,
                    row_bytes: view.data().len() / rows.max(1),
                    row_shape: row_shape.to_vec(),
                };
                Ok((name, field))
            })
            .collect::<Result<_>>()?;
        Ok(Shard {
            path: path.clone(),
            map,
            fields,
        })
    }

    /// The image cache of a `spikeclip cache --out DIR` run: `DIR/images`, or `DIR` itself.
    pub fn open_images(dir: &Path) -> Result<Self> {
        Self::open(&dir.join("images"))
            .or_else(|_| Self::open(dir))
            .with_context(|| format!("opening the image cache in {}", dir.display()))
    }

    /// Width of the cached teacher features (CLIP's projection dimension).
    pub fn teacher_dim(&self) -> Option<usize> {
        let field = self.shards.first()?.fields.get("teacher")?;
        field.row_shape.first().copied()
    }

    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Raw bytes of rows `indices` of `field`, concatenated, with the row shape.
    fn gather(&self, field: &str, indices: &[usize]) -> Result<(Vec<u8>, Vec<usize>)> {
        let mut bytes = Vec::new();
        let mut shape = Vec::new();
        for &i in indices {
            ensure!(
                i < self.len(),
                "{}: row {i} out of a cache of {}",
                self.dir.display(),
                self.len()
            );
            let s = self.starts.partition_point(|&st| st <= i) - 1;
            let shard = &self.shards[s];
            let Some(f) = shard.fields.get(field) else {
                bail!("{}: the shard has no field {field:?}", shard.path.display())
            };
            let at = f.offset + (i - self.starts[s]) * f.row_bytes;
            bytes.extend_from_slice(&shard.map[at..at + f.row_bytes]);
            shape.clone_from(&f.row_shape);
        }
        Ok((bytes, shape))
    }

    fn f16_rows(&self, field: &str, indices: &[usize], device: &Device) -> Result<Tensor> {
        let (bytes, shape) = self.gather(field, indices)?;
        let values: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let mut dims = vec![indices.len()];
        dims.extend(shape);
        Ok(Tensor::from_vec(values, dims, device)?)
    }

    fn u32_rows(&self, field: &str, indices: &[usize]) -> Result<(Vec<u32>, Vec<usize>)> {
        let (bytes, shape) = self.gather(field, indices)?;
        Ok((
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            shape,
        ))
    }
}

impl ImageFeatureSet for Cache {
    fn len(&self) -> usize {
        Cache::len(self)
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn batch(&self, indices: &[usize], device: &Device) -> Result<ImageBatch> {
        Ok(ImageBatch {
            inputs: self.f16_rows("inputs", indices, device)?,
            teacher: self.f16_rows("teacher", indices, device)?,
            labels: self.u32_rows("labels", indices)?.0,
        })
    }
}

impl TextFeatureSet for Cache {
    fn len(&self) -> usize {
        Cache::len(self)
    }
    fn batch(&self, indices: &[usize], device: &Device) -> Result<TextBatch> {
        let (ids, shape) = self.u32_rows("token_ids", indices)?;
        let len = shape.first().copied().unwrap_or(0);
        Ok(TextBatch {
            token_ids: Tensor::from_vec(ids, (indices.len(), len), device)?,
            teacher: self.f16_rows("teacher", indices, device)?,
        })
    }
}
