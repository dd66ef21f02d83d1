//! The model's `tokenizer.json`, decoding as the reference's tokenizer decodes, and UTF-8-safe streaming
//! of the answer text exactly as the reference returns it.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tokenizers::{Decoder, ModelWrapper};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids left out of decoded text (the reference tokenizer's special ids, from the manifest).
    skip: HashSet<u32>,
    /// A sentencepiece BPE with byte fallback: byte-token runs are decoded as sentencepiece does.
    byte_fallback: bool,
    /// Tokens decoded apart, the text around them decoded run by run and joined by `joiner`.
    separate: HashSet<u32>,
    joiner: &'static str,
    clean_up_runs: bool,
    clean_up_text: bool,
    /// Bytes of the longest vocabulary entry (as stored: at least the bytes of text it stands for).
    max_token_bytes: usize,
}

impl Tokenizer {
    /// Loads `path`; decoded text leaves out the tokens tokenizer.json marks special.
    pub fn load(path: &Path) -> Result<Self> {
        let data = crate::files::read_limited(path, crate::files::MAX_TOKENIZER_FILE, "tokenizer")?;
        Self::from_bytes(&data).with_context(|| format!("loading tokenizer {}", path.display()))
    }

    /// A tokenizer.json's bytes.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_bytes(data).map_err(|e| anyhow!("{}", e.to_string().replace('\n', " ")))?;
        let skip = inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        let byte_fallback = matches!(inner.get_model(), ModelWrapper::BPE(bpe) if bpe.byte_fallback);
        let max_token_bytes = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        Ok(Self {
            max_token_bytes,
            inner,
            skip,
            byte_fallback,
            separate: HashSet::new(),
            joiner: "",
            clean_up_runs: false,
            clean_up_text: false,
        })
    }

    /// Decodes as the manifest's `answer` says the reference does: exactly its `skip_ids` left out, its
    /// `separate_ids` decoded apart.
    pub fn decoding_as(mut self, answer: &crate::manifest::AnswerSpec) -> Self {
        self.skip = answer.skip_ids.iter().copied().collect();
        self.separate = answer.separate_ids.iter().copied().collect();
        self.joiner = if answer.spaces_between_separate { " " } else { "" };
        self.clean_up_runs = answer.clean_up_runs;
        self.clean_up_text = answer.clean_up_text;
        self
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`, `<img>`) map to their ids.
    /// `add_special`: also what the tokenizer adds around a sequence (a BOS for Llama-3 or InternLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow!("tokenizing prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` as the reference's `batch_decode` gives it: the skipped ids left out, byte-fallback
    /// runs decoded as sentencepiece decodes them (one U+FFFD per invalid byte, valid characters kept,
    /// where the `tokenizers` ByteFallback decoder turns a whole run with any invalid byte into U+FFFDs).
    /// Added tokens in `separate` split the ids into runs decoded on their own, as transformers' slow
    /// `_decode` does; the pieces (empty runs before a separate token dropped) are joined.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.decode_runs(ids)?;
        Ok(if self.clean_up_text { clean_up_tokenization(&text) } else { text })
    }

    fn decode_runs(&self, ids: &[u32]) -> Result<String> {
        let kept: Vec<u32> = ids.iter().copied().filter(|id| !self.skip.contains(id)).collect();
        if self.separate.is_empty() {
            return self.decode_run(&kept);
        }
        let mut pieces = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        for id in kept {
            if self.separate.contains(&id) {
                let text = self.decode_run(&std::mem::take(&mut run))?;
                if !text.is_empty() {
                    pieces.push(text);
                }
                pieces.push(self.inner.id_to_token(id).ok_or_else(|| anyhow!("decoding tokens: unknown id {id}"))?);
            } else {
                run.push(id);
            }
        }
        if !run.is_empty() {
            pieces.push(self.decode_run(&run)?);
        }
        Ok(pieces.join(self.joiner))
    }

    /// One run of kept ids through the tokenizer's decoder.
    fn decode_run(&self, ids: &[u32]) -> Result<String> {
        let mut tokens = Vec::with_capacity(ids.len());
        let mut bytes = Vec::new();
        for &id in ids {
            let token = self.inner.id_to_token(id).ok_or_else(|| anyhow!("decoding tokens: unknown id {id}"))?;
            match self.byte_fallback.then(|| byte_token(&token)).flatten() {
                Some(b) => bytes.push(b),
                None => {
                    if !bytes.is_empty() {
                        tokens.push(sentencepiece_bytes(&std::mem::take(&mut bytes)));
                    }
                    tokens.push(token);
                }
            }
        }
        if !bytes.is_empty() {
            tokens.push(sentencepiece_bytes(&bytes));
        }
        let text = match self.inner.get_decoder() {
            Some(d) => d.decode(tokens).map_err(|e| anyhow!("decoding tokens: {e}"))?,
            None => tokens.join(" "),
        };
        Ok(if self.clean_up_runs { clean_up_tokenization(&text) } else { text })
    }

    /// An upper bound on the text bytes one token stands for: byte-level BPE stores each byte as one
    /// character of one or two bytes, sentencepiece its `▁` (3 bytes) for a space and `<0xAB>` for a byte.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// transformers' `clean_up_tokenization`: the same replacements, in the same order.
