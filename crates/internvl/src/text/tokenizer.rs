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

/// Streams the answer so that the pieces add up to exactly [`answer_text`] of the whole decoded text (what
/// `--json`, the chat history and the reference return), showing only what can no longer change: leading
/// whitespace is dropped, and the tail is held back while it could still change or go: an incomplete
/// character (U+FFFD), the last few characters where a clean-up rule (" ," -> ",") may still apply or be
/// undone, trailing whitespace, a tail that could begin the split string; nothing is shown past the split
/// string.
///
/// The whole text is kept up to date by decoding only a window of recent ids (at least [`WINDOW_CHARS`]
/// characters long) and appending what the window gained. Every rule that spans tokens (clean-up, byte
/// runs, runs joined around added tokens, a stripped leading space) reaches back a few characters at most,
/// so the window's own left edge decodes the same before and after a step and the difference is what the
/// whole text gained. Where the window's earlier text changed (a clean-up rule undone), the whole text is
/// decoded once and the window starts again: the text is always what decoding every id gives, at a cost
/// that does not grow with the answer.
pub struct AnswerStream {
    ids: Vec<u32>,
    /// The decode of `ids`.
    text: String,
    window_start: usize,
    /// The decode of `ids[window_start..]`.
    window_text: String,
    shown: String,
    split_at: Option<String>,
}

/// Ids after which the window moves up (see [`AnswerStream`]).
const WINDOW_IDS: usize = 32;
/// Characters the window holds at least when it moves: far more than any rule's reach.
const WINDOW_CHARS: usize = 32;

impl AnswerStream {
    pub fn new(split_at: Option<&str>) -> Self {
        Self {
            ids: Vec::new(),
            text: String::new(),
            window_start: 0,
            window_text: String::new(),
            shown: String::new(),
            split_at: split_at.filter(|s| !s.is_empty()).map(str::to_string),
        }
    }

    /// Adds a generated id; returns the text that became final with it.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let window = tok.decode(&self.ids[self.window_start..])?;
        // A character split across tokens decodes as U+FFFD until its last byte arrives: the comparison
        // leaves such a tail out on both sides.
        let (old, new) = (self.window_text.trim_end_matches('\u{FFFD}'), window.trim_end_matches('\u{FFFD}'));
        match new.strip_prefix(old) {
            Some(_) => {
                let settled = self.text.len() - (self.window_text.len() - old.len());
                self.text.truncate(settled);
                self.text.push_str(&window[old.len()..]);
                self.window_text = window;
            }
            None => {
                self.text = tok.decode(&self.ids)?;
                self.move_window(tok)?;
            }
        }
        if self.ids.len() - self.window_start >= 2 * WINDOW_IDS {
            self.move_window(tok)?;
        }
        Ok(self.take(false, tok.clean_up_text || tok.clean_up_runs))
    }

    /// Starts the window `WINDOW_IDS` back, or further while it holds fewer than `WINDOW_CHARS` characters
    /// (skipped ids decode to nothing).
    fn move_window(&mut self, tok: &Tokenizer) -> Result<()> {
        let mut start = self.ids.len().saturating_sub(WINDOW_IDS);
        loop {
            let text = tok.decode(&self.ids[start..])?;
            if start == 0 || text.chars().count() >= WINDOW_CHARS {
                self.window_start = start;
                self.window_text = text;
                return Ok(());
            }
            start = start.saturating_sub(WINDOW_IDS);
        }
    }

    /// The rest, once generation has ended, and the whole answer (the pieces shown add up to it).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<(Option<String>, String)> {
        self.text = tok.decode(&self.ids)?;
        let piece = self.take(true, false);
        Ok((piece, answer_text(&self.text, self.split_at.as_deref())))
    }

    fn take(&mut self, last: bool, clean_up: bool) -> Option<String> {
        let show = showable(&self.text, self.split_at.as_deref(), self.shown.len(), last, clean_up);
        // Held-back text only ever grows into the final text, so what was shown is a prefix of it; were it
        // not, showing nothing more is the safe failure.
        if show.len() <= self.shown.len() || !show.starts_with(self.shown.as_str()) {
            return None;
        }
        let piece = show[self.shown.len()..].to_string();
        self.shown.push_str(&piece);
        Some(piece)
    }
}

/// The part of `text` (the decode of every id so far) that can be shown: see [`AnswerStream`]. `shown`
/// bytes of it were shown before, so the split string is looked for only from there on.
fn showable<'a>(text: &'a str, split_at: Option<&str>, shown: usize, last: bool, clean_up: bool) -> &'a str {
    let text = text.trim_start_matches(is_py_space);
    let cut_at = split_at.and_then(|s| {
        let mut from = shown.saturating_sub(s.len()).min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        text[from..].find(s).map(|at| from + at)
    });
    let (mut text, cut) = match cut_at {
        Some(at) => (&text[..at], true),
        None => (text, false),
    };
    if !(last || cut) {
        if let Some(split) = split_at {
            // The longest tail of the text that is a proper prefix of the split string.
            if let Some(k) = (1..split.len()).rev().find(|&k| split.is_char_boundary(k) && text.ends_with(&split[..k]))
            {
                text = &text[..text.len() - k];
            }
        }
        text = text.trim_end_matches('\u{FFFD}');
        if clean_up {
            // A clean-up rule spans at most 4 characters, and more text can undo one already applied
            // (" ' " -> "'" until " ." takes its last space), so the last 4 characters wait.
            text = text.char_indices().rev().nth(3).map_or("", |(i, _)| &text[..i]);
        }
    }
    text.trim_end_matches(is_py_space)
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
    fn showable_text_holds_back_what_can_change() {
        let texts = [
            "  Hello <|im",
            "_end|> more",
            " a  b  ",
            "x <|im_start|>y <",
            "\n\n",
            "tail <|im_e",
            "a ,b 'm . ? !",
            "umb ' .' ' n't",
        ];
        for whole in texts {
            for clean_up in [false, true] {
                let final_text = |t: &str| if clean_up { clean_up_tokenization(t) } else { t.to_string() };
                let mut shown = String::new();
                let chars: Vec<char> = whole.chars().collect();
                for n in 1..=chars.len() + 1 {
                    let prefix: String = chars[..n.min(chars.len())].iter().collect();
                    let text = final_text(&prefix);
                    let show = showable(&text, Some("<|im_end|>"), shown.len(), n > chars.len(), clean_up);
                    if show.len() > shown.len() && show.starts_with(&shown) {
                        shown = show.to_string(); // as AnswerStream::take shows it
                    }
                    let want = answer_text(&final_text(whole), Some("<|im_end|>"));
                    assert!(want.starts_with(&shown), "{whole:?}: showed {shown:?}, the answer is {want:?}");
                }
                assert_eq!(
                    shown,
                    answer_text(&final_text(whole), Some("<|im_end|>")),
                    "{whole:?}, clean-up {clean_up}"
                );
            }
        }
    }
}
