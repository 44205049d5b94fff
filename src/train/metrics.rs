//! Training curves as JSON Lines: one object per line, appended and flushed as it happens, so
//! a crash loses nothing already logged and a resumed run continues the same file.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

pub struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlWriter {
    /// Opens `path` for appending, creating it if needed.
    pub fn append(path: &Path) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening metrics file {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &impl Serialize) -> anyhow::Result<()> {
        let write = |out: &mut BufWriter<File>| -> anyhow::Result<()> {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")?;
            out.flush()?;
            Ok(())
        };
        write(&mut self.out).with_context(|| format!("writing metrics to {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_one_object_per_line_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        JsonlWriter::append(&path)
            .unwrap()
            .write(&serde_json::json!({"step": 1, "loss": 0.5}))
            .unwrap();
        JsonlWriter::append(&path)
            .unwrap()
            .write(&serde_json::json!({"step": 2, "loss": 0.25}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["loss"], 0.25);
    }
}
