//! CLIP's byte-level BPE through the `tokenizers` crate. Built from a Hugging Face
//! `tokenizer.json`, from `vocab.json` + `merges.txt`, or straight from OpenAI's
//! `bpe_simple_vocab_16e6.txt.gz`, so a test needs no multi-megabyte tokenizer file.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::Tokenize;

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's text context; the paper's spiking text encoder reads 20.
pub const CLIP_CONTEXT: usize = 77;

/// OpenAI's word pattern: contractions, letter runs, single digits, symbol runs.
const WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
pub const OPENAI_BPE_FILE: &str = "bpe_simple_vocab_16e6.txt.gz";
/// The merges OpenAI's tokenizer uses out of the 16e6 file (its vocabulary is 49408).
const OPENAI_MERGES: usize = 49152 - 256 - 2;

/// Token ids with their attention mask (1 for real tokens, 0 for padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
}

/// CLIP's tokenizer: `<|startoftext|> ... <|endoftext|>`, truncated so the end token stays,
/// padded with the end token (as Hugging Face's CLIPTokenizer pads).
pub struct ClipTokenizer {
    inner: Tokenizer,
    end_id: u32,
}

impl ClipTokenizer {
    /// `tokenizer.json` if the directory has one, else `vocab.json` + `merges.txt`, else
    /// OpenAI's own `bpe_simple_vocab_16e6.txt.gz`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_tokenizer_json(&json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.exists() && merges.exists() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        let openai = dir.join(OPENAI_BPE_FILE);
        if openai.exists() {
            return Self::from_bpe_gz(&openai);
        }
        bail!(
            "{}: no tokenizer.json, vocab.json + merges.txt, nor {OPENAI_BPE_FILE}",
            dir.display()
        )
    }

    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: not a tokenizer.json: {e}", path.display()))?;
        Self::wrap(inner)
    }

    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let vocab_map: std::collections::HashMap<String, u32> = serde_json::from_str(&read(vocab)?)
            .with_context(|| format!("{}: not a JSON token -> id map", vocab.display()))?;
        if let Some(t) = [START_OF_TEXT, END_OF_TEXT]
            .into_iter()
            .find(|t| !vocab_map.contains_key(*t))
        {
            bail!("{}: the vocabulary lacks CLIP's {t}", vocab.display());
        }
        let merge_lines = read(merges)?;
        let merges_read = parse_merges(merge_lines.lines().filter(|l| !l.starts_with("#version")))
            .with_context(|| format!("in {}", merges.display()))?;
        Self::from_parts(vocab_map.into_iter().collect(), merges_read).with_context(|| {
            format!(
                "{} and {} do not make a tokenizer",
                vocab.display(),
                merges.display()
            )
        })
    }

    /// OpenAI's `bpe_simple_vocab_16e6.txt.gz`: the vocabulary is the 256 byte symbols, the
    /// same with `</w>`, one token per merge, then the two special tokens.
    pub fn from_bpe_gz(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .with_context(|| format!("{}: not a gzipped UTF-8 merges file", path.display()))?;
        let lines: Vec<&str> = text.split('\n').skip(1).take(OPENAI_MERGES).collect();
        if lines.len() < OPENAI_MERGES {
            bail!(
                "{}: {} merges, CLIP needs {OPENAI_MERGES}",
                path.display(),
                lines.len()
            );
        }
        let merges =
            parse_merges(lines.into_iter()).with_context(|| format!("in {}", path.display()))?;
        let units: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
        let mut tokens = units.clone();
        tokens.extend(units.iter().map(|u| format!("{u}</w>")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(START_OF_TEXT.into());
        tokens.push(END_OF_TEXT.into());
        let vocab = tokens.into_iter().zip(0u32..).collect();
        Self::from_parts(vocab, merges)
            .with_context(|| format!("{}: its merges do not make a tokenizer", path.display()))
    }

    fn from_parts(
        vocab: tokenizers::models::bpe::Vocab,
        merges: Vec<(String, String)>,
    ) -> Result<Self> {
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(END_OF_TEXT.into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| anyhow!("building CLIP's BPE: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let whitespace =
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| anyhow!("{e}"))?;
        inner
            .with_normalizer(Some(NormSequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(|e| anyhow!("{e}"))?;
        let words = Split::new(
            SplitPattern::Regex(WORD_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| anyhow!("{e}"))?;
        inner.with_pre_tokenizer(Some(PreSequence::new(vec![
            words.into(),
            ByteLevel::new(false, false, false).into(),
        ])));
        inner
            .add_special_tokens([
                AddedToken::from(START_OF_TEXT, true),
                AddedToken::from(END_OF_TEXT, true),
            ])
            .map_err(|e| anyhow!("{e}"))?;
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| anyhow!("vocabulary lacks {t}"))
        };
        let post = RobertaProcessing::new(
            (END_OF_TEXT.into(), id(END_OF_TEXT)?),
            (START_OF_TEXT.into(), id(START_OF_TEXT)?),
        )
        .trim_offsets(false)
        .add_prefix_space(false);
        inner.with_post_processor(Some(post));
        Self::wrap(inner)
    }

    /// Padding and truncation are ours (per call, to any length), not the file's.
    fn wrap(mut inner: Tokenizer) -> Result<Self> {
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        let end_id = inner
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| anyhow!("tokenizer has no {END_OF_TEXT} token"))?;
        Ok(Self { inner, end_id })
    }

    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    /// Ids and attention masks, each row exactly `max_len` long.
    pub fn encode_with_mask(&self, texts: &[String], max_len: usize) -> Result<Encoded> {
        if max_len < 2 {
            bail!("max_len {max_len} leaves no room for the start and end tokens");
        }
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let (mut ids, mut mask) = (
            Vec::with_capacity(texts.len()),
            Vec::with_capacity(texts.len()),
        );
        for enc in encodings {
            let mut row = enc.get_ids().to_vec();
            if row.len() > max_len {
                row.truncate(max_len - 1);
                row.push(self.end_id);
            }
            let real = row.len();
            row.resize(max_len, self.end_id);
            let mut m = vec![1u32; real];
            m.resize(max_len, 0);
            ids.push(row);
            mask.push(m);
        }
        Ok(Encoded { ids, mask })
    }
}

impl Tokenize for ClipTokenizer {
    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn encode(&self, texts: &[String], max_len: usize) -> Result<Vec<Vec<u32>>> {
        Ok(self.encode_with_mask(texts, max_len)?.ids)
    }
}

fn parse_merges<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Vec<(String, String)>> {
    lines
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, line)| match line.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                Ok((a.into(), b.into()))
            }
            _ => bail!("merge {} is not two symbols: {line:?}", i + 1),
        })
        .collect()
}

