//! The model's `tokenizer.json` and UTF-8-safe streaming detokenisation.

use std::path::Path;

use anyhow::{anyhow, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`, `<img>`) map to their ids.
    /// `add_special`: also what the tokenizer adds around a sequence (a BOS for Llama-3 or InternLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow!("tokenizing prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding tokens: {e}"))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a growing list of token ids into text pieces, never emitting half a UTF-8 character: a byte-level
/// BPE token may end inside a multi-byte character, which decodes to U+FFFD until the next token arrives.
/// Only a window of recent tokens is re-decoded each step (the approach of text-generation-inference).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        self.take(tok, false)
    }

    /// The text past what was already shown, counted in characters (as text-generation-inference
    /// does): a decoder can rewrite earlier characters (a run of byte tokens that turns out invalid
    /// becomes U+FFFD, a leading space goes), and comparing prefixes would then hold everything back
    /// for good. Waits while the text ends in U+FFFD (an incomplete character), unless `last`.
    fn take(&mut self, tok: &Tokenizer, last: bool) -> Result<Option<String>> {
        let shown = tok.decode(&self.ids[self.prefix..self.read])?.chars().count();
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.chars().count() <= shown || (!last && now.ends_with('\u{FFFD}')) {
            return Ok(None);
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(now.chars().skip(shown).collect()))
    }

    /// Whatever is still held back at the end (a genuinely invalid sequence, shown as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        self.take(tok, true)
    }
}
