//! CLIP's byte-level BPE tokenizer through the `tokenizers` crate. It loads a checkpoint's
//! `tokenizer.json`, or builds the same tokenizer from CLIP's merges file
//! (`bpe_simple_vocab_16e6.txt.gz`) so tests and the built-in tools need no large vocabulary file.

use std::io::Read;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use serde_json::json;
use tokenizers::Tokenizer;

use super::Tokenize;

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";
/// Merges CLIP keeps from its BPE file (49152 - 256 - 2), giving a 49408-token vocabulary.
const MERGES: usize = 48_894;
/// CLIP's split of lowercased text into words, numbers digit by digit, and punctuation runs.
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP tokenizer: start id, BPE ids, end id, padded with the end id.
pub struct ClipTokenizer {
    inner: Tokenizer,
    start: u32,
    end: u32,
}

/// GPT-2's reversible map from bytes to printable characters, which CLIP's vocabulary uses.
fn byte_alphabet() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

impl ClipTokenizer {
    /// Loads a `tokenizer.json` as written by transformers for CLIP.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Self::wrap(inner).with_context(|| format!("tokenizer {}", path.display()))
    }

    /// Builds the tokenizer from CLIP's gzipped merges file.
    pub fn from_bpe_gz(path: &Path) -> anyhow::Result<Self> {
        let mut text = String::new();
        std::fs::File::open(path)
            .map(flate2::read::GzDecoder::new)
            .and_then(|mut gz| gz.read_to_string(&mut text))
            .with_context(|| format!("reading BPE merges {}", path.display()))?;
        let merges: Vec<&str> = text.lines().skip(1).take(MERGES).collect();
        if merges.len() != MERGES || merges.iter().any(|m| m.split(' ').count() != 2) {
            bail!(
                "{}: expected {MERGES} merge lines of two symbols",
                path.display()
            );
        }
        let alphabet: Vec<String> = byte_alphabet().into_iter().map(String::from).collect();
        let vocab: serde_json::Map<String, serde_json::Value> = alphabet
            .iter()
            .cloned()
            .chain(alphabet.iter().map(|c| format!("{c}</w>")))
            .chain(merges.iter().map(|m| m.replace(' ', "")))
            .chain([START.to_string(), END.to_string()])
            .enumerate()
            .map(|(i, t)| (t, json!(i)))
            .collect();
        let n = vocab.len();
        let spec = json!({
            "version": "1.0",
            "added_tokens": [
                {"id": n - 2, "content": START, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
                {"id": n - 1, "content": END, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
            ],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": END, "continuing_subword_prefix": "",
                "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                "vocab": vocab, "merges": merges},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        });
        let inner = Tokenizer::from_str(&spec.to_string())
            .map_err(|e| anyhow!("building tokenizer from {}: {e}", path.display()))?;
        Self::wrap(inner)
    }

    fn wrap(inner: Tokenizer) -> anyhow::Result<Self> {
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| anyhow!("no {t} token"));
        let (start, end) = (id(START)?, id(END)?);
        Ok(Self { inner, start, end })
    }
}

impl Tokenize for ClipTokenizer {
    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// As transformers with `truncation=True, padding="max_length"`: the end id always
    /// survives truncation and also pads.
    fn encode(&self, texts: &[String], max_len: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        if max_len < 2 {
            bail!("max_len {max_len} leaves no room for the start and end tokens");
        }
        texts
            .iter()
            .map(|text| {
                let enc = self
                    .inner
                    .encode(text.as_str(), false)
                    .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
                let body = &enc.get_ids()[..enc.get_ids().len().min(max_len - 2)];
                let mut ids = Vec::with_capacity(max_len);
                ids.push(self.start);
                ids.extend_from_slice(body);
                ids.resize(max_len, self.end);
                Ok(ids)
            })
            .collect()
    }
}