/// GPT-2's reversible map from the 256 byte values to printable characters, in OpenAI's order.
fn byte_symbols() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut order: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let mut symbols: Vec<u32> = order.clone();
    let mut extra = 0;
    for b in 0..256 {
        if !printable(b) {
            order.push(b);
            symbols.push(256 + extra);
            extra += 1;
        }
    }
    symbols
        .into_iter()
        .map(|c| char::from_u32(c).expect("below the surrogate range"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai_gz() -> std::path::PathBuf {
        crate::shared_test_data(OPENAI_BPE_FILE)
    }

    /// The Hugging Face file layouts load to the same tokenizer as OpenAI's merges file
    /// (which the transformers parity test checks).
    #[test]
    fn hugging_face_layouts_agree_with_openai_merges() {
        let reference = ClipTokenizer::from_bpe_gz(&openai_gz()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let vocab = reference.inner.get_vocab(true);
        std::fs::write(
            dir.path().join("vocab.json"),
            serde_json::to_string(&vocab).unwrap(),
        )
        .unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(openai_gz()).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let merges: Vec<&str> = text.split('\n').skip(1).take(OPENAI_MERGES).collect();
        std::fs::write(
            dir.path().join("merges.txt"),
            format!("#version: 0.2\n{}\n", merges.join("\n")),
        )
        .unwrap();
        reference
            .inner
            .save(dir.path().join("saved.json"), false)
            .unwrap();

        let texts: Vec<String> = ["It's a Photo of 3 <|endoftext|> cats!", "naïve café 🙂", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let want = reference.encode_with_mask(&texts, 20).unwrap();
        let from_files = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(from_files.encode_with_mask(&texts, 20).unwrap(), want);
        let from_json = ClipTokenizer::from_tokenizer_json(&dir.path().join("saved.json")).unwrap();
        assert_eq!(from_json.encode_with_mask(&texts, 20).unwrap(), want);
    }

    #[test]
    fn bad_merges_are_named() {
        let dir = tempfile::tempdir().unwrap();
        // A vocabulary with CLIP's special tokens, so that the merges are what is wrong.
        let vocab = r#"{"<|startoftext|>": 0, "<|endoftext|>": 1}"#;
        std::fs::write(dir.path().join("vocab.json"), vocab).unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).err().unwrap());
        assert!(
            err.contains("merges.txt") && err.contains("merge 1"),
            "{err}"
        );
    }
}
