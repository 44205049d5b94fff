//! A word-level tokenizer over the world's closed vocabulary, with CLIP's conventions (start
//! token, words, end token, padded with the end id) so student text encoders read the world
//! exactly as they read CLIP's BPE ids.

use std::collections::BTreeMap;

use anyhow::{bail, ensure};

use crate::teacher::Tokenize;

pub const START: &str = "<start>";
pub const END: &str = "<end>";

/// Lower-cased words of a sentence with surrounding punctuation removed.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

#[derive(Debug, Clone)]
pub struct WorldTokenizer {
    ids: BTreeMap<String, u32>,
}

impl WorldTokenizer {
    /// Ids 0 and 1 are the start and end tokens; the words follow in sorted order.
    pub fn new<'a>(vocabulary: impl IntoIterator<Item = &'a str>) -> Self {
        let mut sorted: Vec<&str> = vocabulary.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let ids = [START, END]
            .into_iter()
            .chain(sorted)
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        Self { ids }
    }

    pub fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    pub fn end_id(&self) -> u32 {
        self.ids[END]
    }

    /// The ids of a sentence's words, or an error naming the first unknown word.
    pub fn word_ids(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        words(text)
            .iter()
            .map(|w| match self.id(w) {
                Some(id) => Ok(id),
                None => bail!(
                    "unknown word `{w}` in {text:?}: the built-in world's vocabulary has {} words",
                    self.ids.len() - 2
                ),
            })
            .collect()
    }
}

impl Tokenize for WorldTokenizer {
    fn vocab_size(&self) -> usize {
        self.ids.len()
    }

    /// Over-long sentences keep their first `max_len - 2` words, then the end token, as CLIP
    /// truncates.
    fn encode(&self, texts: &[String], max_len: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        ensure!(
            max_len >= 2,
            "max_len {max_len} leaves no room for the start and end tokens"
        );
        texts
            .iter()
            .map(|text| {
                let mut ids = vec![self.ids[START]];
                ids.extend(self.word_ids(text)?.into_iter().take(max_len - 2));
                ids.resize(max_len, self.end_id());
                Ok(ids)
            })
            .collect()
    }
}