fn clean_up_tokenization(text: &str) -> String {
    [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m")]
        .into_iter()
        .chain([(" 's", "'s"), (" 've", "'ve"), (" 're", "'re")])
        .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

/// The byte of a byte-fallback token `<0xAB>`.
fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// sentencepiece's decoding of a run of byte pieces: one character at a time where the bytes form a valid
/// UTF-8 character, else one U+FFFD for the single byte, and on.
fn sentencepiece_bytes(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let valid = (1..=4).filter(|n| i + n <= bytes.len()).find_map(|n| std::str::from_utf8(&bytes[i..i + n]).ok());
        match valid {
            Some(ch) => {
                out.push_str(ch);
                i += ch.len();
            }
            None => {
                out.push('\u{FFFD}');
                i += 1;
            }
        }
    }
    out
}

/// Python's `str.isspace`: Unicode White_Space plus the information separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

/// The reference's answer: `text.split(split_at)[0].strip()` (Python's strip).
pub fn answer_text(text: &str, split_at: Option<&str>) -> String {
    let cut = split_at.and_then(|s| text.split(s).next()).unwrap_or(text);
    cut.trim_matches(is_py_space).to_string()
}

/// Streams the answer so that the pieces add up to [`answer_text`] of the whole text: leading whitespace is
/// dropped, trailing whitespace and a tail that could begin the split string are held back until more text
/// shows what they are, and nothing is shown past the split string.
pub struct AnswerStream {
    raw: String,
    shown: usize,
    split_at: Option<String>,
}

impl AnswerStream {
    pub fn new(split_at: Option<&str>) -> Self {
        Self { raw: String::new(), shown: 0, split_at: split_at.filter(|s| !s.is_empty()).map(str::to_string) }
    }

    /// Adds decoded text; returns what can be shown now.
    pub fn push(&mut self, piece: &str) -> Option<String> {
        self.raw.push_str(piece);
        self.take(false)
    }

    /// The rest, once generation has ended.
    pub fn finish(&mut self) -> Option<String> {
        self.take(true)
    }

    fn take(&mut self, last: bool) -> Option<String> {
        let text = self.raw.trim_start_matches(is_py_space);
        let (mut text, cut) = match self.split_at.as_deref().and_then(|s| text.find(s)) {
            Some(at) => (&text[..at], true),
            None => (text, false),
        };
        if !(last || cut) {
            if let Some(split) = self.split_at.as_deref() {
                // The longest tail of the text that is a proper prefix of the split string.
                if let Some(k) =
                    (1..split.len()).rev().find(|&k| split.is_char_boundary(k) && text.ends_with(&split[..k]))
                {
                    text = &text[..text.len() - k];
                }
            }
        }
        let text = text.trim_end_matches(is_py_space);
        if text.len() <= self.shown || !text.is_char_boundary(self.shown) {
            return None;
        }
        let piece = text[self.shown..].to_string();
        self.shown = text.len();
        Some(piece)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_runs_decode_as_sentencepiece() {
        assert_eq!(sentencepiece_bytes(&[0x47, 0xD7]), "G\u{FFFD}");
        assert_eq!(sentencepiece_bytes(&[0xE4, 0xBD, 0xA0, 0x41]), "你A");
        // A truncated 3-byte character: one U+FFFD per byte (Python's "replace" would give one).
        assert_eq!(sentencepiece_bytes(&[0xE4, 0xBD, 0x41]), "\u{FFFD}\u{FFFD}A");
        assert_eq!(byte_token("<0x0A>"), Some(10));
        assert_eq!(byte_token("<0x0A0>"), None);
        assert_eq!(byte_token("<s>"), None);
    }

    #[test]
    fn answer_text_splits_then_strips_like_python() {
        assert_eq!(answer_text("  a b <|im_end|> c", Some("<|im_end|>")), "a b");
        assert_eq!(answer_text("\u{1C}x\u{A0}\n", None), "x");
        assert_eq!(answer_text("<|im_end|>rest", Some("<|im_end|>")), "");
    }

    #[test]
    fn streamed_pieces_add_up_to_the_answer() {
        let texts = ["  Hello <|im", "_end|> more", " a  b  ", "x <|im_start|>y <", "\n\n", "tail <|im_e"];
        for whole in texts {
            for step in 1..4 {
                let mut stream = AnswerStream::new(Some("<|im_end|>"));
                let mut shown = String::new();
                let chars: Vec<char> = whole.chars().collect();
                for chunk in chars.chunks(step) {
                    shown.extend(stream.push(&chunk.iter().collect::<String>()));
                }
                shown.extend(stream.finish());
                assert_eq!(shown, answer_text(whole, Some("<|im_end|>")), "{whole:?} in steps of {step}");
            }
        }
    }
}
